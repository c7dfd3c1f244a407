"""Metrics named as CLIP_benchmark names them, computed from score matrices (higher = better)."""

from __future__ import annotations

import math

import torch


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict[str, float]:
    """``scores [N, C]``, ``labels [N]`` -> acc1, acc5 (NaN below 5 classes), mean_per_class_recall.

    Classes absent from ``labels`` are left out of the mean per-class recall.
    """
    n = labels.numel()
    top = scores.topk(min(5, n_classes), dim=1).indices
    hit = top == labels[:, None]
    acc1 = hit[:, 0].float().mean().item()
    acc5 = hit.any(dim=1).float().mean().item() if n_classes >= 5 else math.nan
    pred = top[:, 0]
    recalls = [(pred[labels == c] == c).float().mean().item() for c in range(n_classes) if (labels == c).any()]
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": sum(recalls) / len(recalls),
            "n": n, "n_classes": n_classes}


def true_ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best-ranked positive per query. ``scores [Nq, Nc]``, ``positives`` bool
    ``[Nq, Nc]``. A candidate scoring equal to the positive is not counted ahead of it."""
    best = scores.masked_fill(~positives, -math.inf).max(dim=1).values
    return (scores > best[:, None]).sum(dim=1) + 1


def retrieval_metrics(scores: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K (a query counts when any positive is within the top K), median and mean rank."""
    ranks = true_ranks(scores, positives).float()
    out = {f"R@{k}": (ranks <= k).float().mean().item() for k in ks}
    out.update({"median_rank": ranks.median().item(), "mean_rank": ranks.mean().item(), "n": int(ranks.numel())})
    return out


def attribute_match(scores: torch.Tensor, same_attrs: torch.Tensor) -> dict[str, float]:
    """For worlds with ties: ``same_attrs [Nq, Nc]`` marks candidates that share every judged attribute
    with the query's true match. Returns the R@1 of matching attributes and the tie ceiling of exact R@1
    (the mean of ``1 / #tied candidates``: the best any model can do when tied candidates are
    indistinguishable)."""
    top1 = scores.argmax(dim=1)
    match = same_attrs[torch.arange(scores.shape[0]), top1].float().mean().item()
    ceiling = (1.0 / same_attrs.sum(dim=1).float()).mean().item()
    return {"R@1_attribute_match": match, "R@1_tie_ceiling": ceiling}
