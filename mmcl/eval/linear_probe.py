"""Linear probe: multinomial logistic regression on frozen embeddings, its L2 weight decay picked on a
held-out part of the training split, then refit on the whole training split and scored on the test split.

Full-batch L-BFGS in float64 on the CPU: deterministic, and exact enough that the weight-decay search
compares converged fits rather than optimiser noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcl.eval.metrics import classification_metrics

DEFAULT_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float,
                            max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``mean CE(x W + b, y) + weight_decay / 2 * ||W||^2``; returns ``(W [D, C], b [C])``."""
    x = x.double()
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 n_classes: int, weight_decays: list[float] | tuple[float, ...] = DEFAULT_WEIGHT_DECAYS,
                 val_fraction: float = 0.2, seed: int = 0) -> tuple[dict[str, float], torch.Tensor]:
    """Pick the weight decay by validation acc1 on a seeded ``val_fraction`` of the training rows (the
    first best in ``weight_decays`` wins a tie), refit on all of them, score ``test_x``.

    Returns (classification metrics + ``weight_decay`` and ``n_train``, test scores ``[N_test, C]``).
    """
    n = train_x.shape[0]
    best = weight_decays[0]
    if len(weight_decays) > 1:
        n_val = max(1, round(n * val_fraction))
        if n - n_val < 1:
            raise ValueError(f"linear probe: {n} training sample(s) cannot be split for the weight-decay search")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        fit, val = order[n_val:], order[:n_val]
        best_acc = -1.0
        for wd in weight_decays:
            w, b = fit_logistic_regression(train_x[fit], train_y[fit], n_classes, wd)
            acc = classification_metrics(train_x[val].double() @ w + b, train_y[val], n_classes)["acc1"]
            if acc > best_acc:
                best, best_acc = wd, acc
    w, b = fit_logistic_regression(train_x, train_y, n_classes, best)
    scores = (test_x.double() @ w + b).float()
    metrics = classification_metrics(scores, test_y, n_classes)
    metrics.update({"weight_decay": float(best), "n_train": n})
    return metrics, scores
