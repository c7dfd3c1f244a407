"""Cross-modal retrieval in any direction (one or several query / candidate modalities)."""

from __future__ import annotations

import torch

from mmcl.eval.metrics import attribute_match, map_at_k, retrieval_metrics
from mmcl.eval.zeroshot import score


@torch.no_grad()
def retrieval(model, query: dict[str, torch.Tensor], candidates: dict[str, torch.Tensor], positives: torch.Tensor,
              same_attrs: torch.Tensor | None = None, map_k: int = 0) -> tuple[dict, torch.Tensor]:
    """Queries ``{modality: [Nq, D]}`` against candidates ``{modality: [Nc, D]}``.

    ``positives`` bool ``[Nq, Nc]`` marks each query's true candidates (several per row allowed: a query
    counts as retrieved when any of its positives is). ``same_attrs [Nq, Nc]``: candidates
    indistinguishable from the true one by the judged attributes, for the attribute-match R@1 and the tie
    ceiling. ``map_k``: also ``mAP@K`` (:func:`mmcl.eval.metrics.map_at_k`). Returns (metrics, scores
    ``[Nq, Nc]``).
    """
    scores = score(model, query, candidates)
    metrics = retrieval_metrics(scores, positives)
    if same_attrs is not None:
        metrics.update(attribute_match(scores, same_attrs))
    if map_k:
        metrics[f"mAP@{map_k}"] = map_at_k(scores, positives, map_k)
    return metrics, scores
