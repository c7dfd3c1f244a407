"""Pairwise objectives: CLIP / InfoNCE and SigLIP, over two or more modalities.

For a pair (m, n), ``S = s * X_m X_n^T``:

* CLIP: ``L = (CE(S, I) + CE(S^T, I)) / 2`` (mean over rows).
* SigLIP: ``L = -(1/N) sum_ij log sigmoid(z_ij (S_ij + b))``, ``z_ii = 1`` else ``-1``.

Several modalities: ``all_pairs`` (mean over all pairs) or ``anchor`` (each modality against the anchor,
ImageBind / LanguageBind's star).

Missing modalities (``present`` masks): a pair term uses the samples that have **both** modalities as
rows (each has its positive), and every sample that has the column modality as a candidate (negative).
A pair no sample has is skipped. SigLIP: every (i, j) with ``x_i`` and ``y_j`` present is a term,
positive iff ``i == j``; the sum is divided by the number of present ``x`` rows.

Local-loss form (distributed): pass this rank's rows ``x, y`` ``[N_local, D]``, the gathered
``x_all, y_all`` ``[N_global, D]`` and ``offset``, the index of this rank's first row in the gathered
tensors; row i's target is column ``offset + i``. The returned value is then the mean over this rank's
rows; with equal local batch sizes (and no masks) the mean over ranks equals the global-batch loss.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcl.config import ClipConfig, SiglipConfig
from mmcl.objectives.base import (Batch, Objective, ce_rows, check_embeddings, check_score_inputs, check_shapes,
                                  common_options, diagonal_ce, full_precision, local_form, mask_columns, mean_terms,
                                  mean_valid, register_objective)


def _local_slice(mask: Tensor | None, offset: int, n: int) -> Tensor | None:
    return None if mask is None else mask[offset:offset + n]


def _both(x_present: Tensor | None, y_present: Tensor | None) -> Tensor | None:
    if x_present is None:
        return y_present
    if y_present is None:
        return x_present
    return x_present & y_present


def clip_rows(x: Tensor, y: Tensor, x_all: Tensor, y_all: Tensor, offset: int, logit_scale: Tensor | float,
              x_present: Tensor | None = None, y_present: Tensor | None = None) -> Tensor:
    """Per-row CLIP loss ``[N_local]``: ``(CE(s x_i . Y_all) + CE(s y_i . X_all)) / 2``.

    Args:
        x, y: ``[N_local, D]`` local rows; x_all, y_all: ``[N_global, D]``; offset: first local row's
            global index.
        x_present, y_present: optional bool ``[N_global]``; absent columns are no candidates. Rows
            lacking x or y come out as garbage (possibly huge) and must be excluded by the caller.
    """
    logits = logit_scale * x @ y_all.T
    if x_all is x and y_all is y:  # not gathered: S^T is the other direction
        return diagonal_ce(logits, y_present, x_present)
    xy = mask_columns(logits, y_present)
    yx = mask_columns(logit_scale * y @ x_all.T, x_present)
    return (ce_rows(xy, offset) + ce_rows(yx, offset)) / 2


def siglip_rows(x: Tensor, y_all: Tensor, offset: int, logit_scale: Tensor | float,
                logit_bias: Tensor | float, y_present: Tensor | None = None) -> Tensor:
    """Per-row SigLIP loss ``[N_local]``: ``-sum_j log sigmoid(z_ij (s x_i . y_j + b))``.

    Args:
        x: ``[N_local, D]``; y_all: ``[N_global, D]``; offset: first local row's global index (the positive
            of row i is column ``offset + i``).
        y_present: optional bool ``[N_global]``; absent columns contribute nothing.
    """
    logits = logit_scale * x @ y_all.T + logit_bias
    sign = -torch.ones_like(logits)
    rows = torch.arange(x.shape[0], device=x.device)
    sign[rows, offset + rows] = 1.0
    terms = -F.logsigmoid(sign * logits)
    if y_present is not None:
        terms = terms * y_present
    return terms.sum(1)


def _zero_absent(x: Tensor, present: Tensor | None) -> Tensor:
    return x if present is None else torch.where(present[:, None], x, torch.zeros_like(x))


def _checked_pair(x: Tensor, y: Tensor, offset: int, x_present: Tensor | None,
                  y_present: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Validate the local rows of a functional call; returns ``x, y`` with absent rows zeroed and the
    local masks ``xp, yp`` (None = all present)."""
    check_shapes([x, y], ["x", "y"])
    xp = _local_slice(x_present, offset, x.shape[0])
    yp = _local_slice(y_present, offset, y.shape[0])
    mask = None
    if xp is not None or yp is not None:
        ones = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        mask = torch.stack([ones if xp is None else xp, ones if yp is None else yp], 1)
    check_embeddings([x, y], ["x", "y"], mask)
    return _zero_absent(x, xp), _zero_absent(y, yp), xp, yp


