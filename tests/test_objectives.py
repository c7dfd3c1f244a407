"""Objectives against independent float64 reference implementations (loops, explicit enumeration)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.config import ObjectiveConfig
from mmcl.objectives import build_objective, clip_loss, siglip_loss

MODS = ["video", "audio", "text"]


def unit(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def leaves(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.detach().clone().requires_grad_(True) for x in xs]


def grads_of(loss: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, xs))


def assert_close(a, b, tol: float = 1e-9) -> None:
    if isinstance(a, (list, tuple)):
        for u, v in zip(a, b):
            assert_close(u, v, tol)
        return
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------
# references: explicit loops


def ref_ce(scores: list[torch.Tensor], target: int) -> torch.Tensor:
    return torch.logsumexp(torch.stack(scores), 0) - scores[target]


def ref_clip(x, y, s, cols_x=None, cols_y=None, rows=None) -> torch.Tensor:
    n = x.shape[0]
    rows = range(n) if rows is None else rows
    cols_x = range(n) if cols_x is None else cols_x
    cols_y = range(n) if cols_y is None else cols_y
    total = 0
    for i in rows:
        xy = [s * torch.dot(x[i], y[j]) for j in cols_y]
        yx = [s * torch.dot(y[i], x[j]) for j in cols_x]
        total = total + (ref_ce(xy, list(cols_y).index(i)) + ref_ce(yx, list(cols_x).index(i))) / 2
    return total / len(rows)


def ref_siglip(x, y, s, b) -> torch.Tensor:
    n = x.shape[0]
    total = 0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (s * torch.dot(x[i], y[j]) + b))
    return total / n


# ---------------------------------------------------------------------------------------------------
# CLIP / SigLIP


def test_clip_loss_matches_reference_values_and_grads():
    x, y = leaves(unit(7, 5, 0), unit(7, 5, 1))
    s = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)
    got = clip_loss(x, y, s)
    ref = ref_clip(x, y, s)
    assert_close(got, ref)
    assert_close(grads_of(got, [x, y, s]), grads_of(ref, [x, y, s]))


def test_siglip_loss_matches_reference_values_and_grads():
    x, y = leaves(unit(6, 4, 2), unit(6, 4, 3))
    s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    got = siglip_loss(x, y, s, b)
    ref = ref_siglip(x, y, s, b)
    assert_close(got, ref)
    assert_close(grads_of(got, [x, y, s, b]), grads_of(ref, [x, y, s, b]))


@pytest.mark.parametrize("mode", ["all_pairs", "anchor"])
def test_clip_objective_multimodal_modes(mode):
    xs = leaves(*(unit(6, 5, 10 + k) for k in range(3)))
    obj = build_objective(ObjectiveConfig(name="clip", mode=mode, anchor="text"), MODS).double()
    got = obj(dict(zip(MODS, xs)))
    s = obj.logit_scale.exp()
    pairs = list(itertools.combinations(range(3), 2)) if mode == "all_pairs" else [(2, 0), (2, 1)]
    ref = sum(ref_clip(xs[a], xs[b], s) for a, b in pairs) / len(pairs)
    assert_close(got, ref)
    assert_close(grads_of(got, xs + [obj.logit_scale]), grads_of(ref, xs + [obj.logit_scale]))


def test_clip_objective_defaults_and_clamp():
    obj = build_objective(ObjectiveConfig(name="clip"), MODS)
    assert obj.score_kind == "cosine"
    assert obj.logs()["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        obj.logit_scale.fill_(math.log(1000.0))
    obj.clamp_()
    assert obj.logs()["logit_scale"] == pytest.approx(100.0, rel=1e-6)
    sig = build_objective(ObjectiveConfig(name="siglip"), MODS)
    assert sig.logs() == pytest.approx({"logit_scale": 10.0, "logit_bias": -10.0})
    assert {n for n, _ in sig.named_parameters()} == {"logit_scale", "logit_bias"}
