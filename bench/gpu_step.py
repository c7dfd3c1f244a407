"""Training throughput on one GPU: samples/s, the step split, peak memory and MFU of the mmcl step in bf16,
for each objective, with the loader fed from real shards.

    python bench/gpu_step.py [--model NAME] [--batch 256] [--steps 20] [--warmup 5]
                             [--objectives clip,siglip,symile,gram] [--workers W] [--compile] [--peak-tflops X]

Refuses in one line (exit 2) without a CUDA GPU. The configuration is found by trying: the named model configs
(``configs/models/*.yaml``, or ``--model``), largest first, each at ``--batch`` halved until a step fits in
memory; the first that fits is measured for every objective at that batch (``symile`` with ``n_squared``
negatives, the O(N^2) one). A synthetic dataset for the model's modalities is written as real shards to a
temporary directory and read by the training loader (``data.resample``, ``--workers`` processes, pinned
memory), so decoding and the host-to-device copies are part of what is measured.

The step is the trainer's own pieces: ``make_engine`` (accelerate, bf16 autocast), ``build_optimizer`` (fused
AdamW), ``build_scheduler``, the model's forward, ``objective(..., check=False)``, ``engine.backward``,
``engine.step()`` and the schedule's step. Its phases are timed on the GPU stream with CUDA events read after
the last step (no sync inside a step): data wait (from asking the loader for a batch to its copy being
queued: the time the GPU waits for the host), forward (towers + objective), backward, optimizer. FLOPs of a
step are counted once with ``torch.utils.flop_counter.FlopCounterMode`` (forward and backward);
MFU = FLOPs per step / mean step time / the GPU's dense bf16 peak (a table of known GPUs, or ``--peak-tflops``).
Prints one JSON line per objective and a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
#: Dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("B200", 2250.0),
                    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0))
#: The objectives measured, as objective config sections.
OBJECTIVES = {"clip": {"name": "clip"}, "siglip": {"name": "siglip"},
              "symile": {"name": "symile", "negatives": "n_squared"}, "gram": {"name": "gram"}}
PHASES = ("data", "forward", "backward", "optimizer")


def world_of(spec: dict) -> str:
    kinds = {m.get("kind", name) for name, m in spec["modalities"].items()}
    return "xor" if kinds == {"vector"} else "simple"


def model_spec(name: str, data: Path, samples: int = 256) -> dict:
    """The named model config with its tokenizer (if any) pointed at ``data`` (shards written when missing)."""
    from mmcl.data.synthetic import synth

    spec = yaml.safe_load((MODELS / f"{name}.yaml").read_text())
    out = data / world_of(spec)
    if not (out / "world.json").is_file():
        synth(out, train=samples, test=8, world=world_of(spec), per_shard=32, workers=min(8, os.cpu_count() or 1))
    for m in spec["modalities"].values():
        if "tokenizer" in m:
            m["tokenizer"] = str(out / "tokenizer.model")
    return spec


def named_models_by_size() -> list[str]:
    """The named model configs with a text modality and two more (GRAM's anchor and Symile's three), largest
    first (those whose size needs their tokenizer file to be known come last)."""
    from mmcl.config import load_config
    from mmcl.model import MultimodalModel

    sizes, unsized = {}, []
    for path in sorted(MODELS.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        if len(spec["modalities"]) < 3 or "text" not in spec["modalities"]:
            continue
        for m in spec["modalities"].values():
            m.pop("tokenizer", None)  # the architecture alone: vocab_size sizes the table
        try:
            cfg = load_config(base={"model": spec})
            meta = MultimodalModel(cfg.model, cfg.objective, device="meta")
        except Exception:  # noqa: BLE001 - its vocabulary comes from its tokenizer file
            unsized.append(path.stem)
            continue
        sizes[path.stem] = sum(p.numel() for p in meta.parameters())
    return sorted(sizes, key=sizes.get, reverse=True) + unsized


def train_config(spec: dict, data: Path, batch: int, objective: dict, workers: int, compiled: bool) -> Any:
    from mmcl.config import load_config

    world = data / world_of(spec)
    shards = str(world / json.loads((world / "world.json").read_text())["splits"]["train"]["pattern"])
    return load_config(base={"model": spec, "objective": objective,
                             "data": {"train": shards, "batch_size": batch, "workers": workers, "resample": True,
                                      "shuffle_buffer": 0},
                             "train": {"precision": "bf16", "steps": 1000, "warmup_steps": 10, "compile": compiled,
                                       "progress": False}})


class Clock:
    """Points in time of the GPU stream (CUDA events, read once at the end) or, on CPU, of the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start