def _checked_all(local: Tensor, gathered: Tensor | None, offset: int, present: Tensor | None) -> Tensor:
    full = local_form(local.shape[0], gathered, offset, local)
    if present is not None and (present.dtype != torch.bool or present.shape != (full.shape[0],)):
        raise ValueError(f"present mask must be bool [{full.shape[0]}] (one per global row), got "
                         f"{present.dtype} {tuple(present.shape)}")
    return _zero_absent(full, present)


@full_precision
def clip_loss(x: Tensor, y: Tensor, logit_scale: Tensor | float, *, x_all: Tensor | None = None,
              y_all: Tensor | None = None, offset: int = 0, x_present: Tensor | None = None,
              y_present: Tensor | None = None) -> Tensor:
    """Symmetric CLIP / InfoNCE loss ``(CE(S, I) + CE(S^T, I)) / 2`` with ``S = s X Y^T``.

    Args:
        x, y: ``[N, D]`` L2-normalised embeddings (local rows in the local-loss form).
        logit_scale: the multiplier ``s = exp(t)`` (scalar tensor or float).
        x_all, y_all: ``[N_global, D]`` gathered embeddings for the local-loss form (default: x, y).
        offset: global index of the first local row (target of row i is ``offset + i``).
        x_present, y_present: optional bool ``[N_global]`` masks; rows need both, candidates their own;
            absent rows may hold anything.

    Returns:
        Scalar: the mean over the (local, valid) rows.
    """
    x, y, xp, yp = _checked_pair(x, y, offset, x_present, y_present)
    x_all = _checked_all(x, x_all, offset, x_present)
    y_all = _checked_all(y, y_all, offset, y_present)
    rows = clip_rows(x, y, x_all, y_all, offset, logit_scale, x_present, y_present)
    return mean_valid(rows, _both(xp, yp))


@full_precision
def siglip_loss(x: Tensor, y: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float, *,
                y_all: Tensor | None = None, offset: int = 0, x_present: Tensor | None = None,
                y_present: Tensor | None = None) -> Tensor:
    """SigLIP loss ``-(1/N) sum_ij log sigmoid(z_ij (s x_i . y_j + b))``.

    Args:
        x, y: ``[N, D]`` L2-normalised embeddings (local rows in the local-loss form).
        logit_scale: the multiplier ``s``; logit_bias: ``b``.
        y_all: ``[N_global, D]`` gathered ``y`` for the local-loss form (local x rows against all y; the
            sum over ranks covers every pair once).
        offset: global index of the first local row.
        x_present, y_present: optional bool ``[N_global]`` masks (pairs with both present count).

    Returns:
        Scalar: the sum over local terms divided by the number of local present x rows.
    """
    x, y, xp, _ = _checked_pair(x, y, offset, x_present, y_present)
    y_all = _checked_all(y, y_all, offset, y_present)
    rows = siglip_rows(x, y_all, offset, logit_scale, logit_bias, y_present)
    return mean_valid(rows, xp)


