"""GRAM (Cicchetti et al. 2025): contrast by the volume spanned by the modalities' unit vectors.

``vol(u_1, ..., u_k) = sqrt(det G)`` with ``G`` the ``k x k`` Gram matrix. With anchor ``t`` and the other
modalities ``v, a, ...``: ``V_ij = vol(t_i, v_j, a_j, ...)`` and
``L = (CE(-V / tau, I) + CE(-V^T / tau, I)) / 2``; retrieval ranks by ascending volume (score ``-V``).

Computing all ``N x N`` volumes:

* k = 2: ``det G = 1 - c^2`` (one GEMM);
* k = 3: ``det G = 1 - c_tv^2 - c_ta^2 - c_va^2 + 2 c_tv c_ta c_va`` (two GEMMs and a row-wise dot);
* k >= 4: Schur complement on the candidate side. For each candidate j the other vectors are
  orthonormalised once (Cholesky of their small Gram matrix, in float64), then
  ``det G_ij = det(O_j) * (1 - sum_m (t_i . e_jm)^2)``: k - 1 GEMMs, no ``N x N`` batched determinant.

``det G`` is clamped to ``>= eps`` before the square root (its gradient is unbounded at 0); a clamped
entry has zero gradient.

Missing modalities (``present``): an absent vector acts as a unit vector orthogonal to all others (it
leaves the volume unchanged), so a sample's volume is the volume of its present modalities. Rows (in both
directions) need the anchor; samples without it still serve as candidates in the anchor -> others direction.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from mmcl.config import GramConfig
from mmcl.objectives.base import (Batch, Objective, Term, ce_rows, check_embeddings, check_present,
                                  check_score_inputs, check_shapes, common_options, diagonal_ce, full_precision,
                                  local_form, mask_columns, mean_valid, register_objective)

#: Lower clamp of ``det G`` before the square root (volumes are at least ``sqrt(DET_EPS)``).
DET_EPS = 1e-6


def _orthonormal_basis(cs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Orthonormalise each row's vectors: ``cs`` q tensors ``[N, D]`` -> (``E`` ``[N, q, D]``, ``det O`` ``[N]``).

    ``O_j`` is the Gram matrix of ``cs[*][j]`` with unit diagonal (zero vectors act as orthogonal unit
    vectors); ``E_j = L_j^{-1} C_j`` with ``O_j = L_j L_j^T`` (float64). Singular ``O_j`` give ``det O = 0``.
    """
    stack = torch.stack(cs, 1)  # [N, q, D]
    s64 = stack.double()
    gram = s64 @ s64.transpose(1, 2)
    eye = torch.eye(len(cs), dtype=torch.float64, device=stack.device)
    gram = gram * (1 - eye) + eye
    chol, info = torch.linalg.cholesky_ex(gram)
    singular = info != 0
    chol = torch.where(singular[:, None, None], eye, chol)
    basis = torch.linalg.solve_triangular(chol, s64, upper=False)
    det = chol.diagonal(dim1=1, dim2=2).prod(1).square().masked_fill(singular, 0.0)
    return basis.to(stack.dtype), det.to(stack.dtype)


def _schur_det(qs: Sequence[Tensor], cs: Sequence[Tensor]) -> Tensor:
    """``det G_ij`` of ``(qs[*][i], cs[*][j])``: ``[Nq, Nc]``, for any numbers of query / candidate vectors."""
    basis, det_c = _orthonormal_basis(cs)
    proj = [[q @ basis[:, m].T for m in range(len(cs))] for q in qs]  # [Nq, Nc] for each (l, m)
    if len(qs) == 1:
        return det_c * (1 - sum(y.square() for y in proj[0]))
    p = len(qs)
    resid = torch.empty(qs[0].shape[0], cs[0].shape[0], p, p, dtype=torch.float64, device=qs[0].device)
    for l in range(p):
        for r in range(l, p):
            base = 1.0 if l == r else (qs[l] * qs[r]).sum(-1, keepdim=True)
            val = (base - sum(a * b for a, b in zip(proj[l], proj[r]))).double()
            resid[..., l, r] = val
            resid[..., r, l] = val
    return det_c * torch.linalg.det(resid).to(qs[0].dtype)


@functools.lru_cache(maxsize=None)
def _floor(eps: float, dtype: torch.dtype) -> float:
    """``sqrt(eps)`` as ``dtype`` computes it (the clamped volume), read to the host once per (eps, dtype)."""
    return torch.tensor(eps, dtype=dtype).sqrt().item()


