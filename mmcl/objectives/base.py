"""The :class:`Objective` base class, input checks and the gathered batch every objective computes on.

Conventions shared by all objectives:

* Embeddings come as ``{modality: [N, D]}``, L2-normalised (checked, see :func:`check_embeddings`).
* ``present`` masks come as ``{modality: bool [N]}``; a modality without a mask is present everywhere.
  Every sample needs at least two present modalities. Under ``missing: present`` the rows of absent
  modalities are ignored (they may hold anything, NaN included); under ``missing: learned`` they are
  replaced by a learned, L2-normalised per-modality embedding and the batch is then treated as complete.
  A fully present mask takes exactly the code path of no mask, so it gives exactly the same loss.
* Distributed: with an initialised process group of more than one rank (and ``gather`` on), embeddings
  and masks are gathered from all ranks (embeddings with gradient) and each rank computes its own rows
  against all columns. The returned loss is normalised so that **its mean over ranks is the loss of the
  global batch**; DDP's gradient averaging then yields the global-batch gradients.
* Losses are computed in float32 or float64 with autocast disabled (a product of several embeddings or a
  determinant loses too much in 16-bit): :meth:`Objective.forward` and the functional losses
  (:func:`full_precision`) upcast 16-bit inputs and turn autocast off.
* The training step calls ``objective(emb, present, check=False)``: no check that reads values back to the
  host (norms, per-sample counts), no host-side shortcut for a complete mask (the trainer drops masks that
  are complete on the host before the step, :func:`mmcl.train.step.to_device`), and terms without valid
  rows weighted out on the device (:class:`Term`); so the step never waits on the device. A term without any
  valid row then contributes nothing (a step where it is the only term has loss 0) instead of raising.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcl.config import ObjectiveConfig
from mmcl.objectives import gather

#: Allowed deviation of an embedding's L2 norm from 1, by dtype.
NORM_TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _upcast(value: Any) -> Any:
    if isinstance(value, Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
        return type(value)(_upcast(v) for v in value)
    return value


Fn = TypeVar("Fn", bound=Callable[..., Any])


def full_precision(fn: Fn) -> Fn:
    """Decorator of a functional loss: run ``fn`` with autocast off (CPU and CUDA) and its 16-bit tensor
    arguments (also inside lists) upcast to float32, so logits, logsumexp and determinants are fp32 even when
    called inside an autocast region."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*(_upcast(a) for a in args), **{k: _upcast(v) for k, v in kwargs.items()})
    return wrapper  # type: ignore[return-value]


def check_shapes(xs: Sequence[Tensor], names: Sequence[str], *, min_count: int = 2) -> None:
    """Raise ``ValueError`` unless there are ``min_count`` or more 2-D tensors sharing ``N``, ``D``, dtype and
    device."""
    if len(xs) < min_count:
        raise ValueError(f"need at least {min_count} modalities, got {len(xs)}: {list(names)}")
    shapes = ", ".join(f"{n}: {tuple(x.shape)}" for n, x in zip(names, xs))
    if any(x.dim() != 2 for x in xs):
        raise ValueError(f"embeddings must be 2-D [N, D]; got {shapes}")
    if len({x.shape[0] for x in xs}) > 1 or len({x.shape[1] for x in xs}) > 1:
        raise ValueError(f"embeddings must share N and D; got {shapes}")
    if len({x.dtype for x in xs}) > 1 or len({x.device for x in xs}) > 1:
        raise ValueError("embeddings must share dtype and device; got "
                         + ", ".join(f"{n}: {x.dtype} on {x.device}" for n, x in zip(names, xs)))


