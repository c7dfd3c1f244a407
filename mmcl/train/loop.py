"""The one training loop, over an engine (:mod:`mmcl.train.engine`): single-process CPU/GPU, DDP
(``torchrun`` / ``accelerate launch``) and DeepSpeed ZeRO-1/2/3 (accelerate's DeepSpeed plugin, whether
started by ``accelerate launch``, by the ``deepspeed`` launcher or by ``torchrun`` with ``train.deepspeed``
set) run the same body. Writes ``DIR/log.jsonl``, tensorboard logs under ``DIR/tb``,
``DIR/checkpoints/step_N/``, ``DIR/final/`` (save_pretrained format), ``DIR/results.json`` and ``DIR/eval/``.

The components: :mod:`~mmcl.train.optim` (tower controls, parameter groups, schedule),
:mod:`~mmcl.train.step` (forward and backward of a step, gradient accumulation), :mod:`~mmcl.train.logs`,
:mod:`~mmcl.train.checkpoint`, :mod:`~mmcl.train.evaluate`.

Exact resume: the data stream is deterministic per (seed, epoch, rank, worker), so a resumed run
re-creates the epoch's loader from the RNG state the rank had when the epoch began (which also seeds the
loader workers), fast-forwards it by the optimizer steps already taken in the epoch, then restores the RNG
state the rank had at the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmcl.config import Config, ConfigError, save_config
from mmcl.data.shards import Loader, build_loader, expand_shards
from mmcl.model import MultimodalModel
from mmcl.train.checkpoint import (check_resume, load_checkpoint, resolve_resume, rng_state,
                                   save_training_checkpoint, set_rng_state)
from mmcl.train.engine import make_engine
from mmcl.train.evaluate import periodic_eval, save_final
from mmcl.train.feature_cache import FeatureCache
from mmcl.train.logs import RunLog
from mmcl.train.optim import apply_tower_controls, build_optimizer, build_scheduler, group_lrs, parameter_report
from mmcl.train.step import ForwardBackward, micro_batches, to_device

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_steps(cfg: Config, loader: Loader, world: int) -> int:
    """``train.steps``, else the optimizer steps of ``train.epochs`` over a dataset of known size."""
    if cfg.train.steps > 0:
        return cfg.train.steps
    if loader.size is not None and not cfg.data.resample:
        per_rank = loader.size / (cfg.data.batch_size * world)
        batches = math.floor(per_rank) if cfg.data.drop_last else math.ceil(per_rank)
        return cfg.train.epochs * math.ceil(batches / cfg.train.grad_accum)
    raise ConfigError("train.steps: the dataset size is unknown (no sizes.json, or data.resample): "
                      "set train.steps > 0")


#: The smallest global batch in which each sample has a negative (all of mmcl's objectives).
MIN_GLOBAL_BATCH = 2


def check_batch(cfg: Config, size: int | None, world: int) -> None:
    """One warning line when a step's global batch can be too small for the objective to have negatives; an
    error when ``data.drop_last`` leaves an epoch without a step."""
    per_step = cfg.data.batch_size * world
    batch = f"data.batch_size {cfg.data.batch_size} x {world} rank(s)"
    if per_step * cfg.train.grad_accum < MIN_GLOBAL_BATCH:
        log.warning("%s x train.grad_accum %d: a global batch of %d sample gives the %s objective no negatives: "
                    "raise data.batch_size", batch, cfg.train.grad_accum, per_step * cfg.train.grad_accum,
                    cfg.objective.name)
    if size is None or cfg.data.resample:
        return
    if cfg.data.drop_last and size < per_step:
        raise ConfigError(f"data.batch_size: {batch} = {per_step} per step exceeds the {size} training samples: "
                          f"with data.drop_last no step is left (lower data.batch_size)")
    if not cfg.data.drop_last and 0 < size % per_step < MIN_GLOBAL_BATCH:
        log.warning("data.drop_last is false and the last batch of an epoch holds %d sample (%d samples, %s): "
                    "it has no negatives for the %s objective (set data.drop_last: true)", size % per_step,
                    size, batch, cfg.objective.name)


def train(cfg: Config, out_dir: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns ``{"train": {...}, "data": {"skipped": ...}, **eval results}``."""
    out = Path(out_dir)
    expand_shards(cfg.data.train)  # fail on a bad shard spec before building anything
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    # Initial weights must not depend on the rank: build on the common seed (rank 0 builds them, the other
    # ranks only the architecture and receive rank 0's weights in prepare, or in the build under ZeRO-3),
    # then reseed per rank.
    engine = make_engine(cfg, MultimodalModel(cfg.model, cfg.objective, device="meta", pretrained=False))
    seed_everything(cfg.train.seed)
    model = engine.build_model()
    world, main = engine.world, engine.is_main
    seed_everything(cfg.train.seed + engine.rank)
    lrs = apply_tower_controls(model, cfg.train.towers)
    if cfg.train.compile:
        model.compile_towers()
    loader = build_loader(
        cfg.data.train, model.processors, cfg.data.batch_size, train=True, workers=cfg.data.workers, world=world,
        shuffle_buffer=cfg.data.shuffle_buffer, shard_shuffle=cfg.data.shard_shuffle, resample=cfg.data.resample,
        seed=cfg.train.seed, on_missing=cfg.data.on_missing, cache=cfg.data.cache, clip=cfg.data.clip,
        augment=cfg.data.augment, drop_last=cfg.data.drop_last, pin_memory=engine.device.type == "cuda",
        persistent_workers=cfg.data.persistent_workers, prefetch_factor=cfg.data.prefetch_factor)
    check_batch(cfg, loader.size, world)
    steps_total = total_steps(cfg, loader, world)
    optimizer = build_optimizer(model, cfg, lrs)
    scheduler = build_scheduler(optimizer, cfg, steps_total)

    ckpt_root = out / "checkpoints"
    position = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0}
    skipped: Counter = Counter()
    adjusted: Counter = Counter()  # samples changed to fit (data.clip: shorter than the window), this process
    resume_path = resolve_resume(resume, ckpt_root) if resume else None
    resume_state = None
    if resume_path is not None:
        weights, resume_state = load_checkpoint(resume_path)
        check_resume(resume_path, weights, resume_state, model, engine)
        engine.load_weights(model, weights)

    engine.prepare(model, optimizer)
    # every rank's batches are full (resampled, or the partial ones dropped): no batch-size exchange per step
    forward_backward = ForwardBackward(engine, full_batches=cfg.data.resample or cfg.data.drop_last)
    feature_cache = FeatureCache.for_run(cfg, engine.inner, out, engine.rank, engine.device, loader.size,
                                         getattr(engine, "stage", 0))
    resume_rng = None
    if resume_state is not None:
        engine.load_state(resume_path, resume_state)
        scheduler.load_state_dict(resume_state["scheduler"])
        position = {k: resume_state[k] for k in position}
        skipped.update(resume_state.get("skipped", {}))
        resume_rng = resume_state["rng"][engine.rank]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, position["step"],
                 position["epoch"], position["batch_in_epoch"])

    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        log.info("world size %d, %s, parameters:\n%s", world, engine.describe(), parameter_report(engine.inner))
    run_log = RunLog(out, main, position["step"] if resume_state is not None else None)

    step = position["step"]
    bar = tqdm(total=steps_total, initial=step, disable=not (main and cfg.train.progress), dynamic_ncols=True,
               desc="train")
    t_start = time.time()
    t_window, samples_window = time.time(), 0
    engine.model.train()
    done = step >= steps_total
    while not done:
        loader.set_epoch(position["epoch"])
        if resume_rng is not None:
            set_rng_state(resume_rng["epoch_start"])
        epoch_rng = rng_state()  # seeds this epoch's loader (and its workers)
        if feature_cache is not None:
            feature_cache.refresh()
        groups = micro_batches(loader, cfg.train.grad_accum)
        if resume_rng is not None:  # resuming mid-epoch: the stream is deterministic, fast-forward it
            for _ in range(position["batch_in_epoch"]):
                if next(groups, None) is None:
                    raise ConfigError(f"--resume {resume_path}: epoch {position['epoch']} of the data has fewer "
                                      f"than {position['batch_in_epoch']} steps: the data changed since")
            loader.skipped.clear()  # already counted in the checkpoint
            loader.adjusted.clear()
            set_rng_state(resume_rng["now"])
            resume_rng = None
        for group in groups:
            if feature_cache is not None:
                group = feature_cache(group)
            loss = forward_backward(to_device(group, engine.device))
            engine.step()
            scheduler.step()
            n = sum(len(b["keys"]) for b in group)
            step += 1
            position.update(step=step, batch_in_epoch=position["batch_in_epoch"] + 1)
            position["samples"] += n * world
            samples_window += n * world
            bar.update(1)
            skipped.update(loader.skipped)
            loader.skipped.clear()
            adjusted.update(loader.adjusted)
            loader.adjusted.clear()
            if step % cfg.train.log_every == 0 or cfg.train.log_keys or step == steps_total:
                now = time.time()
                values = engine.log_values(loss)  # the step's one host read
                scalars = [k for k in values if k != "loss"]
                rec = {"step": step, "epoch": position["epoch"], "loss": values["loss"],
                       "lr": cfg.train.lr * scheduler.lr_lambdas[0](scheduler.last_epoch),
                       "lrs": group_lrs(optimizer), "samples": position["samples"],
                       "samples_per_s": samples_window / max(now - t_window, 1e-9),
                       **{k: values[k] for k in scalars}}
                if skipped:
                    rec["skipped"] = dict(skipped)
                if feature_cache is not None:
                    rec["feature_cache"] = feature_cache.take_counts()
                if cfg.train.log_keys:
                    rec["keys"] = engine.gather_object([k for b in group for k in b["keys"]])
                    if cfg.data.clip is not None:  # [start, end] seconds of each key's window
                        rec["windows"] = engine.gather_object([w for b in group for w in b["windows"]])
                run_log.write(rec, {**{f"train/{k}": rec[k] for k in ("loss", "lr", "samples_per_s", *scalars)},
                                    **{f"train/lr/{k}": v for k, v in rec["lrs"].items()}})
                bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.0f}")
                t_window, samples_window = now, 0
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                save_training_checkpoint(engine, scheduler, ckpt_root, cfg, position, skipped, epoch_rng)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < steps_total:
                periodic_eval(engine, cfg, step, run_log)
            if step >= steps_total:
                done = True
                break
        skipped.update(loader.skipped)
        loader.skipped.clear()
        adjusted.update(loader.adjusted)
        loader.adjusted.clear()
        if cfg.train.steps <= 0 and position["epoch"] + 1 >= cfg.train.epochs:
            done = True  # the epochs are done (drop_last and skipped samples can make them shorter than estimated)
        if not done:
            position.update(epoch=position["epoch"] + 1, batch_in_epoch=0)
    bar.close()
    if feature_cache is not None:
        feature_cache.close()
    seconds = time.time() - t_start
    summary: dict[str, Any] = {"train": {"steps": step, "samples": position["samples"], "seconds": round(seconds, 2),
                                         "samples_per_s": position["samples"] / max(seconds, 1e-9),
                                         "world_size": world},
                               "data": {"skipped": dict(skipped)}}
    if adjusted:
        summary["data"]["adjusted"] = dict(adjusted)
    final = engine.export()
    if main:
        summary.update(save_final(final, cfg, out))
        (out / "results.json").write_text(json.dumps(summary, indent=2))
    run_log.close()
    engine.wait()
    engine.end()
    return summary