class _Volume3(torch.autograd.Function):
    """``scale * sqrt(max(det G, eps))`` for k = 3 from the cosines, with a hand-written backward.

    ``det G = 1 - c1^2 - c2^2 - c12^2 + 2 c1 c2 c12`` with ``c1 = t.v``, ``c2 = t.a`` ``[Na, No]`` and
    ``c12 = v.a`` ``[No]``. Fusing the determinant, clamp, square root and scale into one function (in-place
    intermediates, closed-form derivatives) halves the passes over the ``Na x No`` matrices compared with
    autograd through the elementwise ops.
    """

    @staticmethod
    def forward(ctx, c1: Tensor, c2: Tensor, c12: Tensor, scale: Tensor, eps: float) -> Tensor:
        det = torch.addcmul(c1, c2, c12, value=-2.0).mul_(c1)  # c1^2 - 2 c1 c2 c12
        det.addcmul_(c2, c2)
        torch.sub(1 - c12.square(), det, out=det)
        volume = det.clamp_min_(eps).sqrt_()
        ctx.save_for_backward(c1, c2, c12, volume, scale)
        ctx.floor = _floor(eps, volume.dtype)
        return volume * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        c1, c2, c12, volume, scale = ctx.saved_tensors
        # h = -d out / d det * 2 = -scale * grad / volume (zero where det was clamped)
        h = torch.div(grad, volume).mul_(-scale).masked_fill_(volume <= ctx.floor, 0.0)
        grad_c1 = torch.addcmul(c1, c2, c12, value=-1.0).mul_(h)  # d det / d c1 = -2 (c1 - c2 c12)
        grad_c2 = torch.addcmul(c2, c1, c12, value=-1.0).mul_(h)
        grad_c12 = c12 * h.sum(0) - (h * c1).mul_(c2).sum(0)  # d det / d c12 = -2 (c12 - c1 c2)
        grad_scale = (grad * volume).sum() if ctx.needs_input_grad[3] else None
        return grad_c1, grad_c2, grad_c12, grad_scale, None


def gram_det(anchor: Tensor, others: Sequence[Tensor]) -> Tensor:
    """``det G`` of ``(anchor_i, others[0]_j, ..., others[K-1]_j)`` for all i, j: ``[Na, No]`` (unclamped)."""
    if len(others) == 1:
        return 1 - (anchor @ others[0].T).square()
    if len(others) == 2:
        c1, c2 = _cosines(anchor, others)
        c12 = (others[0] * others[1]).sum(-1)
        return 1 - c12.square() - c1 * (c1 - 2 * c2 * c12) - c2.square()
    return _schur_det([anchor], others)


