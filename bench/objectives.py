"""Benchmark of the contrastive objectives: forward+backward time and peak memory versus N.

Every measurement runs in a fresh subprocess so that its peak resident memory is its own: the inputs are
created, one warm-up step runs, the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``), one
measured step gives the peak extra memory (peak RSS above the inputs), and further steps give the median
time. glibc is told to serve and return every allocation above 128 KiB with mmap
(``MALLOC_MMAP_THRESHOLD_``), so memory freed by the warm-up is not silently reused and RSS tracks the live
tensors. Time is reported as CPU seconds of the process (``time.process_time``) and as wall seconds:
on a shared machine CPU time is the stable number, so the goals use it, with one intra-op thread by default
(``--threads``). The naive formulations the goals compare against are measured in the same run:

* GRAM via batched ``torch.linalg.det`` on the ``N x N x k x k`` Gram matrices;
* Symile ``n_squared`` by materialising all ``N^2 x D`` candidate products.

Usage: ``python bench/objectives.py [--quick] [--threads T]``. Prints tables and the goal ratios; not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmcl.objectives import clip_loss, gram_loss, siglip_loss, symile_loss

D = 512


# ----------------------------------------------------------------------------------------------------
# naive formulations (the baselines of the goals)


def naive_gram_loss(anchor: torch.Tensor, others: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """GRAM with a batched determinant over all ``N x N`` Gram matrices ``[N, N, k, k]``."""
    n, k = anchor.shape[0], len(others) + 1
    gram = anchor.new_empty(n, n, k, k)
    gram[..., 0, 0] = 1
    for a, x in enumerate(others, 1):
        c = anchor @ x.T
        gram[..., 0, a] = c
        gram[..., a, 0] = c
        gram[..., a, a] = 1
        for b in range(a + 1, k):
            cc = (x * others[b - 1]).sum(-1)[None, :].expand(n, n)
            gram[..., a, b] = cc
            gram[..., b, a] = cc
    volume = torch.linalg.det(gram).clamp_min(1e-6).sqrt()
    target = torch.arange(n)
    return (F.cross_entropy(-volume / temperature, target) + F.cross_entropy(-volume.T / temperature, target)) / 2


def naive_symile_n_squared(xs: list[torch.Tensor], logit_scale: float) -> torch.Tensor:
    """Symile ``n_squared`` (M = 3) with all ``N^2 x D`` candidates materialised."""
    n = xs[0].shape[0]
    target = torch.arange(n) * (n + 1)
    losses = []
    for m in range(3):
        b, c = (xs[k] for k in range(3) if k != m)
        cands = (b[:, None, :] * c[None, :, :]).reshape(n * n, -1)
        losses.append(F.cross_entropy(logit_scale * xs[m] @ cands.T, target))
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------------
# cases: name -> (number of modalities, loss of [N, D] leaves)

CASES: dict[str, tuple[int, Callable[[list[torch.Tensor]], torch.Tensor]]] = {
    "clip_all_pairs_m3": (3, lambda xs: torch.stack([clip_loss(xs[a], xs[b], 14.3)
                                                      for a, b in ((0, 1), (0, 2), (1, 2))]).mean()),
    "siglip_all_pairs_m3": (3, lambda xs: torch.stack([siglip_loss(xs[a], xs[b], 10.0, -10.0)
                                                        for a, b in ((0, 1), (0, 2), (1, 2))]).mean()),
    "symile_n_m3": (3, lambda xs: symile_loss(xs, 14.3, "n")),
    "symile_n_squared_m3": (3, lambda xs: symile_loss(xs, 14.3, "n_squared")),
    "naive_symile_n_squared_m3": (3, lambda xs: naive_symile_n_squared(xs, 14.3)),
    "gram_k3": (3, lambda xs: gram_loss(xs[2], xs[:2], 0.07)),
    "naive_gram_det_k3": (3, lambda xs: naive_gram_loss(xs[2], xs[:2], 0.07)),
    "gram_k4": (4, lambda xs: gram_loss(xs[3], xs[:3], 0.07)),
    "symile_n_squared_m4": (4, lambda xs: symile_loss(xs, 14.3, "n_squared")),
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(case: str, n: int, repeats: int) -> dict[str, float]:
    """One case in this process: median forward+backward CPU and wall seconds, peak extra MiB."""
    count, fn = CASES[case]
    g = torch.Generator().manual_seed(0)
    xs = [F.normalize(torch.randn(n, D, generator=g), dim=1).requires_grad_(True) for _ in range(count)]

    def step() -> None:
        for x in xs:
            x.grad = None
        fn(xs).backward()

    step()  # warm-up: lazy initialisation, thread pools
    for x in xs:
        x.grad = None
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM)
    step()
    peak = _rss_kib("VmHWM")
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall),
            "peak_extra_mib": max(0, peak - base) / 1024}


def run_fresh(case: str, n: int, repeats: int, threads: int) -> dict[str, float]:
    """:func:`measure` in a fresh Python process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": "131072",
           "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, __file__, "--measure", case, "--n", str(n), "--repeats", str(repeats),
                          "--threads", str(threads)], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per measurement (default 1)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(args.measure, args.n, args.repeats)))
        return

    repeats = 3 if args.quick else 5
    sizes = [256, 1024] if args.quick else [128, 256, 512, 1024]
    plan = {case: sizes for case in CASES}
    plan["symile_n_squared_m3"] = plan["naive_symile_n_squared_m3"] = [128, 256] if args.quick else [64, 128, 256]
    plan["symile_n_squared_m4"] = [16, 32]  # O(N^4 D) work
    results: dict[tuple[str, int], dict[str, float]] = {}
    print(f"D={D}, threads={args.threads}, torch {torch.__version__}; forward+backward, median of {repeats}")
    print(f"{'case':28s} {'N':>6s} {'cpu ms':>10s} {'wall ms':>10s} {'peak extra MiB':>15s}")
    for case, ns in plan.items():
        for n in ns:
            r = results[case, n] = run_fresh(case, n, repeats, args.threads)
            print(f"{case:28s} {n:6d} {1000 * r['cpu_s']:10.1f} {1000 * r['wall_s']:10.1f} "
                  f"{r['peak_extra_mib']:15.1f}", flush=True)

    gram, det, clip = (results[c, 1024] for c in ("gram_k3", "naive_gram_det_k3", "clip_all_pairs_m3"))
    sym, mat = (results[c, 256] for c in ("symile_n_squared_m3", "naive_symile_n_squared_m3"))
    print("\ngoals (CPU time; wall time in brackets)")
    print(f"GRAM k=3 N=1024: batched-det / ours time = {det['cpu_s'] / gram['cpu_s']:.1f}x "
          f"[{det['wall_s'] / gram['wall_s']:.1f}x] (goal >= 5x)")
    print(f"GRAM k=3 N=1024: ours / 3-modality all-pairs CLIP time = {gram['cpu_s'] / clip['cpu_s']:.2f}x "
          f"[{gram['wall_s'] / clip['wall_s']:.2f}x] (goal <= 1.5x)")
    print(f"Symile n_squared N=256 M=3: ours / materialised peak extra memory = "
          f"{sym['peak_extra_mib'] / max(mat['peak_extra_mib'], 1e-9):.3f} "
          f"({sym['peak_extra_mib']:.1f} / {mat['peak_extra_mib']:.1f} MiB, goal <= 0.1)")
    print(f"Symile n_squared N=256 M=3: ours / materialised time = {sym['cpu_s'] / mat['cpu_s']:.2f}x "
          f"[{sym['wall_s'] / mat['wall_s']:.2f}x] (goal <= 1.5x)")


if __name__ == "__main__":
    main()
