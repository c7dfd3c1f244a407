"""Loader throughput: the full pipeline (``build_loader`` over the tiny model's modalities) against a
decode-only loop over the same shards (plain webdataset iteration + the same ``decode`` calls; no
shuffle, transform, collate or DataLoader), in clips/s.

    python bench/loader.py [--data DIR] [--clips 1000] [--batch 64] [--workers 0 1 2] [--repeat 2]

``--data`` reuses a dataset written by ``mmcl shards synth`` (or writes one there if it has no
``world.json``); without it a dataset is synthesised into a temporary directory. The decode-only loop
runs twice: with torch's default intra-op threads and with one (the fair baseline: the pipeline decodes
on one thread in the main process and in every worker). The ratio is pipeline / decode-only (1 thread).
Timings include the DataLoader's worker start-up. Rows run interleaved ``--repeat`` times; clips/s is the
best run, CPU ms/clip (user + system, this process and its reaped workers) the median: on a shared
machine the wall clock swings with other jobs, the CPU cost much less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import webdataset as wds
import yaml

from mmcl.data.shards import build_loader, expand_shards
from mmcl.data.synthetic import synth
from mmcl.modalities import Processor, SampleError, build_processor

TINY = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"


def tiny_modalities(data: Path) -> dict[str, Processor]:
    specs = yaml.safe_load(TINY.read_text())["modalities"]
    specs["text"]["tokenizer"] = str(data / "tokenizer.model")
    return {name: build_processor(name, spec) for name, spec in specs.items()}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def decode_only(spec: str, modalities: dict[str, Processor], threads: int) -> tuple[int, float]:
    """(clips, seconds) of plain webdataset iteration + every modality's ``decode``."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start, clips = time.perf_counter(), 0
        for sample in wds.WebDataset(spec, shardshuffle=False, empty_check=False):
            try:
                for mod in modalities.values():
                    mod.decode(sample)
            except SampleError:
                continue
            clips += 1
        return clips, time.perf_counter() - start
    finally:
        torch.set_num_threads(before)


def pipeline(spec: str, modalities: dict[str, Processor], batch: int, workers: int) -> tuple[int, float]:
    """(clips, seconds) of one training epoch of ``build_loader`` (shuffle, decode, transform, collate)."""
    start = time.perf_counter()
    loader = build_loader(spec, modalities, batch, train=True, workers=workers, seed=0)
    loader.set_epoch(0)
    clips = sum(len(b["keys"]) for b in loader)
    return clips, time.perf_counter() - start


def dataset(args: argparse.Namespace, tmp: str) -> Path:
    data = Path(args.data) if args.data else Path(tmp)
    if not (data / "world.json").is_file():
        per_shard = max(1, args.clips // 8)  # 8 shards: enough for 2 ranks x 4 workers
        start = time.perf_counter()
        synth(data, train=args.clips, test=1, per_shard=per_shard, workers=2)
        print(f"synthesised {args.clips} clips into {data} in {time.perf_counter() - start:.0f} s")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="dataset directory (reused, or written when it has no world.json)")
    parser.add_argument("--clips", type=int, default=1000, help="clips to synthesise (without --data)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeat", type=int, default=2, help="interleaved runs per row")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = dataset(args, tmp)
        spec = str(data / json.loads((data / "world.json").read_text())["splits"]["train"]["pattern"])
        modalities = tiny_modalities(data)
        decode_only(expand_shards(spec)[0], modalities, 1)  # warm-up: codec libraries, tokenizer

        default_threads = torch.get_num_threads()
        runs: list[tuple[str, str, Callable[[], tuple[int, float]]]] = [
            ("decode-only", f"main, {default_threads} thr", lambda: decode_only(spec, modalities, default_threads)),
            ("decode-only", "main, 1 thr", lambda: decode_only(spec, modalities, 1)),
        ]
        runs += [("pipeline", f"{w} workers", lambda w=w: pipeline(spec, modalities, args.batch, w))
                 for w in args.workers]
        results: dict[int, list[tuple[int, float, float]]] = {i: [] for i in range(len(runs))}
        for _ in range(args.repeat):  # interleaved, so drifting load on a shared machine hits every row alike
            for i, (_, _, run) in enumerate(runs):
                cpu = cpu_seconds()
                clips, seconds = run()
                results[i].append((clips, seconds, cpu_seconds() - cpu))
        rows: list[tuple[str, str, int, float, float]] = []
        for i, (what, where, _) in enumerate(runs):
            clips, seconds, _ = min(results[i], key=lambda r: r[1])
            cpu_ms = statistics.median(1e3 * c / n for n, _, c in results[i])
            rows.append((what, where, clips, seconds, cpu_ms))

    base = rows[1][2] / rows[1][3]
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"batch {args.batch}, {args.repeat} runs per row")
    print(f"{'loop':<12} {'where':<14} {'clips':>6} {'best s':>7} {'clips/s':>8} {'/ decode-only':>14} "
          f"{'CPU ms/clip':>12}")
    for what, where, clips, seconds, cpu_ms in rows:
        rate = clips / seconds
        print(f"{what:<12} {where:<14} {clips:>6} {seconds:>7.2f} {rate:>8.1f} {rate / base:>14.2f} {cpu_ms:>12.1f}")


if __name__ == "__main__":
    main()
