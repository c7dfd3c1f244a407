"""Per-rank memory of the model states (parameters + gradients + optimizer state) under DeepSpeed ZeRO-1/2/3,
one rank against several.

    python bench/memory.py [--stages 1 2 3] [--ranks 2] [--width 512] [--data DIR] [--set KEY=VALUE ...]

Every (stage, ranks) pair is a real ``torchrun`` launch of this file (gloo on CPU) that builds the model and
the DeepSpeed engine with the training loop's functions (``make_engine`` on
``configs/deepspeed/zero<stage>.json``, ``build_optimizer``, ``engine.prepare``) and trains two steps of two
accumulated micro-batches (``engine.backward`` of each, then ``engine.step()``).
After every backward of the second step (optimizer state alive, gradients accumulating: within the
accumulation ZeRO-1 still holds whole gradients, ZeRO-2/3 their partitions) it adds up the bytes of every
distinct tensor storage alive in the process; the peak counts. What was alive before the model was built
(the batch) is subtracted, and so are the model's buffers; the rest is parameters, gradients, the
optimizer's moments and fp32 master copy, and DeepSpeed's own buffers. Prints one JSON line per launch
and a table with the measured ratio (ranks / 1 rank, per rank) beside the ZeRO paper's: with P, G bytes
per parameter for weights and gradients and K for the optimizer (fp32 master copy + Adam's two moments =
12), stage 1 keeps P + G + K/N, stage 2 P + (G + K)/N, stage 3 (P + G + K)/N of P + G + K.

The model is ``configs/models/tiny.yaml`` with every tower ``--width`` wide (512: 27.7 M parameters, its
weight matrices above ZeRO-3's ``stage3_param_persistence_threshold`` of 1e5 elements, below which DeepSpeed
keeps a parameter whole on every rank; 0 keeps tiny's widths; ``--set model...`` changes more). A synthetic
dataset is written for its tokenizer and the batch (``--data`` reuses one).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from mmcl.config import Config, load_config
from mmcl.data.shards import build_loader
from mmcl.data.synthetic import synth
from mmcl.model import MultimodalModel
from mmcl.train.engine import make_engine
from mmcl.train.loop import seed_everything
from mmcl.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "models" / "tiny.yaml"
BATCH = 4


def live_tensor_bytes() -> int:
    """Bytes of the distinct tensor storages reachable from Python objects in this process, with the
    parameters' ``.grad`` (held by autograd, without a Python object until asked for)."""
    gc.collect()
    storages: dict[tuple[str, int], int] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or obj.is_meta:
            continue
        for t in (obj, obj.grad) if isinstance(obj, torch.nn.Parameter) and obj.grad is not None else (obj,):
            st = t.untyped_storage()
            storages[(str(st.device), st.data_ptr())] = st.nbytes()
    storages.pop(("cpu", 0), None)
    return sum(storages.values())


def bench_config(data: Path, stage: int, width: int, overrides: list[str]) -> Config:
    model = yaml.safe_load(TINY.read_text())
    model["modalities"]["text"]["tokenizer"] = str(data / "tokenizer.model")
    for spec in model["modalities"].values():
        spec["tower"]["width"] = width or spec["tower"]["width"]
    world = json.loads((data / "world.json").read_text())
    return load_config(base={
        "model": model,
        "data": {"train": str(data / world["splits"]["train"]["pattern"]), "batch_size": BATCH},
        "train": {"steps": 2, "grad_accum": 2,
                  "deepspeed": str(ROOT / "configs" / "deepspeed" / f"zero{stage}.json")},
    }, overrides=overrides)


def worker(data: Path, stage: int, width: int, out: Path, overrides: list[str]) -> None:
    """One rank: measure, write ``out/rank<r>.json``."""
    cfg = bench_config(data, stage, width, overrides)
    seed_everything(0)
    probe = MultimodalModel(cfg.model, cfg.objective)
    n_params = sum(p.numel() for p in probe.parameters())
    buffers = sum(b.numel() * b.element_size() for b in probe.buffers())
    engine = make_engine(cfg, probe)
    batch = next(iter(build_loader(cfg.data.train, probe.processors, BATCH, train=False)))
    inputs = {k: v.to(engine.device) for k, v in batch["inputs"].items()}
    present = {k: v.to(engine.device) for k, v in batch["present"].items()}
    del probe, batch
    before = live_tensor_bytes()

    model = MultimodalModel(cfg.model, cfg.objective)
    engine.prepare(model, build_optimizer(model, cfg, {}))
    del model
    states = 0
    for step in range(2):  # two micro-batches a step, measured after each backward of the second step
        for micro in range(2):
            loss = engine.inner.objective(engine.model(inputs), present)
            engine.backward(loss, last=micro == 1)
            del loss
            if step == 1:
                states = max(states, live_tensor_bytes() - before - buffers)
        engine.step()
    result = {"stage": stage, "ranks": engine.world, "rank": engine.rank, "params": n_params,
              "model_state_bytes": states}
    (out / f"rank{engine.rank}.json").write_text(json.dumps(result))
    engine.wait()
    engine.end()


def launch(data: Path, stage: int, ranks: int, width: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               __file__, "--worker", "--stage", str(stage), "--width", str(width), "--data", str(data), "--out", tmp]
        for o in overrides:
            cmd += ["--set", o]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            sys.exit(f"bench/memory.py: stage {stage} x {ranks} rank(s) failed:\n{r.stdout[-3000:]}")
        per_rank = [json.loads((Path(tmp) / f"rank{i}.json").read_text()) for i in range(ranks)]
    if any(p["ranks"] != ranks for p in per_rank):
        sys.exit(f"bench/memory.py: asked for {ranks} ranks, the launch ran {per_rank[0]['ranks']}")
    return {"stage": stage, "ranks": ranks, "params": per_rank[0]["params"],
            "model_state_bytes_per_rank": max(p["model_state_bytes"] for p in per_rank)}


def theory(stage: int, ranks: int, p: float = 4, g: float = 4, k: float = 12) -> float:
    per_rank = {1: p + g + k / ranks, 2: p + (g + k) / ranks, 3: (p + g + k) / ranks}[stage]
    return per_rank / (p + g + k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--width", type=int, default=512, help="every tower's width (0: tiny's own)")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.data, args.stage, args.width, args.out, args.overrides)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        if not (data / "world.json").is_file():
            synth(data, train=2 * BATCH, test=BATCH, per_shard=BATCH, workers=1)
        rows = []
        for stage in args.stages:
            one = launch(data, stage, 1, args.width, args.overrides)
            many = launch(data, stage, args.ranks, args.width, args.overrides)
            for r in (one, many):
                print(json.dumps(r), flush=True)
            rows.append((stage, one, many))
    print(f"\n{'stage':>5} {'params':>10} {'1 rank MB':>10} {f'{args.ranks} ranks MB':>11} {'ratio':>7} {'theory':>7}")
    for stage, one, many in rows:
        a, b = one["model_state_bytes_per_rank"], many["model_state_bytes_per_rank"]
        print(f"{stage:>5} {one['params']:>10,} {a / 2**20:>10.2f} {b / 2**20:>11.2f} {b / a:>7.3f} "
              f"{theory(stage, args.ranks):>7.3f}")


if __name__ == "__main__":
    main()