def check_embeddings(xs: Sequence[Tensor], names: Sequence[str], present: Tensor | None = None,
                     *, min_count: int = 2) -> None:
    """Raise ``ValueError`` unless the embeddings form one valid batch.

    Args:
        xs: ``min_count`` or more tensors, each ``[N, D]`` with the same ``N`` and ``D``.
        names: one name per tensor, used in messages.
        present: optional bool ``[N, len(xs)]``; the norms of absent rows are not checked.
        min_count: the least number of tensors allowed.

    Checks: the count, 2-D shapes, equal ``N`` and ``D``, a floating dtype, finite values and L2 norms
    within :data:`NORM_TOLERANCE` of 1.
    """
    check_shapes(xs, names, min_count=min_count)
    if not xs[0].is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {xs[0].dtype}")
    tol = NORM_TOLERANCE.get(xs[0].dtype, 1e-3)
    norms = torch.stack([x.detach().float().norm(dim=1) for x in xs], 1)  # [N, M]
    bad = ~((norms - 1).abs() <= tol)  # NaN norms count as bad
    if present is not None:
        bad &= present
    if bool(bad.any()):  # one host sync for all modalities
        i, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"embedding {names[k]!r} {tuple(xs[k].shape)} is not L2-normalised: row {i} has norm "
                         f"{norms[i, k].item():.6g} (tolerance {tol}); normalise it or mark it absent")


def check_present(present: Tensor, names: Sequence[str], n: int) -> None:
    """Raise ``ValueError`` unless ``present`` is bool ``[n, M]`` with >= 2 present modalities per row."""
    if present.dtype != torch.bool or present.shape != (n, len(names)):
        raise ValueError(f"present mask must be bool [{n}, {len(names)}] (modalities {list(names)}), got "
                         f"{present.dtype} {tuple(present.shape)}")
    few = (present.sum(1) < 2).nonzero().flatten()
    if few.numel():
        raise ValueError(f"{few.numel()} sample(s) have fewer than 2 present modalities (of {list(names)}), "
                         f"e.g. sample {int(few[0])}; a contrastive loss needs at least 2 per sample")


def local_form(n_local: int, x_all: Tensor | None, offset: int, local: Tensor) -> Tensor:
    """Check and resolve the local-loss arguments: returns the global ``[N_global, D]`` tensor.

    ``x_all`` None means no gathering (the local batch is the global batch, ``offset`` must be 0).
    """
    if x_all is None:
        if offset != 0:
            raise ValueError(f"offset={offset} given without the gathered tensor")
        return local
    if x_all.dim() != 2 or x_all.shape[1] != local.shape[1]:
        raise ValueError(f"gathered embeddings {tuple(x_all.shape)} do not match local {tuple(local.shape)}")
    if not 0 <= offset <= x_all.shape[0] - n_local:
        raise ValueError(f"offset={offset} with {n_local} local rows does not fit in {x_all.shape[0]} "
                         f"gathered rows")
    return x_all


