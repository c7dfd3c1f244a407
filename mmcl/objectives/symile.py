"""Symile (Saporta et al. 2024): contrast with the multilinear inner product of all modalities.

``MIP(x^1, ..., x^M) = sum_d prod_m x^m_d``. For each anchor modality m, the candidates are products of
the other modalities and ``L_m = CE(S, I)`` with ``S = s * X_m P^T``; ``L = mean_m L_m``.

* ``negatives="n"`` (O(N)): for every non-anchor k one permutation ``pi_k`` of the (global) batch,
  ``P = prod_{k != m} X_k[pi_k]``, and the diagonal of ``S`` replaced by the true positives
  ``s * MIP(x^1_i, ..., x^M_i)``. Permutations are drawn anchor by anchor, in modality order, and within an
  anchor for each non-anchor in modality order: ``randperm(N_global, generator=generator)``.
* ``negatives="n_squared"``: all ``N^(M-1)`` combinations of the non-anchors are candidates (the aligned
  one is the positive). The logsumexp over them is streamed in blocks (a custom autograd function that
  recomputes each block in backward): neither the ``N^(M-1) x D`` candidates nor the ``N x N^(M-1)``
  scores are ever held; extra memory is one block (:data:`BLOCK_ELEMENTS` elements) plus ``O(N D)``.

With two modalities Symile is CLIP (``symile_loss`` falls back to it).

Missing modalities (``present``): a sample's MIP runs over its present modalities (an absent vector is
replaced by the all-ones vector, the identity of the elementwise product). Rows of anchor m need m present.
Note that a MIP over fewer vectors is larger in magnitude than one over more unit vectors.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from mmcl.config import SymileConfig
from mmcl.objectives import gather
from mmcl.objectives.base import (Batch, Objective, check_embeddings, check_present, check_score_inputs,
                                  check_shapes, common_options, full_precision, local_form, mean_terms, mean_valid,
                                  register_objective)
from mmcl.objectives.pairwise import clip_rows

#: Elements of one streamed block (anchor rows x leading combinations x (N + 2 D)) in ``n_squared``.
BLOCK_ELEMENTS = 2**21


def _product(xs: Sequence[Tensor]) -> Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = out * x
    return out


def mip(xs: Sequence[Tensor]) -> Tensor:
    """Multilinear inner product of aligned rows: ``[N, D]`` each -> ``[N]``, ``sum_d prod_m x^m_d``."""
    check_shapes(xs, [f"xs[{k}]" for k in range(len(xs))])
    return _product(xs).sum(-1)


def _perm(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    if generator is None:
        return torch.randperm(n, device=device)
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


def _rows_n(anchor: Tensor, others: Sequence[Tensor], positive: Tensor, offset: int,
            logit_scale: Tensor | float, generator: torch.Generator | None, perms: Tensor | None = None) -> Tensor:
    """Per-row CE ``[N_local]`` with O(N) negatives (one permutation per non-anchor: the rows of ``perms``
    ``[K, N_global]`` when given, else drawn with ``generator``)."""
    n_global = others[0].shape[0]
    if perms is None:
        perms = [_perm(n_global, generator, x.device) for x in others]
    cands = _product([x[p] for x, p in zip(others, perms)])
    logits = logit_scale * anchor @ cands.T
    target = offset + torch.arange(anchor.shape[0], device=anchor.device)
    logits = logits.scatter(1, target[:, None], (logit_scale * positive)[:, None])
    return F.cross_entropy(logits, target, reduction="none")


class _Plan:
    """How the candidates are streamed: blocks of ``c`` anchor rows x ``b`` combinations.

    A combination fixes one row of each leading non-anchor (all but the last non-anchor) and is crossed
    with every row of the last one. The leading rows are enumerated as an ``outer`` tuple (all leading
    non-anchors but the last, row-major) and a contiguous ``[j0, j1)`` slice of the last leading one, so
    blocks need slicing only, no gathers or scatters. Each block touches about ``block_elements`` elements.
    """

    def __init__(self, n_anchor: int, others: Sequence[Tensor], block_elements: int):
        n, d = others[-1].shape
        lead = len(others) - 1
        per = n + 2 * d  # scores + two [D] temporaries per (row, combination)
        inner = n if lead else 1
        self.b = max(1, min(inner, block_elements // per))
        self.c = max(1, min(n_anchor, block_elements // (self.b * per)))
        self.n_anchor = n_anchor
        self.outer = list(itertools.product(range(n), repeat=max(0, lead - 1)))
        self.slices = [(j, min(j + self.b, inner)) for j in range(0, inner, self.b)]

    def blocks(self) -> Iterator[tuple[int, tuple[int, ...], int, int]]:
        """``(r0, outer, j0, j1)``: rows ``[r0, r0 + c)``, fixed leading rows ``outer``, last-lead slice."""
        for r0 in range(0, self.n_anchor, self.c):
            for outer in self.outer:
                for j0, j1 in self.slices:
                    yield r0, outer, j0, j1


def _prefix(lead: Sequence[Tensor], outer: tuple[int, ...], j0: int, j1: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
    """The leading product for one block: (``[b, D]`` prefix, ``[D]`` product of the outer rows or None)."""
    if not lead:
        return like.new_ones(1, like.shape[1]), None
    fixed = _product([x[j] for x, j in zip(lead[:-1], outer)]) if outer else None
    rows = lead[-1][j0:j1]
    return (rows if fixed is None else rows * fixed), fixed


class _StreamedLSE(torch.autograd.Function):
    """``lse_i = logsumexp_{j_1..j_K} s * MIP(anchor_i, others[0]_j1, ..., others[K-1]_jK)``, streamed.

    Forward keeps only ``lse`` ``[Na]``; backward recomputes each block's scores and turns them into
    softmax weights with one GEMM (``exp(T L^T - lse)``), then accumulates the gradients with two more.
    """

    @staticmethod
    def forward(ctx, logit_scale: Tensor, anchor: Tensor, block_elements: int, *others: Tensor) -> Tensor:
        *lead, last = others
        plan = _Plan(anchor.shape[0], others, block_elements)
        parts: dict[int, list[Tensor]] = {}
        for r0, outer, j0, j1 in plan.blocks():
            a_s = anchor[r0:r0 + plan.c] * logit_scale
            prefix, _ = _prefix(lead, outer, j0, j1, anchor)
            block = (a_s[:, None, :] * prefix[None]).reshape(-1, anchor.shape[1])
            scores = (block @ last.T).view(a_s.shape[0], -1)
            parts.setdefault(r0, []).append(torch.logsumexp(scores, dim=1))
        lse = torch.cat([torch.logsumexp(torch.stack(p, 1), 1) for p in parts.values()])
        ctx.save_for_backward(logit_scale, anchor, lse, *others)
        ctx.block_elements = block_elements
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
        logit_scale, anchor, lse, *others = ctx.saved_tensors
        *lead, last = others
        plan = _Plan(anchor.shape[0], others, ctx.block_elements)
        grad_anchor = torch.zeros_like(anchor)
        grad_others = [torch.zeros_like(x) for x in others]
        grad_scale = torch.zeros_like(logit_scale)
        d = anchor.shape[1]
        for r0, outer, j0, j1 in plan.blocks():
            rows = slice(r0, r0 + plan.c)
            a_s = anchor[rows] * logit_scale
            prefix, fixed = _prefix(lead, outer, j0, j1, anchor)
            c, b = a_s.shape[0], prefix.shape[0]
            block = (a_s[:, None, :] * prefix[None]).reshape(-1, d)
            shift = lse[rows, None].expand(c, b).reshape(-1, 1)
            weights = torch.addmm(shift, block, last.T, beta=-1).exp_()  # softmax weights, [c * b, N]
            weights.mul_(grad_lse[rows, None].expand(c, b).reshape(-1, 1))  # g_i * softmax
            grad_others[-1].addmm_(weights.T, block)
            del block
            back = (weights @ last).view(c, b, d)  # g_i * sum_k w_ik last_k, per combination
            del weights
            if lead:
                grad_prefix = (back * a_s[:, None, :]).sum(0)  # [b, D]
                grad_others[len(lead) - 1][j0:j1] += grad_prefix if fixed is None else grad_prefix * fixed
                if outer:  # the fixed outer rows: product rule over the outer factors and the slice
                    summed = (grad_prefix * lead[-1][j0:j1]).sum(0)  # [D]
                    outer_rows = [x[j] for x, j in zip(lead[:-1], outer)]
                    for k, j in enumerate(outer):
                        rest = [r for i, r in enumerate(outer_rows) if i != k]
                        grad_others[k][j] += summed * _product(rest) if rest else summed
            # d lse_i / d anchor_i = s * sum_b prefix_b * back_ib (g_i folded into back)
            reduced = back.mul_(prefix[None]).sum(1)
            grad_anchor[rows] += reduced * logit_scale
            grad_scale += (anchor[rows] * reduced).sum()  # d lse_i / d s = anchor_i . reduced_i / g_i
        return grad_scale, grad_anchor, None, *grad_others


def streamed_lse(anchor: Tensor, others: Sequence[Tensor], logit_scale: Tensor | float,
                 block_elements: int = BLOCK_ELEMENTS) -> Tensor:
    """``lse_i = logsumexp over all (j_1..j_K) of s * MIP(anchor_i, others[0]_j1, ..., others[K-1]_jK)``.

    Args:
        anchor: ``[Na, D]``; others: K >= 1 tensors ``[N, D]``; logit_scale: ``s``.
        block_elements: elements of one block of work (rows x leading combinations x (N + 2 D)).

    Returns:
        ``[Na]``. Neither the ``N^K`` candidates nor the ``Na x N^K`` scores are held: blocks of
        (anchor rows x leading combinations) are computed, reduced and dropped, in forward and backward.
    """
    scale = torch.as_tensor(logit_scale, dtype=anchor.dtype, device=anchor.device)
    return _StreamedLSE.apply(scale, anchor, block_elements, *others)


def symile_rows(local: Sequence[Tensor], full: Sequence[Tensor], m: int, offset: int,
                logit_scale: Tensor | float, negatives: str, generator: torch.Generator | None,
                perms: Tensor | None = None) -> Tensor:
    """Per-row loss ``[N_local]`` of anchor ``m`` (M >= 3; absent rows already replaced by ones).

    Args:
        local: M tensors ``[N_local, D]``; full: M tensors ``[N_global, D]``; offset: first local row's
            global index; negatives: ``"n"`` or ``"n_squared"``; generator: for ``"n"``; perms: ``"n"``'s
            permutations ``[M - 1, N_global]`` (one per non-anchor, in modality order) instead of drawing them.
    """
    others = [x for k, x in enumerate(full) if k != m]
    positive = _product(local).sum(-1)
    if negatives == "n":
        return _rows_n(local[m], others, positive, offset, logit_scale, generator, perms)
    return streamed_lse(local[m], others, logit_scale) - logit_scale * positive


def _ones_for_absent(xs: Sequence[Tensor], present: Tensor | None) -> list[Tensor]:
    if present is None:
        return list(xs)
    return [torch.where(present[:, k, None], x, torch.ones_like(x)) for k, x in enumerate(xs)]


def _check_negatives(negatives: str) -> None:
    if negatives not in ("n", "n_squared"):
        raise ValueError(f"negatives must be 'n' or 'n_squared', got {negatives!r}")


@full_precision
def symile_loss(xs: Sequence[Tensor], logit_scale: Tensor | float, negatives: str = "n",
                generator: torch.Generator | None = None, *, xs_all: Sequence[Tensor] | None = None,
                offset: int = 0, present: Tensor | None = None) -> Tensor:
    """Symile loss ``mean_m CE(s X_m P^T, I)`` over M >= 2 modalities (M = 2: CLIP).

    Args:
        xs: M tensors ``[N, D]``, L2-normalised (local rows in the local-loss form).
        logit_scale: the multiplier ``s``.
        negatives: ``"n"`` (O(N), random permutations) or ``"n_squared"`` (all combinations, streamed).
        generator: RNG for the ``"n"`` permutations (default: torch's global RNG). In the local-loss form
            it must draw identical permutations on every rank.
        xs_all: M gathered tensors ``[N_global, D]`` for the local-loss form; offset: global index of the
            first local row.
        present: optional bool ``[N_global, M]``; each sample needs >= 2 present modalities; absent rows may
            hold anything.

    Returns:
        Scalar: mean over anchors of the mean over their (local, valid) rows.
    """
    _check_negatives(negatives)
    names = [f"xs[{k}]" for k in range(len(xs))]
    check_shapes(xs, names)
    full = [local_form(x.shape[0], None if xs_all is None else xs_all[k], offset, x) for k, x in enumerate(xs)]
    present_local = None
    if present is not None:
        check_present(present, names, full[0].shape[0])
        present_local = present[offset:offset + xs[0].shape[0]]
    check_embeddings(xs, names, present_local)
    if len(xs) == 2:
        pa, pb = (None, None) if present is None else (present[:, 0], present[:, 1])
        rows = clip_rows(*_ones_for_absent(xs, present_local), *_ones_for_absent(full, present), offset,
                         logit_scale, pa, pb)
        return mean_valid(rows, None if present_local is None else present_local.all(1))
    local = _ones_for_absent(xs, present_local)
    full = _ones_for_absent(full, present)
    terms = []
    for m in range(len(xs)):
        valid = None if present_local is None else present_local[:, m]
        if valid is not None and not bool(valid.any()):
            continue
        terms.append(mean_valid(symile_rows(local, full, m, offset, logit_scale, negatives, generator), valid))
    return mean_terms(terms, "symile_loss")


class SymileObjective(Objective):
    """Symile over M >= 2 modalities; scores are ``s * (prod_q x_q) . (prod_c x_c)`` ("mip").

    ``logit_scale`` = log s (init ``log(1/0.07)`` unless given). The ``"n"`` permutations are drawn at every
    forward with ``torch.randperm`` from rank 0's global torch RNG (broadcast when distributed,
    :func:`gather.shared_permutations`; anchor by anchor, non-anchors in modality order), so that all ranks
    draw the same permutations of the global batch and seeding torch reproduces them.

    Args:
        modalities: modality names; negatives: ``"n"`` or ``"n_squared"``; other keywords: see
            :class:`Objective`.
    """

    score_kind = "mip"

    def __init__(self, modalities: Sequence[str], *, negatives: str = "n", init_logit_scale: float = 1 / 0.07,
                 learn_logit_scale: bool = True, **kwargs) -> None:
        super().__init__(modalities, **kwargs)
        _check_negatives(negatives)
        self.negatives = negatives
        self.logit_scale = self._log_parameter(init_logit_scale, learn_logit_scale)

    def loss(self, batch: Batch) -> Tensor:
        s = self.logit_scale.exp()
        pres = batch.present
        local = _ones_for_absent(batch.local, batch.present_local())
        full = _ones_for_absent(batch.full, pres)
        if len(batch.names) == 2:
            pa, pb = (None, None) if pres is None else (pres[:, 0], pres[:, 1])
            rows = clip_rows(*local, *full, batch.offset, s, pa, pb)
            term = batch.reduce(rows, None if pres is None else pres.all(1))
            return mean_terms([term], "symile")
        n_mod = len(batch.names)
        perms = None
        if self.negatives == "n":
            perms = gather.shared_permutations(n_mod * (n_mod - 1), full[0].shape[0], local[0].device)
            perms = perms.view(n_mod, n_mod - 1, -1)
        terms = [batch.reduce(symile_rows(local, full, m, batch.offset, s, self.negatives, None,
                                          None if perms is None else perms[m]),
                              None if pres is None else pres[:, m])
                 for m in range(n_mod)]
        return mean_terms(terms, "symile")

    def score(self, query: dict[str, Tensor], candidates: dict[str, Tensor]) -> Tensor:
        """``s * (prod_q x_q) @ (prod_c x_c)^T``: ``[Nq, Nc]``, the MIP of each query with each candidate."""
        q, c = check_score_inputs(query, candidates)
        return self.logit_scale.exp() * _product(q) @ _product(c).T


@register_objective("symile")
def build_symile(cfg: SymileConfig, modalities: list[str], embed_dim: int | None) -> SymileObjective:
    return SymileObjective(modalities, negatives=cfg.negatives, init_logit_scale=cfg.init_logit_scale,
                           learn_logit_scale=cfg.learn_logit_scale, **common_options(cfg, embed_dim))
