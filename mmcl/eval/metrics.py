"""Metrics named as CLIP_benchmark names them, computed from score matrices (higher = better).

Ties are broken uniformly at random, and every metric is its *expectation* over that choice: a model
whose scores are all equal gets chance-level numbers, never a perfect score because the true candidate
came first in the list, nor zero because it came last. Without ties this is the plain metric.
"""

from __future__ import annotations

import math

import torch


def _first_hit_within(k: torch.Tensor | float, ahead: torch.Tensor, tied: torch.Tensor,
                      tied_pos: torch.Tensor) -> torch.Tensor:
    """P(the first positive sits at rank <= k) when ``ahead`` candidates score strictly higher than the
    best positive and ``tied`` candidates (``tied_pos`` of them positives) share its score, their order
    uniformly random: ``1 - C(tied - tied_pos, j) / C(tied, j)`` with ``j = k - ahead`` slots left."""
    ahead, tied, tied_pos = ahead.double(), tied.double(), tied_pos.double()
    j = (torch.as_tensor(k, dtype=torch.float64) - ahead).clamp(min=0.0)
    neg = tied - tied_pos
    j_safe = torch.minimum(j, neg)  # C(neg, j) = 0 beyond neg (then the probability is 1)
    log_miss = (torch.lgamma(neg + 1) - torch.lgamma(neg - j_safe + 1)
                - torch.lgamma(tied + 1) + torch.lgamma(tied - j_safe + 1))
    p = 1.0 - log_miss.exp()
    return torch.where(j > neg, torch.ones_like(p), torch.where(j <= 0, torch.zeros_like(p), p))


