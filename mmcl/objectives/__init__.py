"""Contrastive objectives over ``{modality: [N, D]}`` embeddings (DESIGN section 3).

Functional API (inputs L2-normalised ``[N, D]``; ``logit_scale`` is the multiplier ``s = exp(t)``,
``temperature`` GRAM's divisor): :func:`clip_loss`, :func:`siglip_loss`, :func:`symile_loss`, :func:`mip`,
:func:`gram_volume`, :func:`gram_loss`. Each loss also takes the local-loss form (this rank's rows, the
gathered tensors and the ``offset`` of this rank's first row) and optional ``present`` masks.

Module API: :class:`Objective` subclasses built from an :class:`~mmcl.config.ObjectiveConfig` by
:func:`build_objective`; switching objective is config only. ``objective(emb, present)`` is the scalar
loss, ``objective.score(query, candidates)`` the ``[Nq, Nc]`` retrieval scores (higher = better),
``clamp_()`` and ``logs()`` serve the training loop. Conventions (masks, distributed normalisation,
precision) are in :mod:`mmcl.objectives.base`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mmcl.config import ObjectiveConfig
from mmcl.objectives.base import Objective
from mmcl.objectives.pairwise import ClipObjective, SiglipObjective, clip_loss, siglip_loss
from mmcl.objectives.symile import SymileObjective, mip, symile_loss
from mmcl.objectives.gram import GramObjective, gram_loss, gram_volume


def _clip(cfg: ObjectiveConfig, modalities: Sequence[str], common: dict) -> Objective:
    return ClipObjective(modalities, mode=cfg.mode, anchor=cfg.anchor, init_logit_scale=cfg.init_logit_scale,
                         learn_logit_scale=cfg.learn_logit_scale, **common)


def _siglip(cfg: ObjectiveConfig, modalities: Sequence[str], common: dict) -> Objective:
    return SiglipObjective(modalities, mode=cfg.mode, anchor=cfg.anchor, init_logit_scale=cfg.init_logit_scale,
                           learn_logit_scale=cfg.learn_logit_scale, init_logit_bias=cfg.init_logit_bias, **common)


def _symile(cfg: ObjectiveConfig, modalities: Sequence[str], common: dict) -> Objective:
    return SymileObjective(modalities, negatives=cfg.negatives, init_logit_scale=cfg.init_logit_scale,
                           learn_logit_scale=cfg.learn_logit_scale, **common)


def _gram(cfg: ObjectiveConfig, modalities: Sequence[str], common: dict) -> Objective:
    return GramObjective(modalities, anchor=cfg.anchor, init_temperature=cfg.init_temperature,
                         learn_temperature=cfg.learn_logit_scale, **common)


#: Objective name -> builder(cfg, modalities, keyword arguments common to all objectives).
OBJECTIVES: dict[str, Callable[[ObjectiveConfig, Sequence[str], dict], Objective]] = {
    "clip": _clip,
    "siglip": _siglip,
    "symile": _symile,
    "gram": _gram,
}


def build_objective(cfg: ObjectiveConfig, modalities: Sequence[str], embed_dim: int | None = None) -> Objective:
    """The objective ``cfg.name`` over ``modalities`` (in that order).

    Args:
        cfg: the objective section of the config.
        modalities: the modality names the model embeds (at least 2).
        embed_dim: the embedding size ``D``; required only for ``cfg.missing == "learned"``.
    """
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.name!r} (available: {', '.join(sorted(OBJECTIVES))})")
    common = {"max_logit_scale": cfg.max_logit_scale, "missing": cfg.missing, "embed_dim": embed_dim,
              "gather": cfg.gather}
    return OBJECTIVES[cfg.name](cfg, list(modalities), common)


__all__ = ["Objective", "build_objective", "OBJECTIVES", "clip_loss", "siglip_loss", "symile_loss", "mip",
           "gram_volume", "gram_loss", "ClipObjective", "SiglipObjective", "SymileObjective", "GramObjective"]