def _cosines(anchor: Tensor, others: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``anchor @ others[k].T`` for every k, as one GEMM: views ``[Na, No]``."""
    return (anchor @ torch.cat(list(others)).T).split(others[0].shape[0], dim=1)


def scaled_volume(anchor: Tensor, others: Sequence[Tensor], scale: Tensor | float, eps: float = DET_EPS) -> Tensor:
    """``scale * V`` ``[Na, No]`` with ``V = gram_volume(anchor, others, eps)`` (k = 3: fused, see :class:`_Volume3`)."""
    if len(others) == 2:
        c1, c2 = _cosines(anchor, others)
        c12 = (others[0] * others[1]).sum(-1)
        return _Volume3.apply(c1, c2, c12, torch.as_tensor(scale, dtype=c1.dtype, device=c1.device), eps)
    return gram_det(anchor, others).clamp_min(eps).sqrt() * scale


@full_precision
def gram_volume(anchor: Tensor, others: Sequence[Tensor], eps: float = DET_EPS) -> Tensor:
    """Volumes ``V_ij = vol(anchor_i, others[0]_j, ..., others[K-1]_j)``.

    Args:
        anchor: ``[Na, D]`` unit vectors; others: K >= 1 tensors ``[No, D]`` of unit vectors (rows aligned).
        eps: lower clamp of ``det G`` before the square root.

    Returns:
        ``[Na, No]`` volumes in ``[sqrt(eps), 1]``.
    """
    check_shapes(others, [f"others[{k}]" for k in range(len(others))], min_count=1)
    if anchor.dim() != 2 or anchor.shape[1] != others[0].shape[1]:
        raise ValueError(f"anchor {tuple(anchor.shape)} and others {tuple(others[0].shape)} must be [N, D] "
                         f"with the same D")
    return scaled_volume(anchor, others, 1.0, eps)


def gram_rows(anchor: Tensor, others: Sequence[Tensor], anchor_all: Tensor, others_all: Sequence[Tensor],
              offset: int, temperature: Tensor | float, anchor_present: Tensor | None = None) -> Tensor:
    """Per-row GRAM loss ``[N_local]``: ``(CE(-V_i. / tau) + CE(-V_.i / tau)) / 2``.

    Args:
        anchor, others: local rows ``[N_local, D]``; anchor_all, others_all: ``[N_global, D]``;
            offset: first local row's global index; temperature: ``tau``.
        anchor_present: optional bool ``[N_global]``; samples without the anchor are no candidates in the
            others -> anchor direction (their own rows are garbage and must be excluded by the caller).
    """
    fwd = scaled_volume(anchor, others_all, -1 / temperature)
    if anchor_all is anchor and all(a is b for a, b in zip(others_all, others)):  # not gathered
        return diagonal_ce(fwd, None, anchor_present)
    bwd = mask_columns(scaled_volume(anchor_all, others, -1 / temperature).T, anchor_present)
    return (ce_rows(fwd, offset) + ce_rows(bwd, offset)) / 2


@full_precision
def gram_loss(anchor: Tensor, others: Sequence[Tensor], temperature: Tensor | float, *,
              anchor_all: Tensor | None = None, others_all: Sequence[Tensor] | None = None, offset: int = 0,
              present: Tensor | None = None) -> Tensor:
    """GRAM loss ``(CE(-V / tau, I) + CE(-V^T / tau, I)) / 2`` with ``V_ij = vol(anchor_i, others_j...)``.

    Args:
        anchor: ``[N, D]``; others: K >= 1 tensors ``[N, D]``; all L2-normalised (local rows in the
            local-loss form).
        temperature: the divisor ``tau``.
        anchor_all, others_all: gathered ``[N_global, D]`` tensors for the local-loss form; offset: global
            index of the first local row.
        present: optional bool ``[N_global, 1 + K]`` (column 0: the anchor); each sample needs >= 2
            present modalities; absent rows may hold anything.

    Returns:
        Scalar: mean over the (local) rows that have the anchor.
    """
    xs = [anchor, *others]
    names = ["anchor", *(f"others[{k}]" for k in range(len(others)))]
    check_shapes(xs, names)
    if (anchor_all is None) != (others_all is None):
        raise ValueError("the local-loss form needs both anchor_all and others_all")
    full = [local_form(x.shape[0], g, offset, x)
            for x, g in zip(xs, [anchor_all, *(others_all or [None] * len(others))])]
    present_local = None
    if present is not None:
        check_present(present, names, full[0].shape[0])
        present_local = present[offset:offset + anchor.shape[0]]
        xs = [torch.where(present_local[:, k, None], x, torch.zeros_like(x)) for k, x in enumerate(xs)]
        full = [torch.where(present[:, k, None], x, torch.zeros_like(x)) for k, x in enumerate(full)]
    check_embeddings([anchor, *others], names, present_local)
    if anchor_all is None:
        full = xs
    rows = gram_rows(xs[0], xs[1:], full[0], full[1:], offset, temperature,
                     None if present is None else present[:, 0])
    return mean_valid(rows, None if present_local is None else present_local[:, 0])


class GramObjective(Objective):
    """GRAM with a learnable temperature (``log_temperature``, init ``log(init_temperature)``).

    Scores (``"volume"``) are ``-vol`` of the query's and the candidate's vectors together.

    Args:
        modalities: modality names; anchor: the anchor modality (text by default); init_temperature:
            ``tau`` at init; learn_temperature: make it learnable. ``clamp_`` keeps ``1/tau <= max_logit_scale``.
    """

    score_kind = "volume"
    scalars = ("log_temperature",)

    def __init__(self, modalities: Sequence[str], *, anchor: str = "text", init_temperature: float = 0.07,
                 learn_temperature: bool = True, **kwargs) -> None:
        super().__init__(modalities, **kwargs)
        if anchor not in self.modalities:
            raise ValueError(f"GRAM anchor {anchor!r} is not one of the modalities {self.modalities}")
        self.anchor = anchor
        self.log_temperature = self._log_parameter(init_temperature, learn_temperature)

    def clamp_(self) -> None:
        """Keep ``tau >= 1 / max_logit_scale``."""
        with torch.no_grad():
            self.log_temperature.clamp_(min=-math.log(self.max_logit_scale))

    def log_tensors(self) -> dict[str, Tensor]:
        return {"temperature": self.log_temperature.detach().exp().reshape(())}

    def loss(self, batch: Batch) -> Tensor:
        if self.anchor not in batch.names:
            raise ValueError(f"GRAM needs the anchor {self.anchor!r} among the embeddings {batch.names}")
        a = batch.names.index(self.anchor)
        rest = [k for k in range(len(batch.names)) if k != a]
        anchor_present = None if batch.present is None else batch.present[:, a]
        rows = gram_rows(batch.local[a], [batch.local[k] for k in rest], batch.full[a],
                         [batch.full[k] for k in rest], batch.offset, self.log_temperature.exp(), anchor_present)
        term = batch.reduce(rows, anchor_present)
        if term is None:
            raise ValueError(f"GRAM: no sample in the batch has the anchor {self.anchor!r}")
        return term.value if isinstance(term, Term) else term

    def score(self, query: dict[str, Tensor], candidates: dict[str, Tensor]) -> Tensor:
        """``-vol(query_i..., candidate_j...)``, ``[Nq, Nc]``: smaller volume = better match."""
        q, c = check_score_inputs(query, candidates)
        if len(q) == 1:
            det = gram_det(q[0], c)
        elif len(c) == 1:
            det = gram_det(c[0], q).T
        else:
            det = _schur_det(q, c)
        return -det.clamp_min(DET_EPS).sqrt()


@register_objective("gram")
def build_gram(cfg: GramConfig, modalities: list[str], embed_dim: int | None) -> GramObjective:
    return GramObjective(modalities, anchor=cfg.anchor, init_temperature=cfg.init_temperature,
                         learn_temperature=cfg.learn_logit_scale, **common_options(cfg, embed_dim))
