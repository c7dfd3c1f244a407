"""Objectives against independent float64 reference implementations (loops, explicit enumeration)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.config import ClipConfig, ObjectiveConfig, from_dict
from mmcl.objectives import (build_objective, clip_loss, gram_loss, gram_volume, mip, siglip_loss,
                             symile_loss)
from mmcl.objectives import symile as symile_mod

MODS = ["video", "audio", "text"]


def objective_config(**fields: object) -> ObjectiveConfig:
    """The objective config of ``fields`` (``name`` picks the objective), validated as a config file's."""
    return from_dict(ObjectiveConfig, fields, "objective")


def unit(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def leaves(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.detach().clone().requires_grad_(True) for x in xs]


def on_sphere(*zs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Leaves ``z`` and their normalisations: gradients w.r.t. ``z`` compare the tangent components only
    (formulas that assume unit norms differ from explicit ones off the sphere)."""
    raw = leaves(*zs)
    return raw, [F.normalize(z, dim=1) for z in raw]


def grads_of(loss: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, xs, retain_graph=True))


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
    obj = build_objective(objective_config(name="clip", mode=mode, anchor="text"), MODS).double()
    got = obj(dict(zip(MODS, xs)))
    s = obj.logit_scale.exp()
    pairs = list(itertools.combinations(range(3), 2)) if mode == "all_pairs" else [(2, 0), (2, 1)]
    ref = sum(ref_clip(xs[a], xs[b], s) for a, b in pairs) / len(pairs)
    assert_close(got, ref)
    assert_close(grads_of(got, xs + [obj.logit_scale]), grads_of(ref, xs + [obj.logit_scale]))


def test_clip_objective_defaults_and_clamp():
    obj = build_objective(objective_config(name="clip"), MODS)
    assert obj.score_kind == "cosine"
    assert obj.logs()["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        obj.logit_scale.fill_(math.log(1000.0))
    obj.clamp_()
    assert obj.logs()["logit_scale"] == pytest.approx(100.0, rel=1e-6)
    sig = build_objective(objective_config(name="siglip"), MODS)
    assert sig.logs() == pytest.approx({"logit_scale": 10.0, "logit_bias": -10.0})
    assert {n for n, _ in sig.named_parameters()} == {"logit_scale", "logit_bias"}


def test_siglip_objective_all_pairs_uses_each_pair_once():
    xs = leaves(*(unit(5, 4, 20 + k) for k in range(3)))
    obj = build_objective(objective_config(name="siglip"), MODS).double()
    got = obj(dict(zip(MODS, xs)))
    s, b = obj.logit_scale.exp(), obj.logit_bias
    ref = sum(ref_siglip(xs[a], xs[c], s, b) for a, c in itertools.combinations(range(3), 2)) / 3
    assert_close(got, ref)
    params = [obj.logit_scale, obj.logit_bias]
    assert_close(grads_of(got, xs + params), grads_of(ref, xs + params))


# ---------------------------------------------------------------------------------------------------
# Symile


def ref_symile_n_squared(xs, s, present=None) -> torch.Tensor:
    """Enumerate every candidate combination explicitly; absent vectors are left out of the product."""
    m_count, n = len(xs), xs[0].shape[0]
    has = (lambda i, k: True) if present is None else (lambda i, k: bool(present[i, k]))
    terms = []
    for m in range(m_count):
        others = [k for k in range(m_count) if k != m]
        rows = [i for i in range(n) if has(i, m)]
        if not rows:
            continue
        total = 0
        for i in rows:
            scores, pos = [], None
            for combo in itertools.product(range(n), repeat=len(others)):
                v = xs[m][i]
                for k, j in zip(others, combo):
                    if has(j, k):
                        v = v * xs[k][j]
                scores.append(s * v.sum())
                if all(j == i for j in combo):
                    pos = len(scores) - 1
            total = total + ref_ce(scores, pos)
        terms.append(total / len(rows))
    return sum(terms) / len(terms)


def ref_symile_n(xs, s, seed: int) -> torch.Tensor:
    """Hand-built O(N) negatives: permutations drawn anchor by anchor, non-anchor by non-anchor."""
    g = torch.Generator().manual_seed(seed)
    m_count, n = len(xs), xs[0].shape[0]
    total = 0
    for m in range(m_count):
        perms = {k: torch.randperm(n, generator=g) for k in range(m_count) if k != m}
        for i in range(n):
            scores = []
            for j in range(n):
                if j == i:
                    v = math.prod(x[i] for x in xs)
                else:
                    v = xs[m][i] * math.prod(xs[k][perms[k][j]] for k in perms)
                scores.append(s * v.sum())
            total = total + ref_ce(scores, i)
    return total / (m_count * n)


@pytest.mark.parametrize("m_count", [3, 4])
def test_symile_n_squared_equals_brute_force(m_count):
    xs = leaves(*(unit(4, 3, 30 + k) for k in range(m_count)))
    s = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    got = symile_loss(xs, s, negatives="n_squared")
    ref = ref_symile_n_squared(xs, s)
    assert_close(got, ref)
    assert_close(grads_of(got, xs + [s]), grads_of(ref, xs + [s]))


def test_symile_n_squared_m5_and_tiny_blocks():
    xs = [unit(3, 4, 40 + k) for k in range(5)]
    assert_close(symile_loss(xs, 4.0, negatives="n_squared"), ref_symile_n_squared(xs, 4.0))
    lse_default = symile_mod.streamed_lse(xs[0], xs[1:], 4.0)
    lse_tiny = symile_mod.streamed_lse(xs[0], xs[1:], 4.0, block_elements=5)
    assert_close(lse_default, lse_tiny)


@pytest.mark.parametrize("m_count", [3, 4, 5])
def test_symile_n_with_generator_equals_hand_built(m_count):
    xs = leaves(*(unit(6, 5, 50 + k) for k in range(m_count)))
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    got = symile_loss(xs, s, negatives="n", generator=torch.Generator().manual_seed(11))
    ref = ref_symile_n(xs, s, seed=11)
    assert_close(got, ref)
    assert_close(grads_of(got, xs + [s]), grads_of(ref, xs + [s]))


def test_symile_two_modalities_is_clip():
    x, y = unit(6, 4, 60), unit(6, 4, 61)
    for neg in ("n", "n_squared"):
        assert_close(symile_loss([x, y], 9.0, negatives=neg), clip_loss(x, y, 9.0))


def test_mip_is_sum_of_products():
    xs = [unit(4, 3, 70 + k) for k in range(3)]
    ref = torch.stack([sum(xs[0][i, d] * xs[1][i, d] * xs[2][i, d] for d in range(3)) for i in range(4)])
    assert_close(mip(xs), ref)


def test_symile_objective_matches_functional():
    xs = leaves(*(unit(5, 4, 80 + k) for k in range(3)))
    obj = build_objective(objective_config(name="symile", negatives="n_squared"), MODS).double()
    got = obj(dict(zip(MODS, xs)))
    ref = ref_symile_n_squared(xs, obj.logit_scale.exp())
    assert_close(got, ref)
    assert_close(grads_of(got, xs + [obj.logit_scale]), grads_of(ref, xs + [obj.logit_scale]))
    # "n": the module seeds its generator from torch's global RNG
    obj_n = build_objective(objective_config(name="symile", negatives="n"), MODS).double()
    torch.manual_seed(3)
    first = obj_n(dict(zip(MODS, xs)))
    torch.manual_seed(3)
    assert_close(obj_n(dict(zip(MODS, xs))), first)


# ---------------------------------------------------------------------------------------------------
# GRAM


def ref_volume(vectors: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    v = torch.stack(vectors)
    return torch.det(v @ v.T).clamp_min(eps).sqrt()


def ref_gram_loss(anchor, others, tau, present=None) -> torch.Tensor:
    """Explicit determinants of the present vectors only; rows need the anchor."""
    n = anchor.shape[0]
    has = (lambda i, k: True) if present is None else (lambda i, k: bool(present[i, k]))

    def vol(i: int, j: int) -> torch.Tensor:  # anchor of i with the others of j
        return ref_volume([anchor[i]] + [o[j] for k, o in enumerate(others, 1) if has(j, k)])

    rows = [i for i in range(n) if has(i, 0)]
    total = 0
    for i in rows:
        fwd = [-vol(i, j) / tau for j in range(n)]
        bwd_cols = [j for j in range(n) if has(j, 0)]
        bwd = [-vol(j, i) / tau for j in bwd_cols]
        total = total + (ref_ce(fwd, i) + ref_ce(bwd, bwd_cols.index(i))) / 2
    return total / len(rows)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_gram_volume_matches_explicit_determinant(k):
    zs, xs = on_sphere(*(unit(4, 6, 90 + m) for m in range(k)))
    got = gram_volume(xs[0], xs[1:])
    ref = torch.stack([torch.stack([ref_volume([xs[0][i]] + [o[j] for o in xs[1:]]) for j in range(4)])
                       for i in range(4)])
    assert_close(got, ref)
    assert_close(grads_of(got.sum(), zs), grads_of(ref.sum(), zs))


def test_gram_k2_is_abs_sine():
    a, b = unit(5, 3, 100), unit(5, 3, 101)
    cos = a @ b.T
    assert_close(gram_volume(a, [b]), torch.sqrt(1 - cos.square()))
    angle = torch.acos(cos.clamp(-1, 1))
    assert_close(gram_volume(a, [b]), torch.sin(angle).abs(), tol=1e-7)


@pytest.mark.parametrize("k", [3, 4])
def test_gram_volume_invariant_to_sign_flips_and_permutations(k):
    xs = [unit(5, 6, 110 + m) for m in range(k)]
    base = gram_volume(xs[0], xs[1:])
    flipped = [-x if m % 2 else x for m, x in enumerate(xs)]
    assert_close(gram_volume(flipped[0], flipped[1:]), base)
    assert_close(gram_volume(xs[0], xs[1:][::-1]), base)
    for perm in itertools.permutations(range(k)):  # aligned volumes do not depend on the anchor choice
        ys = [xs[p] for p in perm]
        assert_close(gram_volume(ys[0], ys[1:]).diagonal(), base.diagonal())


def test_gram_degenerate_volumes_are_clamped_with_finite_zero_gradients():
    zs, xs = on_sphere(unit(4, 5, 125), unit(4, 5, 125), unit(4, 5, 126))  # first two identical
    for k in (2, 3):
        volume = gram_volume(xs[0], xs[1:k])
        assert_close(volume.diagonal(), torch.full((4,), math.sqrt(1e-6), dtype=torch.float64))
        grads = grads_of(volume.diagonal().sum(), zs[:k])
        assert all(g.isfinite().all() and g.abs().max() < 1e-6 for g in grads)
    loss = gram_loss(xs[0], xs[1:], 0.1)
    assert all(g.isfinite().all() for g in grads_of(loss, zs))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_gram_loss_matches_reference(k):
    zs, xs = on_sphere(*(unit(5, 6, 120 + m) for m in range(k)))
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    got = gram_loss(xs[0], xs[1:], tau)
    ref = ref_gram_loss(xs[0], xs[1:], tau)
    assert_close(got, ref)
    assert_close(grads_of(got, zs + [tau]), grads_of(ref, zs + [tau]))


def test_gram_objective_anchor_and_temperature():
    zs, xs = on_sphere(*(unit(5, 6, 130 + m) for m in range(3)))
    obj = build_objective(objective_config(name="gram", anchor="audio", init_temperature=0.1), MODS).double()
    assert obj.score_kind == "volume" and obj.logs() == pytest.approx({"temperature": 0.1})
    got = obj(dict(zip(MODS, xs)))
    ref = ref_gram_loss(xs[1], [xs[0], xs[2]], obj.log_temperature.exp())
    assert_close(got, ref)
    assert_close(grads_of(got, zs + [obj.log_temperature]), grads_of(ref, zs + [obj.log_temperature]))
    with torch.no_grad():
        obj.log_temperature.fill_(math.log(1e-4))
    obj.clamp_()
    assert obj.logs()["temperature"] == pytest.approx(0.01)
    assert [n for n, _ in obj.named_parameters()] == ["log_temperature"]


# ---------------------------------------------------------------------------------------------------
# local-loss form (one process, two simulated ranks)


def _split_means(fn, n_local: int, n_ranks: int) -> torch.Tensor:
    return sum(fn(r * n_local, slice(r * n_local, (r + 1) * n_local)) for r in range(n_ranks)) / n_ranks


def test_local_loss_forms_average_to_the_global_loss():
    xs = [unit(8, 5, 140 + m) for m in range(3)]
    x, y, z = xs
    assert_close(_split_means(lambda o, sl: clip_loss(x[sl], y[sl], 5.0, x_all=x, y_all=y, offset=o), 4, 2),
                 clip_loss(x, y, 5.0))
    assert_close(_split_means(lambda o, sl: siglip_loss(x[sl], y[sl], 5.0, -3.0, y_all=y, offset=o), 4, 2),
                 siglip_loss(x, y, 5.0, -3.0))
    assert_close(_split_means(lambda o, sl: symile_loss([t[sl] for t in xs], 5.0, "n_squared", xs_all=xs,
                                                        offset=o), 4, 2),
                 symile_loss(xs, 5.0, "n_squared"))
    assert_close(_split_means(lambda o, sl: symile_loss([t[sl] for t in xs], 5.0, "n",
                                                        torch.Generator().manual_seed(1), xs_all=xs, offset=o),
                              4, 2),
                 symile_loss(xs, 5.0, "n", torch.Generator().manual_seed(1)))
    assert_close(_split_means(lambda o, sl: gram_loss(x[sl], [y[sl], z[sl]], 0.3, anchor_all=x,
                                                      others_all=[y, z], offset=o), 4, 2),
                 gram_loss(x, [y, z], 0.3))


# ---------------------------------------------------------------------------------------------------
# missing modalities


PRESENT = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)


def _masked(xs: list[torch.Tensor], present: torch.Tensor) -> list[torch.Tensor]:
    """Absent rows hold NaN: they must be ignored, not multiplied by zero."""
    return [torch.where(present[:, k, None], x, torch.full_like(x, float("nan"))) for k, x in enumerate(xs)]


def _masks(present: torch.Tensor) -> dict[str, torch.Tensor]:
    return {m: present[:, k] for k, m in enumerate(MODS)}


@pytest.mark.parametrize("name", ["clip", "siglip", "symile", "gram"])
def test_fully_present_mask_gives_exactly_the_same_loss(name):
    xs = [unit(6, 5, 150 + m) for m in range(3)]
    obj = build_objective(objective_config(name=name, negatives="n_squared"), MODS).double()
    emb = dict(zip(MODS, xs))
    full = {m: torch.ones(6, dtype=torch.bool) for m in MODS}
    assert torch.equal(obj(emb, full), obj(emb))


@pytest.mark.parametrize("mode", ["all_pairs", "anchor"])
def test_clip_mask_skips_absent_pairs(mode):
    zs, xs = on_sphere(*(unit(6, 5, 160 + m) for m in range(3)))
    obj = build_objective(objective_config(name="clip", mode=mode), MODS).double()
    got = obj(dict(zip(MODS, _masked(xs, PRESENT))), _masks(PRESENT))
    s = obj.logit_scale.exp()
    pairs = list(itertools.combinations(range(3), 2)) if mode == "all_pairs" else [(2, 0), (2, 1)]
    terms = []
    for a, b in pairs:
        rows = [i for i in range(6) if PRESENT[i, a] and PRESENT[i, b]]
        cols_a = [j for j in range(6) if PRESENT[j, a]]
        cols_b = [j for j in range(6) if PRESENT[j, b]]
        terms.append(ref_clip(xs[a], xs[b], s, cols_x=cols_a, cols_y=cols_b, rows=rows))
    ref = sum(terms) / len(terms)
    assert_close(got, ref)
    assert all(g.isfinite().all() for g in grads_of(got, zs))
    assert_close(grads_of(got, zs), grads_of(ref, zs))


def test_siglip_mask_uses_present_pairs():
    x, y = unit(6, 4, 170), unit(6, 4, 171)
    xp = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    yp = torch.tensor([1, 0, 1, 1, 1, 1], dtype=torch.bool)
    got = siglip_loss(x, y, 10.0, -5.0, x_present=xp, y_present=yp)
    total = 0
    for i in range(6):
        for j in range(6):
            if xp[i] and yp[j]:
                total = total - F.logsigmoid((1.0 if i == j else -1.0) * (10.0 * torch.dot(x[i], y[j]) - 5.0))
    assert_close(got, total / int(xp.sum()))


def test_symile_mask_uses_present_modalities():
    zs, xs = on_sphere(*(unit(6, 4, 180 + m) for m in range(3)))
    obj = build_objective(objective_config(name="symile", negatives="n_squared"), MODS).double()
    got = obj(dict(zip(MODS, _masked(xs, PRESENT))), _masks(PRESENT))
    ref = ref_symile_n_squared(xs, obj.logit_scale.exp(), PRESENT)
    assert_close(got, ref)
    assert_close(grads_of(got, zs), grads_of(ref, zs))
    assert_close(symile_loss(_masked(xs, PRESENT), obj.logit_scale.exp(), "n_squared", present=PRESENT), ref)


def test_gram_mask_uses_present_modalities():
    zs, xs = on_sphere(*(unit(6, 5, 190 + m) for m in range(3)))
    obj = build_objective(objective_config(name="gram"), MODS).double()  # anchor: text (column 2)
    got = obj(dict(zip(MODS, _masked(xs, PRESENT))), _masks(PRESENT))
    order = [2, 0, 1]
    present = PRESENT[:, order]
    ref = ref_gram_loss(xs[2], [xs[0], xs[1]], obj.log_temperature.exp(), present)
    assert_close(got, ref)
    assert_close(grads_of(got, zs), grads_of(ref, zs))
    assert_close(gram_loss(*[_masked(xs, PRESENT)[k] for k in order][:1], [_masked(xs, PRESENT)[k] for k in order][1:],
                           obj.log_temperature.exp(), present=present), ref)


@pytest.mark.parametrize("name", ["clip", "siglip", "symile", "gram"])
def test_learned_missing_embedding_substitutes_absent_rows(name):
    xs = [unit(6, 5, 200 + m) for m in range(3)]
    obj = build_objective(objective_config(name=name, missing="learned"), MODS, embed_dim=5).double()
    torch.manual_seed(0)
    got = obj(dict(zip(MODS, _masked(xs, PRESENT))), _masks(PRESENT))
    filled = {m: torch.where(PRESENT[:, k, None], xs[k], F.normalize(obj.missing_embedding[m], dim=0))
              for k, m in enumerate(MODS)}
    torch.manual_seed(0)
    assert_close(got, obj(filled))
    got.backward()
    assert obj.missing_embedding["video"].grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("name", ["clip", "siglip", "symile", "gram"])
def test_bad_inputs_raise_value_errors(name):
    obj = build_objective(objective_config(name=name), MODS)
    good = {m: unit(4, 3, 210 + k, torch.float32) for k, m in enumerate(MODS)}
    with pytest.raises(ValueError, match=r"share N and D.*\(5, 3\)"):
        obj({**good, "audio": unit(5, 3, 0, torch.float32)})
    with pytest.raises(ValueError, match=r"share N and D.*\(4, 6\)"):
        obj({**good, "audio": unit(4, 6, 0, torch.float32)})
    with pytest.raises(ValueError, match="not L2-normalised"):
        obj({**good, "text": 2 * good["text"]})
    with pytest.raises(ValueError, match="not L2-normalised"):
        obj({**good, "text": torch.full((4, 3), float("nan"))})
    with pytest.raises(ValueError, match="at least 2 modalities"):
        obj({"video": good["video"]})
    with pytest.raises(ValueError, match="2-D"):
        obj({**good, "video": good["video"][None]})
    with pytest.raises(ValueError, match="unknown modalities"):
        obj({**good, "depth": good["video"]})
    with pytest.raises(ValueError, match="fewer than 2 present"):
        obj(good, {"video": torch.tensor([1, 1, 1, 0]).bool(), "audio": torch.tensor([1, 1, 1, 0]).bool()})
    with pytest.raises(ValueError, match="present mask for 'video' must be bool"):
        obj(good, {"video": torch.ones(4)})
    with pytest.raises(ValueError, match=r"must be bool \[4\]"):
        obj(good, {"video": torch.ones(5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="share dtype"):
        obj({**good, "text": good["text"].double()})


def test_bad_functional_inputs_and_config():
    x, y = unit(4, 3, 220), unit(4, 3, 221)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(5, 3\)"):
        clip_loss(x, unit(5, 3, 0), 10.0)
    with pytest.raises(ValueError, match="not L2-normalised"):
        siglip_loss(x, 3 * y, 10.0, -10.0)
    with pytest.raises(ValueError, match="at least 2"):
        symile_loss([x], 10.0)
    with pytest.raises(ValueError, match="negatives"):
        symile_loss([x, y, y], 10.0, negatives="n_cubed")
    with pytest.raises(ValueError, match="same D"):
        gram_volume(unit(4, 5, 0), [y])
    with pytest.raises(ValueError, match="offset"):
        clip_loss(x, y, 10.0, x_all=x, y_all=y, offset=2)
    with pytest.raises(ValueError, match="unknown objective 'vicreg'"):
        build_objective(dataclasses.replace(ClipConfig(), name="vicreg"), MODS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 distinct modalities"):
        build_objective(objective_config(name="clip"), ["video"])
    with pytest.raises(ValueError, match="anchor 'text'"):
        build_objective(objective_config(name="gram"), ["video", "audio"])
    with pytest.raises(ValueError, match="embed_dim"):
        build_objective(objective_config(name="clip", missing="learned"), MODS)


# ---------------------------------------------------------------------------------------------------
# score orientation


def aligned(n: int, d: int, seed: int) -> torch.Tensor:
    """Nearly one-hot unit vectors: sample i of every modality lies close to the basis vector e_i."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.eye(n, d) + 0.1 * torch.rand(n, d, generator=g), dim=1)


@pytest.mark.parametrize("name", ["clip", "siglip", "symile", "gram"])
@pytest.mark.parametrize("query,cands", [(["video"], ["text"]), (["text"], ["audio"]),
                                          (["video", "audio"], ["text"]), (["text"], ["video", "audio"]),
                                          (["video", "audio"], ["text", "depth"])])
def test_score_ranks_the_true_match_first(name, query, cands):
    emb = {m: aligned(8, 16, 230 + k) for k, m in enumerate(MODS + ["depth"])}
    obj = build_objective(objective_config(name=name), MODS + ["depth"])
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    scores = obj.score({m: emb[m] for m in query}, {m: emb[m][perm] for m in cands})
    assert scores.shape == (8, 8)
    assert torch.equal(scores.argmax(1), perm.argsort())
