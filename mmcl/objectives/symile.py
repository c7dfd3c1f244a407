"""Symile (Saporta et al. 2024): contrast with the multilinear inner product of all modalities.

``MIP(x^1, ..., x^M) = sum_d prod_m x^m_d``. For each anchor modality m, the candidates are products of
the other modalities and ``L_m = CE(S, I)`` with ``S = s * X_m P^T``; ``L = mean_m L_m``.

* ``negatives="n"`` (O(N)): for every non-anchor k one permutation ``pi_k`` of the (global) batch,
  ``P = prod_{k != m} X_k[pi_k]``, and the diagonal of ``S`` replaced by the true positives
  ``s * MIP(x^1_i, ..., x^M_i)``. Permutations are drawn anchor by anchor, in modality order, and within an
  anchor for each non-anchor in modality order: ``randperm(N_global, generator=generator)``.
* ``negatives="n_squared"``: all ``N^(M-1)`` combinations of the non-anchors are candidates (the aligned
  one is the positive). The logsumexp over them is streamed in blocks under activation checkpointing:
  neither the ``N^(M-1) x D`` candidates nor the ``N x N^(M-1)`` scores are ever held; extra memory is
  one block (:data:`BLOCK_ELEMENTS` elements) plus ``O(N D)``.

With two modalities Symile is CLIP (``symile_loss`` falls back to it).

Missing modalities (``present``): a sample's MIP runs over its present modalities (an absent vector is
replaced by the all-ones vector, the identity of the elementwise product). Rows of anchor m need m present.
Note that a MIP over fewer vectors is larger in magnitude than one over more unit vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mmcl.objectives import gather
from mmcl.objectives.base import (Batch, Objective, ce_rows, check_embeddings, check_present, check_score_inputs,
                                  check_shapes, local_form, mean_terms, mean_valid)
from mmcl.objectives.pairwise import clip_rows

#: Elements of one streamed block (anchor rows x candidate prefixes x (D + N)) in ``n_squared``.
BLOCK_ELEMENTS = 2**20


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
            logit_scale: Tensor | float, generator: torch.Generator | None) -> Tensor:
    """Per-row CE ``[N_local]`` with O(N) negatives (one permutation per non-anchor)."""
    n_global = others[0].shape[0]
    cands = _product([x[_perm(n_global, generator, x.device)] for x in others])
    logits = logit_scale * anchor @ cands.T
    target = offset + torch.arange(anchor.shape[0], device=anchor.device)
    logits = logits.scatter(1, target[:, None], (logit_scale * positive)[:, None])
    return F.cross_entropy(logits, target, reduction="none")


def _block_lse(anchor: Tensor, logit_scale: Tensor | float, combos: Tensor, *others: Tensor) -> Tensor:
    """logsumexp over the candidates whose leading non-anchor indices are ``combos``, ``[c]``.

    ``combos`` ``[b]`` are flat indices into the ``N^(M-2)`` combinations of all non-anchors but the last
    (row-major: the first non-anchor varies slowest); each is crossed with every row of the last one.
    """
    *lead, last = others
    n = last.shape[0]
    prefix = None
    rest = combos
    for x in reversed(lead):
        rows = x[rest % n]
        rest = rest // n
        prefix = rows if prefix is None else rows * prefix
    block = anchor[:, None, :] if prefix is None else anchor[:, None, :] * prefix[None]  # [c, b, D]
    scores = logit_scale * (block.reshape(-1, block.shape[-1]) @ last.T)  # [c * b, N]
    return torch.logsumexp(scores.reshape(anchor.shape[0], -1), dim=1)


def streamed_lse(anchor: Tensor, others: Sequence[Tensor], logit_scale: Tensor | float,
                 block_elements: int = BLOCK_ELEMENTS) -> Tensor:
    """``lse_i = logsumexp over all (j_1..j_K) of s * MIP(anchor_i, others[0]_j1, ..., others[K-1]_jK)``.

    Args:
        anchor: ``[Na, D]``; others: K >= 1 tensors ``[N, D]``; logit_scale: ``s``.
        block_elements: size of one block of work (rows x prefixes x (D + N)).

    Returns:
        ``[Na]``. Blocks of (anchor rows x leading combinations) are computed under activation
        checkpointing and merged with ``logsumexp``, so the peak extra memory is one block.
    """
    n, d = others[-1].shape
    n_lead = n ** (len(others) - 1)
    per = d + n
    b = max(1, min(n_lead, block_elements // per))
    c = max(1, min(anchor.shape[0], block_elements // (b * per)))
    out = []
    for r0 in range(0, anchor.shape[0], c):
        rows = anchor[r0:r0 + c]
        parts = [checkpoint(_block_lse, rows, logit_scale, torch.arange(p0, min(p0 + b, n_lead), device=rows.device),
                            *others, use_reentrant=False, preserve_rng_state=False)
                 for p0 in range(0, n_lead, b)]
        out.append(parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts, 1), dim=1))
    return torch.cat(out)


def symile_rows(local: Sequence[Tensor], full: Sequence[Tensor], m: int, offset: int,
                logit_scale: Tensor | float, negatives: str, generator: torch.Generator | None) -> Tensor:
    """Per-row loss ``[N_local]`` of anchor ``m`` (M >= 3; absent rows already replaced by ones).

    Args:
        local: M tensors ``[N_local, D]``; full: M tensors ``[N_global, D]``; offset: first local row's
            global index; negatives: ``"n"`` or ``"n_squared"``; generator: for ``"n"``.
    """
    others = [x for k, x in enumerate(full) if k != m]
    positive = _product(local).sum(-1)
    if negatives == "n":
        return _rows_n(local[m], others, positive, offset, logit_scale, generator)
    return streamed_lse(local[m], others, logit_scale) - logit_scale * positive


def _ones_for_absent(xs: Sequence[Tensor], present: Tensor | None) -> list[Tensor]:
    if present is None:
        return list(xs)
    return [torch.where(present[:, k, None], x, torch.ones_like(x)) for k, x in enumerate(xs)]


def _check_negatives(negatives: str) -> None:
    if negatives not in ("n", "n_squared"):
        raise ValueError(f"negatives must be 'n' or 'n_squared', got {negatives!r}")


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

    ``logit_scale`` = log s (init ``log(1/0.07)`` unless given). The ``"n"`` permutations come from a
    generator seeded, at every forward, from rank 0's global torch RNG (broadcast when distributed), so
    that all ranks draw the same permutations of the global batch and seeding torch reproduces them.

    Args:
        modalities: modality names; negatives: ``"n"`` or ``"n_squared"``; other keywords: see
            :class:`Objective`.
    """

    score_kind = "mip"

    def __init__(self, modalities: Sequence[str], *, negatives: str = "n", init_logit_scale: float | None = None,
                 learn_logit_scale: bool = True, **kwargs) -> None:
        super().__init__(modalities, **kwargs)
        _check_negatives(negatives)
        self.negatives = negatives
        init = 1 / 0.07 if init_logit_scale is None else init_logit_scale
        self.logit_scale = self._log_parameter(init, learn_logit_scale)

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
        generator = None
        if self.negatives == "n":
            generator = torch.Generator().manual_seed(gather.broadcast_seed(local[0].device))
        terms = [batch.reduce(symile_rows(local, full, m, batch.offset, s, self.negatives, generator),
                              None if pres is None else pres[:, m])
                 for m in range(len(batch.names))]
        return mean_terms(terms, "symile")

    def score(self, query: dict[str, Tensor], candidates: dict[str, Tensor]) -> Tensor:
        """``s * (prod_q x_q) @ (prod_c x_c)^T``: ``[Nq, Nc]``, the MIP of each query with each candidate."""
        q, c = check_score_inputs(query, candidates)
        return self.logit_scale.exp() * _product(q) @ _product(c).T