def _tie_counts(scores: torch.Tensor, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query: candidates strictly above the best positive, candidates tied with it, positives tied
    with it. ``scores [Nq, Nc]``, ``positives`` bool ``[Nq, Nc]`` with at least one per row."""
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one positive candidate")
    best = scores.masked_fill(~positives, -math.inf).max(dim=1).values[:, None]
    ahead = (scores > best).sum(dim=1)
    tied = scores == best
    return ahead, tied.sum(dim=1), (tied & positives).sum(dim=1)


def true_ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Expected 1-based rank of the best-ranked positive per query (float64 ``[Nq]``).

    With ``a`` candidates above it and ``t`` tied with it, ``p`` of them positives, the first of the ``p``
    positives in a random order of the ``t`` lands at ``(t + 1) / (p + 1)`` on average.
    """
    ahead, tied, tied_pos = _tie_counts(scores, positives)
    return ahead.double() + (tied.double() + 1) / (tied_pos.double() + 1)


def recall_at(scores: torch.Tensor, positives: torch.Tensor, ks: list[int] | tuple[int, ...]) -> torch.Tensor:
    """``[len(ks), Nq]``: per query, the probability that a positive is among the top K (CLIP_benchmark's
    recall: a query with several positives counts when any of them is retrieved)."""
    ahead, tied, tied_pos = _tie_counts(scores, positives)
    return torch.stack([_first_hit_within(k, ahead, tied, tied_pos) for k in ks])


def retrieval_metrics(scores: torch.Tensor, positives: torch.Tensor,
                      ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@K (any positive within the top K), median and mean rank of the first positive, ``n`` queries."""
    ranks = true_ranks(scores, positives)
    recalls = recall_at(scores, positives, ks)
    out: dict[str, float] = {f"R@{k}": recalls[i].mean().item() for i, k in enumerate(ks)}
    out.update({"median_rank": ranks.quantile(0.5).item(), "mean_rank": ranks.mean().item(),
                "n": int(ranks.numel())})
    return out


def recall_curve(scores: torch.Tensor, positives: torch.Tensor, max_k: int) -> list[float]:
    """Mean R@K for K = 1 .. ``max_k`` (the recall@K plot)."""
    ks = list(range(1, max_k + 1))
    return recall_at(scores, positives, ks).mean(dim=1).tolist()


def class_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """``[N, C]``: the probability that each class is the top-1 prediction (``1 / t`` for each of the
    ``t`` classes tied at the top score)."""
    top = scores == scores.max(dim=1, keepdim=True).values
    return top.double() / top.sum(dim=1, keepdim=True)


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict[str, float]:
    """``scores [N, C]``, ``labels [N]`` -> acc1, acc5 (NaN below 5 classes), mean_per_class_recall.

    Classes absent from ``labels`` are left out of the mean per-class recall.
    """
    n = labels.numel()
    positives = torch.nn.functional.one_hot(labels, n_classes).bool()
    hit1, hit5 = recall_at(scores, positives, (1, 5))
    recalls = [hit1[labels == c].mean().item() for c in range(n_classes) if bool((labels == c).any())]
    return {"acc1": hit1.mean().item(), "acc5": hit5.mean().item() if n_classes >= 5 else math.nan,
            "mean_per_class_recall": sum(recalls) / len(recalls), "n": n, "n_classes": n_classes}


def confusion_matrix(scores: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``[C, C]`` expected counts: row = true class, column = predicted class (ties split evenly)."""
    out = torch.zeros(n_classes, n_classes, dtype=torch.float64)
    return out.index_add_(0, labels, class_probabilities(scores))


def attribute_match(scores: torch.Tensor, same_attrs: torch.Tensor) -> dict[str, float]:
    """For worlds with ties: ``same_attrs [Nq, Nc]`` marks candidates that share every judged attribute
    with the query's true match. Returns the R@1 of matching attributes and the tie ceiling of exact R@1
    (the mean of ``1 / #tied candidates``: the best any model can do when tied candidates are
    indistinguishable)."""
    match = (class_probabilities(scores) * same_attrs.double()).sum(dim=1).mean().item()
    ceiling = (1.0 / same_attrs.sum(dim=1).double()).mean().item()
    return {"R@1_attribute_match": match, "R@1_tie_ceiling": ceiling}


def map_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int = 10, chunk: int = 256) -> float:
    """Mean over queries of AP@K = ``sum_{i <= K} rel_i * hits_i / i / min(positives, K)`` (DCASE's and
    AudioCaps' mAP@10; with one positive per query it is the mean of ``1 / rank`` over ranks <= K), as
    its expectation over uniformly random tie-breaking.

    Position ``i`` falls in a group of ``t`` tied candidates holding ``p`` positives, ``a`` positives
    ranked strictly above; it is a positive with probability ``p / t``, and given that, the hits up to it
    are ``a + 1 + (j - 1)(p - 1)/(t - 1)`` on average (``j``: its place in the group). ``scores``,
    ``positives`` ``[Nq, Nc]`` (bool, at least one positive per row).
    """
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one positive candidate")
    scores, positives = scores.double(), positives.bool()
    k = min(k, scores.shape[1])
    total = 0.0
    for start in range(0, scores.shape[0], chunk):
        s, pos = scores[start:start + chunk], positives[start:start + chunk]
        at = s.sort(dim=1, descending=True).values[:, :k, None]            # [q, K, 1] score at position i
        above, tied = s[:, None, :] > at, s[:, None, :] == at                # [q, K, Nc]
        n_above, t = above.sum(-1).double(), tied.sum(-1).double()
        a, p = (above & pos[:, None, :]).sum(-1).double(), (tied & pos[:, None, :]).sum(-1).double()
        i = torch.arange(1, k + 1, dtype=torch.float64)[None, :]
        j = i - n_above
        extra = torch.where(t > 1, (j - 1) * (p - 1).clamp(min=0) / (t - 1).clamp(min=1), torch.zeros_like(t))
        gain = (p / t) * (a + 1 + extra) / i
        norm = pos.sum(dim=1).double().clamp(max=k)
        total += (gain.sum(dim=1) / norm).sum().item()
    return total / scores.shape[0]


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per class, the average precision ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds
    (tied scores form one threshold), as scikit-learn's ``average_precision_score`` computes it, exactly
    (no threshold binning). ``scores [N, C]``, ``targets`` bool ``[N, C]`` -> float64 ``[C]``, NaN for a
    class with no positive."""
    s, order = scores.double().sort(dim=0, descending=True)
    y = targets.bool().gather(0, order).double()
    tp = y.cumsum(dim=0)
    rank = torch.arange(1, s.shape[0] + 1, dtype=torch.float64)[:, None]
    end = torch.ones_like(s, dtype=torch.bool)
    end[:-1] = s[:-1] != s[1:]                                               # last row of each tie group
    tp_end = torch.where(end, tp, torch.zeros_like(tp))
    before = torch.cat([torch.zeros_like(tp_end[:1]), tp_end.cummax(dim=0).values[:-1]])
    gained = torch.where(end, tp - before, torch.zeros_like(tp))           # positives this threshold adds
    n_pos = y.sum(dim=0)
    ap = (gained * tp / rank).sum(dim=0) / n_pos
    return torch.where(n_pos > 0, ap, torch.full_like(ap, math.nan))


def multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``scores [N, C]``, ``targets`` bool ``[N, C]`` -> ``mAP`` (mean AP over the classes with at least
    one positive, AudioSet's figure), ``n``, ``n_classes`` and ``n_classes_scored`` (those with a
    positive; the others have no defined AP and are left out)."""
    ap = average_precision(scores, targets)
    scored = ~ap.isnan()
    return {"mAP": ap[scored].mean().item() if bool(scored.any()) else math.nan, "n": int(scores.shape[0]),
            "n_classes": int(scores.shape[1]), "n_classes_scored": int(scored.sum())}