def mean_valid(rows: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of ``rows`` ``[N]`` over ``valid`` (bool ``[N]``, None = all); rows outside may be inf."""
    if valid is None:
        return rows.mean()
    if not bool(valid.any()):
        raise ValueError("no sample has the modalities this loss needs (all rows masked out)")
    return torch.where(valid, rows, torch.zeros_like(rows)).sum() / valid.sum()


def mask_columns(logits: Tensor, keep: Tensor | None) -> Tensor:
    """Give the columns outside ``keep`` (bool ``[N_cols]``) a logit so low that softmax ignores them.

    A finite fill (not -inf) keeps rows with no valid column, which are excluded anyway, free of NaN.
    """
    if keep is None:
        return logits
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)


def diagonal_ce(logits: Tensor, col_keep: Tensor | None = None, row_keep: Tensor | None = None) -> Tensor:
    """``(CE(S_i., i) + CE(S_.i, i)) / 2`` per index i of a square ``[N, N]`` logits matrix: ``[N]``.

    Both directions from one matrix (log-softmax over dim 1 and over dim 0, no transposed copy).
    ``col_keep`` / ``row_keep`` (bool ``[N]``) drop candidates of the row / column direction.
    """
    by_row = torch.log_softmax(mask_columns(logits, col_keep), dim=1).diagonal()
    by_col = torch.log_softmax(mask_columns(logits.T, row_keep).T, dim=0).diagonal()
    return -(by_row + by_col) / 2


def ce_rows(logits: Tensor, offset: int) -> Tensor:
    """Cross-entropy per row, ``[N_local, N_global] -> [N_local]``, target of row i is ``offset + i``."""
    target = offset + torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, target, reduction="none")


class Term(NamedTuple):
    """A loss term computed without a host sync: ``value`` (0 when no row counted) and ``weight`` (1.0 when
    some row counted, else 0.0), both 0-dim device tensors."""

    value: Tensor
    weight: Tensor


@dataclass
class Batch:
    """The embeddings an objective computes on, after checks, missing-handling and gathering.

    Attributes:
        names: the modalities, in the objective's order.
        local: ``[N_local, D]`` per modality (this rank's rows; absent rows zeroed).
        full: ``[N_global, D]`` per modality (all ranks' rows; ``local`` itself without gathering).
        present: bool ``[N_global, M]`` or None when every modality of every sample is present.
        offset: index of this rank's first row in ``full``.
        world_size: number of ranks the batch was gathered from.
        lazy: computed without host syncs (``check=False``): :meth:`reduce` returns :class:`Term` s.
    """

    names: list[str]
    local: list[Tensor]
    full: list[Tensor]
    present: Tensor | None
    offset: int
    world_size: int
    lazy: bool = False

    @property
    def n_local(self) -> int:
        return self.local[0].shape[0]

    def present_local(self) -> Tensor | None:
        """bool ``[N_local, M]`` or None."""
        if self.present is None:
            return None
        return self.present[self.offset:self.offset + self.n_local]

    def reduce(self, rows: Tensor, valid: Tensor | None) -> Tensor | Term | None:
        """Normalise per-row losses of the local rows so that the mean over ranks is the global mean.

        Args:
            rows: ``[N_local]`` per-row losses (may be inf outside ``valid``).
            valid: bool ``[N_global]`` rows that count (None = all).

        Returns:
            ``sum(rows[valid_local]) * world_size / count(valid)``, or None when no row counts globally; a
            :class:`Term` when ``lazy`` and ``valid`` is given (the count stays on the device).
        """
        if valid is None:
            return rows.sum() * (self.world_size / self.full[0].shape[0])
        if self.lazy:
            mine = valid[self.offset:self.offset + self.n_local]
            count = valid.sum()
            value = torch.where(mine, rows, torch.zeros_like(rows)).sum() * self.world_size / count.clamp(min=1)
            return Term(value, (count > 0).to(value.dtype))
        count = int(valid.sum())
        if count == 0:
            return None
        mine = valid[self.offset:self.offset + self.n_local]
        return torch.where(mine, rows, torch.zeros_like(rows)).sum() * (self.world_size / count)


def mean_terms(terms: Sequence[Tensor | Term | None], what: str) -> Tensor:
    """Mean of the loss terms that exist (a term is None when no sample had its modalities; a
    :class:`Term` counts by its weight, on the device)."""
    if any(isinstance(t, Term) for t in terms):
        parts = [t if isinstance(t, Term) else Term(t, torch.ones_like(t)) for t in terms if t is not None]
        values, weights = torch.stack([t.value for t in parts]), torch.stack([t.weight for t in parts])
        return (values * weights).sum() / weights.sum().clamp(min=1)
    kept = [t for t in terms if t is not None]
    if not kept:
        raise ValueError(f"no sample has the modalities {what} needs")
    return torch.stack(kept).mean()


class Objective(nn.Module):
    """A contrastive objective over ``{modality: [N, D]}`` embeddings.

    Subclasses implement :meth:`loss` (the scalar loss of a prepared batch) and :meth:`score` (retrieval
    scores, higher = better) and set :attr:`score_kind`. The learnable scale lives in log space as
    ``logit_scale`` (or ``log_temperature``); :attr:`scalars` names it (and a bias) for
    :meth:`no_weight_decay`.

    Args:
        modalities: the modality names this objective accepts, in a fixed order.
        max_logit_scale: upper bound for the scale ``s`` (lower bound ``1 / max`` for a temperature).
        missing: ``"present"`` or ``"learned"`` (see the module docstring).
        embed_dim: ``D``, needed only for ``missing="learned"``.
        gather: gather embeddings across ranks when distributed.
    """

    score_kind: str
    #: The objective's scalar parameters (never weight-decayed).
    scalars: tuple[str, ...] = ("logit_scale",)

    def __init__(self, modalities: Sequence[str], *, max_logit_scale: float = 100.0,
                 missing: str = "present", embed_dim: int | None = None, gather: bool = True):
        super().__init__()
        if len(modalities) < 2 or len(set(modalities)) != len(modalities):
            raise ValueError(f"an objective needs at least 2 distinct modalities, got {list(modalities)}")
        if missing not in ("present", "learned"):
            raise ValueError(f"missing must be 'present' or 'learned', got {missing!r}")
        self.modalities = list(modalities)
        self.max_logit_scale = float(max_logit_scale)
        self.missing = missing
        self.gather = gather
        if missing == "learned":
            if embed_dim is None:
                raise ValueError("missing='learned' needs embed_dim (build_objective(..., embed_dim=D))")
            self.missing_embedding = nn.ParameterDict(
                {m: nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0)) for m in self.modalities})

    # -- parameters ------------------------------------------------------------------------------------
    @staticmethod
    def _log_parameter(value: float, learn: bool) -> nn.Parameter:
        return nn.Parameter(torch.tensor(math.log(value)), requires_grad=learn)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters an optimizer must not weight-decay (as timm's / open_clip's): the scalars
        and the learned missing embeddings."""
        names = set(self.scalars)
        if self.missing == "learned":
            names |= {f"missing_embedding.{m}" for m in self.modalities}
        return names

    def clamp_(self) -> None:
        """Clamp the scale in place (``s <= max_logit_scale``); call after each optimizer step."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(self.max_logit_scale))

    def log_tensors(self) -> dict[str, Tensor]:
        """Scalars worth logging as detached 0-dim tensors (read from the device together with the loss),
        e.g. ``{"logit_scale": s}``."""
        return {"logit_scale": self.logit_scale.detach().exp().reshape(())}

    def logs(self) -> dict[str, float]:
        """:meth:`log_tensors` as floats (one host read for all)."""
        tensors = self.log_tensors()
        return dict(zip(tensors, torch.stack([v.float() for v in tensors.values()]).tolist()))

    # -- inputs ----------------------------------------------------------------------------------------
    def order(self, names: Sequence[str]) -> list[str]:
        """``names`` in this objective's modality order; ``ValueError`` for unknown ones."""
        unknown = [n for n in names if n not in self.modalities]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; this objective was built for {self.modalities}")
        return [m for m in self.modalities if m in names]

    def prepare(self, emb: dict[str, Tensor], present: dict[str, Tensor] | None, check: bool = True,
                sizes: list[int] | None = None) -> Batch:
        """Check ``emb``/``present``, handle missing rows, upcast and gather: the :class:`Batch` to use.
        ``check=False``: no check or shortcut that reads values back to the host (see the module doc);
        ``sizes``: every rank's local batch size when known (else exchanged, :func:`gather.all_gather_rows`)."""
        names = self.order(list(emb))
        xs = [emb[m] for m in names]
        check_shapes(xs, names)
        n = xs[0].shape[0]
        mask = None
        if present:
            extra = [m for m in present if m not in emb]
            if extra:
                raise ValueError(f"present masks for modalities without embeddings: {extra}")
            for m, p in present.items():
                if p.dtype != torch.bool or p.shape != (n,):
                    raise ValueError(f"present mask for {m!r} must be bool [{n}], got {p.dtype} {tuple(p.shape)}")
            mask = torch.stack([present[m].to(xs[0].device) if m in present
                                else torch.ones(n, dtype=torch.bool, device=xs[0].device) for m in names], 1)
            if check:
                check_present(mask, names, n)
        if check:
            check_embeddings(xs, names, mask)
        if any(x.dtype in (torch.float16, torch.bfloat16) for x in xs):
            xs = [x.float() for x in xs]
        if mask is not None:
            if self.missing == "learned":
                xs = [torch.where(mask[:, k, None], x, F.normalize(self.missing_embedding[m], dim=0).to(x))
                      for k, (m, x) in enumerate(zip(names, xs))]
                mask = None
            else:
                xs = [torch.where(mask[:, k, None], x, torch.zeros_like(x)) for k, x in enumerate(xs)]
        ws = gather.world_size() if self.gather else 1
        if ws == 1:
            full, offset = xs, 0
            mask_full = mask
        else:
            sizes = sizes or gather.local_sizes(n, xs[0].device)  # one exchange for both gathers
            stacked, offset = gather.all_gather_rows(torch.stack(xs, 1), sizes=sizes)
            full = list(stacked.unbind(1))
            if mask is None:
                mask = torch.ones(n, len(names), dtype=torch.bool, device=xs[0].device)
            mask_full, _ = gather.all_gather_rows(mask.to(torch.uint8), grad=False, sizes=sizes)
            mask_full = mask_full.bool()
        if check and mask_full is not None and bool(mask_full.all()):
            mask_full = None
        return Batch(names, xs, full, mask_full, offset, ws, lazy=not check)

    # -- API -------------------------------------------------------------------------------------------
    def forward(self, emb: dict[str, Tensor], present: dict[str, Tensor] | None = None, *, check: bool = True,
                sizes: list[int] | None = None) -> Tensor:
        """Scalar loss for ``emb`` ``{modality: [N, D]}`` with optional ``present`` ``{modality: bool [N]}``.

        Autocast is disabled inside; 16-bit embeddings are upcast to float32. ``check=False`` (the training
        step): nothing reads device values back to the host (see the module doc). ``sizes``: every rank's
        local batch size, when the caller knows them (saves their exchange when distributed).
        """
        device_type = next(iter(emb.values())).device.type if emb else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return self.loss(self.prepare(emb, present, check, sizes))

    def loss(self, batch: Batch) -> Tensor:
        """The scalar loss of a prepared batch (local rows against the gathered columns)."""
        raise NotImplementedError

    def score(self, query: dict[str, Tensor], candidates: dict[str, Tensor]) -> Tensor:
        """Retrieval scores ``[Nq, Nc]`` of ``query`` ``{mod: [Nq, D]}`` against ``candidates``
        ``{mod: [Nc, D]}``; higher = better match."""
        raise NotImplementedError


def check_score_inputs(query: dict[str, Tensor], candidates: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Validate the two sides of :meth:`Objective.score`; returns their tensors (float32 at least)."""
    sides = []
    for side, d in (("query", query), ("candidates", candidates)):
        if not d:
            raise ValueError(f"score(): {side} needs at least one modality")
        xs = list(d.values())
        check_embeddings(xs, [f"{side}.{m}" for m in d], min_count=1)
        sides.append([x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs])
    q, c = sides
    if q[0].shape[1] != c[0].shape[1]:
        raise ValueError(f"score(): query dim {q[0].shape[1]} != candidate dim {c[0].shape[1]}")
    return q, c


#: Objective name -> builder(its config, modalities, embed_dim); one registration per objective file.
OBJECTIVES: dict[str, Callable[[Any, list[str], int | None], Objective]] = {}

Builder = TypeVar("Builder", bound=Callable[..., Objective])


def register_objective(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(cfg, modalities, embed_dim) -> Objective`` under ``objective.name``."""
    def register(builder: Builder) -> Builder:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered twice")
        OBJECTIVES[name] = builder
        return builder
    return register


def common_options(cfg: ObjectiveConfig, embed_dim: int | None) -> dict[str, Any]:
    """The :class:`Objective` keywords every objective's config carries."""
    return {"max_logit_scale": cfg.max_logit_scale, "missing": cfg.missing, "embed_dim": embed_dim,
            "gather": cfg.gather}


def build_objective(cfg: ObjectiveConfig, modalities: Sequence[str], embed_dim: int | None = None) -> Objective:
    """The objective ``cfg.name`` over ``modalities`` (in that order).

    Args:
        cfg: the objective section of the config.
        modalities: the modality names the model embeds (at least 2).
        embed_dim: the embedding size ``D``; required only for ``cfg.missing == "learned"``.
    """
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.name!r} (available: {', '.join(sorted(OBJECTIVES))})")
    return OBJECTIVES[cfg.name](cfg, list(modalities), embed_dim)
