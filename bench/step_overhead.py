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
from mmcl.train.loop import lr_lambda, seed_everything, train

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


def mmcl_loop(cfg: Config, out: Path) -> list[float]:
    """Seconds per step of each epoch after the first, from the loop's own log (one record per epoch)."""
    train(cfg, out)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    per_step = cfg.data.batch_size
    return [per_step / r["samples_per_s"] for r in records[1:]]


def hand_loop(cfg: Config) -> list[float]:
    """Seconds per step of each epoch after the first."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed_everything(cfg.train.seed)
    model = MultimodalModel(cfg.model, cfg.objective).to(device)
    loader = build_loader(cfg.data.train, model.processors, cfg.data.batch_size, train=True, workers=0,
                          shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed, cache=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  eps=cfg.train.eps, weight_decay=cfg.train.weight_decay)
    steps_per_epoch = -(-loader.size // cfg.data.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.warmup_steps, cfg.train.epochs * steps_per_epoch, cfg.train.schedule))
    model.train()
    times = []
    for epoch in range(cfg.train.epochs):
        loader.set_epoch(epoch)
        start, steps = time.perf_counter(), 0
        for batch in loader:
            inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
            present = {k: v.to(device) for k, v in batch["present"].items()}
            loss = model(inputs, present)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            model.objective.clamp_()
            steps += 1
        loss.item()
        if epoch > 0:
            times.append((time.perf_counter() - start) / steps)
    return times


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
        mmcl, hand = [], []
        for i in range(args.repeat):
            hand += hand_loop(cfg)
            mmcl += mmcl_loop(cfg, Path(tmp) / f"run{i}")
            print(json.dumps({"repeat": i, "hand_s_per_step": hand[-(args.epochs - 1):],
                              "mmcl_s_per_step": mmcl[-(args.epochs - 1):]}), flush=True)
    h, m = statistics.median(hand), statistics.median(mmcl)
    print(json.dumps({"batch": args.batch, "epochs_timed": len(hand), "device": "cuda" if torch.cuda.is_available()
                      else "cpu", "threads": torch.get_num_threads(), "hand_s_per_step": round(h, 5),
                      "mmcl_s_per_step": round(m, 5), "overhead_ms_per_step": round(1000 * (m - h), 2),
                      "ratio": round(m / h, 4), "hand_best_s_per_step": round(min(hand), 5),
                      "mmcl_best_s_per_step": round(min(mmcl), 5), "best_ratio": round(min(mmcl) / min(hand), 4)}))


if __name__ == "__main__":
    main()