class Bench:
    """The trainer's step for ``cfg`` on ``device``, timed by phase."""

    def __init__(self, cfg: Any, device: torch.device | None = None):
        from mmcl.data.shards import build_loader
        from mmcl.model import MultimodalModel
        from mmcl.train.engine import make_engine
        from mmcl.train.loop import seed_everything
        from mmcl.train.optim import build_optimizer, build_scheduler

        seed_everything(cfg.train.seed)
        model = MultimodalModel(cfg.model, cfg.objective)
        self.params = sum(p.numel() for p in model.parameters())
        if cfg.train.compile:
            model.compile_towers()
        self.engine = make_engine(cfg, model)
        self.device = device or self.engine.device
        optimizer = build_optimizer(model, cfg, {})
        self.scheduler = build_scheduler(optimizer, cfg, cfg.train.steps)
        self.engine.prepare(model, optimizer)
        self.engine.model.train()
        loader = build_loader(cfg.data.train, model.processors, cfg.data.batch_size, train=True,
                              workers=cfg.data.workers, resample=True, shuffle_buffer=0,
                              pin_memory=self.device.type == "cuda", prefetch_factor=cfg.data.prefetch_factor)
        self.batches: Iterator[dict[str, Any]] = iter(loader)
        self.clock = Clock(self.device)
        self.objective = self.engine.inner.objective
        self.world = self.engine.world

    def next_batch(self) -> dict[str, Any]:
        from mmcl.train.step import to_device

        return to_device([next(self.batches)], self.device)[0]

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        emb = self.engine.model(batch["inputs"])
        return self.objective(emb, batch["present"], check=False, sizes=[len(batch["keys"])] * self.world)

    def step(self) -> list[Any]:
        """One training step; returns its clock points (start, after data, forward, backward, optimizer)."""
        points = [self.clock.now()]
        batch = self.next_batch()
        points.append(self.clock.now())
        loss = self.forward(batch)
        points.append(self.clock.now())
        self.engine.backward(loss, True)
        points.append(self.clock.now())
        self.engine.step()
        self.scheduler.step()
        points.append(self.clock.now())
        return points

    def count_flops(self) -> tuple[float, float]:
        """(forward, backward) FLOPs of one step on one batch, by ``FlopCounterMode``; the gradients are dropped."""
        from torch.utils.flop_counter import FlopCounterMode

        batch = self.next_batch()
        with FlopCounterMode(display=False) as forward:
            loss = self.forward(batch)
        with FlopCounterMode(display=False) as backward:
            self.engine.backward(loss, True)
        self.engine.optimizer.zero_grad(set_to_none=True)
        return float(forward.get_total_flops()), float(backward.get_total_flops())

    def measure(self, steps: int, warmup: int) -> dict[str, Any]:
        """Samples/s, the mean step split (seconds), peak memory and FLOPs per step over ``steps`` steps."""
        for _ in range(warmup):
            self.step()
        flops_fwd, flops_bwd = self.count_flops()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        points = [self.step() for _ in range(steps)]
        if cuda:
            torch.cuda.synchronize()
        split = {phase: sum(self.clock.seconds(p[i], p[i + 1]) for p in points) / steps
                 for i, phase in enumerate(PHASES)}
        step_s = sum(split.values())
        batch = self.engine.cfg.data.batch_size
        return {"params": self.params, "batch": batch, "steps": steps, "s_per_step": step_s,
                "samples_per_s": batch / step_s, "split_s": split,
                "split_pct": {k: 100 * v / step_s for k, v in split.items()},
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "flops_forward": flops_fwd, "flops_backward": flops_bwd,
                "flops_per_sample": (flops_fwd + flops_bwd) / batch,
                "achieved_tflops": (flops_fwd + flops_bwd) / step_s / 1e12}


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fits(spec: dict, data: Path, batch: int, workers: int, compiled: bool) -> bool:
    """Whether two steps of the heaviest objective (Symile over all N^2 combinations) fit at ``batch``."""
    bench = None
    try:
        bench = Bench(train_config(spec, data, batch, OBJECTIVES["symile"], workers, compiled))
        bench.step()
        bench.step()
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del bench
        release()


def peak_flops(name: str, given: float | None) -> float:
    if given:
        return given * 1e12
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    sys.exit(f"bench/gpu_step.py: no known bf16 peak for {name!r}: pass --peak-tflops")


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| objective | model | batch | samples/s | step ms | data % | forward % | backward % | optimizer % "
            "| peak GiB | TFLOP/s | MFU |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['objective']} | {r['model']} | {r['batch']} | {r['samples_per_s']:.0f} | "
             f"{1000 * r['s_per_step']:.0f} | {r['split_pct']['data']:.1f} | {r['split_pct']['forward']:.1f} | "
             f"{r['split_pct']['backward']:.1f} | {r['split_pct']['optimizer']:.1f} | {r['peak_mem_gib']:.1f} | "
             f"{r['achieved_tflops']:.0f} | {100 * r['mfu']:.1f} % |" for r in rows]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a named model config (default: the largest that fits)")
    parser.add_argument("--batch", type=int, default=256, help="the first batch tried (halved until it fits)")
    parser.add_argument("--min-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--compile", action="store_true", help="train.compile: torch.compile the towers")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from a table)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_step.py: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        sys.exit(2)
    unknown = [o for o in args.objectives.split(",") if o not in OBJECTIVES]
    if unknown:
        sys.exit(f"bench/gpu_step.py: unknown objectives {unknown} (known: {', '.join(OBJECTIVES)})")
    device_name = torch.cuda.get_device_name()
    peak = peak_flops(device_name, args.peak_tflops)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        chosen = None
        for name in [args.model] if args.model else named_models_by_size():
            spec = model_spec(name, data)
            batch = args.batch
            while batch >= args.min_batch and not fits(spec, data, batch, args.workers, args.compile):
                print(f"# {name} at batch {batch}: out of memory", file=sys.stderr, flush=True)
                batch //= 2
            if batch >= args.min_batch:
                chosen = (name, spec, batch)
                break
        if chosen is None:
            sys.exit("bench/gpu_step.py: no named model fits at --min-batch")
        name, spec, batch = chosen
        for objective in args.objectives.split(","):
            bench = Bench(train_config(spec, data, batch, OBJECTIVES[objective], args.workers, args.compile))
            row = {"objective": objective, "model": name, "device": device_name, "precision": "bf16",
                   "compile": args.compile, **bench.measure(args.steps, args.warmup)}
            row["mfu"] = row["achieved_tflops"] * 1e12 / peak
            row["peak_tflops"] = peak / 1e12
            print(json.dumps(row), flush=True)
            rows.append(row)
            del bench
            release()
    print(table(rows))


if __name__ == "__main__":
    main()
