"""Distributed negatives: 2 real gloo processes against one process on the concatenated batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmcl.config import ObjectiveConfig, from_dict
from mmcl.objectives import build_objective

WORLD = 2
D = 6
TOL = 1e-5
#: (objective config, modalities)
CASES = [
    (dict(name="clip", mode="all_pairs"), ["video", "audio", "text"]),
    (dict(name="clip", mode="anchor"), ["video", "audio", "text"]),
    (dict(name="siglip"), ["video", "audio", "text"]),
    (dict(name="symile", negatives="n"), ["video", "audio", "text"]),
    (dict(name="symile", negatives="n_squared"), ["video", "audio", "text"]),
    (dict(name="symile", negatives="n_squared"), ["video", "audio", "text", "depth"]),
    (dict(name="gram"), ["video", "audio", "text"]),
    (dict(name="gram"), ["video", "audio", "text", "depth"]),
]


def _global_batch(n: int, modalities: list[str], masked: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    emb = {m: F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1) for m in modalities}
    if not masked:
        return emb, None
    present = torch.ones(n, len(modalities), dtype=torch.bool)
    for i in range(1, n, 2):  # every other sample loses one modality, never the last present pair
        present[i, i % len(modalities)] = False
    return emb, {m: present[:, k] for k, m in enumerate(modalities)}


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=lambda m: f"{what}: {m}")


def _run_case(rank: int, sizes: list[int], cfg: dict, modalities: list[str], masked: bool, seed: int) -> None:
    n = sum(sizes)
    lo = sum(sizes[:rank])
    sl = slice(lo, lo + sizes[rank])
    emb, present = _global_batch(n, modalities, masked, seed)
    what = f"{cfg} M={len(modalities)} masked={masked} sizes={sizes} rank={rank}"

    objective = build_objective(from_dict(ObjectiveConfig, {**cfg, "gather": True}), modalities).double()
    single = build_objective(from_dict(ObjectiveConfig, {**cfg, "gather": False}), modalities).double()
    single.load_state_dict(objective.state_dict())

    local = {m: x[sl].clone().requires_grad_(True) for m, x in emb.items()}
    torch.manual_seed(seed)
    loss = objective(local, None if present is None else {m: p[sl] for m, p in present.items()})
    loss.backward()

    full = {m: x.clone().requires_grad_(True) for m, x in emb.items()}
    torch.manual_seed(seed)
    ref = single(full, present)
    ref.backward()

    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    _close(mean_loss / WORLD, ref.detach(), f"loss {what}")
    for m in modalities:  # the gather's backward sums every rank's gradient for these rows
        _close(local[m].grad / WORLD, full[m].grad[sl], f"grad {m} {what}")
    for (name, p), (_, q) in zip(objective.named_parameters(), single.named_parameters()):
        if p.grad is None:
            assert q.grad is None, f"{name} {what}"
            continue
        g = p.grad.clone()
        dist.all_reduce(g)  # what DDP's gradient averaging does
        _close(g / WORLD, q.grad, f"grad {name} {what}")


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert dist.get_world_size() == WORLD
        seed = 0
        for sizes in ([4, 4], [3, 5]):
            for masked in (False, True):
                for cfg, modalities in CASES:
                    seed += 1
                    _run_case(rank, sizes, cfg, modalities, masked, seed)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_gloo_ranks_match_one_process_on_the_global_batch(tmp_path):
    init_file = os.fspath(tmp_path / "rendezvous")
    mp.spawn(_worker, args=(init_file,), nprocs=WORLD, join=True)