class PairwiseObjective(Objective):
    """Pairwise loss over several modalities (``all_pairs`` or ``anchor`` mode); cosine scores.

    Args:
        modalities: modality names; mode: ``"all_pairs"`` or ``"anchor"``; anchor: the anchor modality.
        Other keywords: see :class:`Objective`.
    """

    score_kind = "cosine"

    def __init__(self, modalities: Sequence[str], *, mode: str = "all_pairs", anchor: str = "text",
                 **kwargs) -> None:
        super().__init__(modalities, **kwargs)
        if mode not in ("all_pairs", "anchor"):
            raise ValueError(f"mode must be 'all_pairs' or 'anchor', got {mode!r}")
        if mode == "anchor" and anchor not in self.modalities:
            raise ValueError(f"anchor {anchor!r} is not one of the modalities {self.modalities}")
        self.mode = mode
        self.anchor = anchor

    def pairs(self, names: Sequence[str]) -> list[tuple[int, int]]:
        """Index pairs into ``names`` that form the loss terms."""
        if self.mode == "all_pairs":
            return list(itertools.combinations(range(len(names)), 2))
        if self.anchor not in names:
            raise ValueError(f"anchor mode needs the anchor {self.anchor!r} among the embeddings {list(names)}")
        a = names.index(self.anchor)
        return [(a, k) for k in range(len(names)) if k != a]

    def pair_rows(self, batch: Batch, a: int, b: int) -> tuple[Tensor, Tensor | None]:
        """Per-row losses ``[N_local]`` of pair (a, b) and the global rows that count (bool or None)."""
        raise NotImplementedError

    def loss(self, batch: Batch) -> Tensor:
        terms = []
        for a, b in self.pairs(batch.names):
            rows, valid = self.pair_rows(batch, a, b)
            terms.append(batch.reduce(rows, valid))
        return mean_terms(terms, f"{type(self).__name__} ({self.mode})")

    def score(self, query: dict[str, Tensor], candidates: dict[str, Tensor]) -> Tensor:
        """Cosine of the normalised sums of the query and of the candidate modalities, ``[Nq, Nc]``."""
        q, c = check_score_inputs(query, candidates)
        return F.normalize(sum(q), dim=-1) @ F.normalize(sum(c), dim=-1).T


class ClipObjective(PairwiseObjective):
    """CLIP / InfoNCE (``logit_scale`` = log s, init ``log(1/0.07)`` unless given)."""

    def __init__(self, modalities: Sequence[str], *, init_logit_scale: float = 1 / 0.07,
                 learn_logit_scale: bool = True, **kwargs) -> None:
        super().__init__(modalities, **kwargs)
        self.logit_scale = self._log_parameter(init_logit_scale, learn_logit_scale)

    def pair_rows(self, batch: Batch, a: int, b: int) -> tuple[Tensor, Tensor | None]:
        pa, pb = (None, None) if batch.present is None else (batch.present[:, a], batch.present[:, b])
        rows = clip_rows(batch.local[a], batch.local[b], batch.full[a], batch.full[b], batch.offset,
                         self.logit_scale.exp(), pa, pb)
        return rows, _both(pa, pb)


class SiglipObjective(PairwiseObjective):
    """SigLIP (``logit_scale`` = log s, init ``log 10``; ``logit_bias`` init -10, learned iff the scale is).
    Pair (m, n) uses m as rows against all n (the sum over all (i, j) pairs covers both directions)."""

    scalars = ("logit_scale", "logit_bias")

    def __init__(self, modalities: Sequence[str], *, init_logit_scale: float = 10.0,
                 learn_logit_scale: bool = True, init_logit_bias: float = -10.0, **kwargs) -> None:
        super().__init__(modalities, **kwargs)
        self.logit_scale = self._log_parameter(init_logit_scale, learn_logit_scale)
        self.logit_bias = torch.nn.Parameter(torch.tensor(float(init_logit_bias)), requires_grad=learn_logit_scale)

    def pair_rows(self, batch: Batch, a: int, b: int) -> tuple[Tensor, Tensor | None]:
        pa, pb = (None, None) if batch.present is None else (batch.present[:, a], batch.present[:, b])
        rows = siglip_rows(batch.local[a], batch.full[b], batch.offset, self.logit_scale.exp(),
                           self.logit_bias, pb)
        return rows, pa

    def log_tensors(self) -> dict[str, Tensor]:
        return {**super().log_tensors(), "logit_bias": self.logit_bias.detach().clone().reshape(())}


@register_objective("clip")
def build_clip(cfg: ClipConfig, modalities: list[str], embed_dim: int | None) -> ClipObjective:
    return ClipObjective(modalities, mode=cfg.mode, anchor=cfg.anchor, init_logit_scale=cfg.init_logit_scale,
                         learn_logit_scale=cfg.learn_logit_scale, **common_options(cfg, embed_dim))


@register_objective("siglip")
def build_siglip(cfg: SiglipConfig, modalities: list[str], embed_dim: int | None) -> SiglipObjective:
    return SiglipObjective(modalities, mode=cfg.mode, anchor=cfg.anchor, init_logit_scale=cfg.init_logit_scale,
                           learn_logit_scale=cfg.learn_logit_scale, init_logit_bias=cfg.init_logit_bias,
                           **common_options(cfg, embed_dim))
