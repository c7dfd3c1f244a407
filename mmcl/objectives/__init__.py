"""Contrastive objectives over ``{modality: [N, D]}`` embeddings (DESIGN section 3).

Functional API (inputs L2-normalised ``[N, D]``; ``logit_scale`` is the multiplier ``s = exp(t)``,
``temperature`` GRAM's divisor): :func:`clip_loss`, :func:`siglip_loss`, :func:`symile_loss`, :func:`mip`,
:func:`gram_volume`, :func:`gram_loss`. Each loss also takes the local-loss form (this rank's rows, the
gathered tensors and the ``offset`` of this rank's first row) and optional ``present`` masks.

Module API: :class:`Objective` subclasses built from an objective's config (``mmcl.config.ObjectiveConfig``,
a tagged union on ``name``) by :func:`build_objective`, through :data:`OBJECTIVES`, which each objective's
file fills with one :func:`register_objective`; switching objective is config only. ``objective(emb, present)`` is the scalar
loss, ``objective.score(query, candidates)`` the ``[Nq, Nc]`` retrieval scores (higher = better),
``clamp_()`` and ``logs()`` serve the training loop. Conventions (masks, distributed normalisation,
precision) are in :mod:`mmcl.objectives.base`.
"""

from __future__ import annotations

from mmcl.objectives.base import OBJECTIVES, Objective, build_objective, register_objective
from mmcl.objectives.pairwise import ClipObjective, SiglipObjective, clip_loss, siglip_loss
from mmcl.objectives.symile import SymileObjective, mip, symile_loss
from mmcl.objectives.gram import GramObjective, gram_loss, gram_volume

__all__ = ["Objective", "build_objective", "register_objective", "OBJECTIVES", "clip_loss", "siglip_loss",
           "symile_loss", "mip", "gram_volume", "gram_loss", "ClipObjective", "SiglipObjective", "SymileObjective",
           "GramObjective"]
