"""Step time of the mmcl training loop against a hand-written PyTorch loop: same model, same batches.

    python bench/step_overhead.py [--data DIR] [--samples 256] [--batch 32] [--epochs 4] [--repeat 5]
                                  [--threads 1] [--set KEY=VALUE ...]

Both loops train the tiny model (``configs/models/tiny.yaml``; ``--set`` overrides any field of the train
config) with AdamW, warm-up + cosine, clip-grad and the logit-scale clamp, in one process, on the same
shards read through the same loader with ``data.cache`` on: after the first epoch the decoded samples come
from RAM, so both pay the same, small data cost (transform + collate). The hand-written loop is the plain
``forward / backward / clip / step / schedule / zero_grad / clamp``; the mmcl loop is ``mmcl.train.loop.train``
with everything it does per step (accelerate, bookkeeping, logging every epoch). The first epoch (decoding,
warm-up) is not timed. The two loops alternate ``--repeat`` times; the medians of seconds per step are
compared, and the minima (each loop's least disturbed epoch: on a shared machine the closer estimate).
Beside wall time, the CPU seconds of each whole run (every epoch, the untimed first included; this
process's user + system time) per step: on a loaded machine it is the steadier figure.
Both run on ``--threads`` intra-op threads (default 1: on a busy machine a parallel region waits for its
slowest thread, and the swings of that wait dwarf the overhead measured). ``--data`` reuses (or writes) a
synthetic dataset there, else one goes to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from mmcl.config import Config, load_config
from mmcl.data.shards import build_loader
from mmcl.data.synthetic import synth
from mmcl.model import MultimodalModel
from mmcl.train.loop import seed_everything, train
from mmcl.train.optim import apply_tower_controls, build_optimizer, build_scheduler

TINY = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"


def make_config(data: Path, samples: int, batch: int, epochs: int, threads: int, overrides: list[str]) -> Config:
    model = yaml.safe_load(TINY.read_text())
    model["modalities"]["text"]["tokenizer"] = str(data / "tokenizer.model")
    world = json.loads((data / "world.json").read_text())
    base = {
        "model": model,
        "objective": {"name": "clip"},
        "data": {"train": str(data / world["splits"]["train"]["pattern"]), "batch_size": batch, "workers": 0,
                 "shuffle_buffer": samples, "cache": True},
        "train": {"epochs": epochs, "warmup_steps": 2, "log_every": samples // batch, "progress": False,
                  "threads": threads},
    }
    return load_config(base=base, overrides=overrides)


def mmcl_loop(cfg: Config, out: Path) -> tuple[list[float], float]:
    """Seconds per step of each epoch after the first, from the loop's own log (one record per epoch), and
    CPU seconds per step of the whole run."""
    cpu = time.process_time()
    summary = train(cfg, out)
    cpu = (time.process_time() - cpu) / summary["train"]["steps"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    per_step = cfg.data.batch_size
    return [per_step / r["samples_per_s"] for r in records[1:]], cpu


def hand_loop(cfg: Config) -> tuple[list[float], float]:
    """Seconds per step of each epoch after the first, and CPU seconds per step of the whole run."""
    cpu = time.process_time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(cfg.train.seed)
    model = MultimodalModel(cfg.model, cfg.objective).to(device)
    loader = build_loader(cfg.data.train, model.processors, cfg.data.batch_size, train=True, workers=0,
                          shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed, cache=True)
    optimizer = build_optimizer(model, cfg, apply_tower_controls(model, cfg.train.towers))
    scheduler = build_scheduler(optimizer, cfg, cfg.train.epochs * -(-loader.size // cfg.data.batch_size))
    model.train()
    times, total = [], 0
    for epoch in range(cfg.train.epochs):
        loader.set_epoch(epoch)
        start, steps = time.perf_counter(), 0
        for batch in loader:
            inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
            present = {k: v.to(device) for k, v in batch["present"].items()}
            loss = model.objective(model(inputs), present)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            model.objective.clamp_()
            steps += 1
        loss.item()
        total += steps
        if epoch > 0:
            times.append((time.perf_counter() - start) / steps)
    return times, (time.process_time() - cpu) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.samples % args.batch:
        parser.error("--samples must be a multiple of --batch (whole epochs of full batches)")

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        if not (data / "world.json").is_file():
            synth(data, train=args.samples, test=16, per_shard=args.samples // 4, workers=2)
        cfg = make_config(data, args.samples, args.batch, args.epochs, args.threads, args.overrides)
        torch.set_num_threads(cfg.train.threads)
        mmcl, hand, mmcl_cpu, hand_cpu = [], [], [], []
        for i in range(args.repeat):
            times, cpu = hand_loop(cfg)
            hand += times
            hand_cpu.append(cpu)
            times, cpu = mmcl_loop(cfg, Path(tmp) / f"run{i}")
            mmcl += times
            mmcl_cpu.append(cpu)
            print(json.dumps({"repeat": i, "hand_s_per_step": hand[-(args.epochs - 1):],
                              "mmcl_s_per_step": mmcl[-(args.epochs - 1):], "hand_cpu_s_per_step": hand_cpu[-1],
                              "mmcl_cpu_s_per_step": mmcl_cpu[-1]}), flush=True)
    h, m = statistics.median(hand), statistics.median(mmcl)
    hc, mc = statistics.median(hand_cpu), statistics.median(mmcl_cpu)
    print(json.dumps({"batch": args.batch, "epochs_timed": len(hand), "device": "cuda" if torch.cuda.is_available()
                      else "cpu", "threads": torch.get_num_threads(), "hand_s_per_step": round(h, 5),
                      "mmcl_s_per_step": round(m, 5), "overhead_ms_per_step": round(1000 * (m - h), 2),
                      "ratio": round(m / h, 4), "hand_best_s_per_step": round(min(hand), 5),
                      "mmcl_best_s_per_step": round(min(mmcl), 5), "best_ratio": round(min(mmcl) / min(hand), 4),
                      "hand_cpu_s_per_step": round(hc, 5), "mmcl_cpu_s_per_step": round(mc, 5),
                      "cpu_ratio": round(mc / hc, 4)}))


if __name__ == "__main__":
    main()
