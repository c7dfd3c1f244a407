"""The one training loop, on ``accelerate``: single-process CPU, DDP (torchrun / accelerate launch) and,
through accelerate's DeepSpeed plugin, ZeRO. Writes ``DIR/log.jsonl``, tensorboard logs under ``DIR/tb``,
``DIR/checkpoints/step_N/``, ``DIR/final/`` (save_pretrained format) and ``DIR/eval/``."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import nn
from tqdm import tqdm

from mmcl.config import Config, ConfigError, save_config, to_dict
from mmcl.data.shards import build_loader, expand_shards
from mmcl.model import MultimodalModel
from mmcl.train.checkpoint import load_checkpoint, resolve_resume, rng_state, save_checkpoint, set_rng_state

log = logging.getLogger(__name__)

#: Parameter names (substrings) never weight-decayed besides biases and norms: temperatures and bias.
NO_DECAY_NAMES = ("logit_scale", "logit_bias", "temperature", "missing")
TOWER_CONTROLS = {"lock", "unlocked_blocks", "lr", "grad_checkpointing"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_tower_controls(model: MultimodalModel, controls: dict[str, dict[str, Any]]) -> dict[str, float]:
    """LiT-style locking, partial unlocking and gradient checkpointing per tower. Returns per-tower lrs."""
    lrs = {}
    for name, ctl in controls.items():
        if name not in model.towers:
            raise ConfigError(f"train.towers.{name}: no such modality (allowed: {', '.join(model.towers)})")
        unknown = sorted(set(ctl) - TOWER_CONTROLS)
        if unknown:
            raise ConfigError(f"train.towers.{name}.{unknown[0]}: unknown field (allowed: {', '.join(sorted(TOWER_CONTROLS))})")
        tower = model.towers[name]
        if ctl.get("lock"):
            tower.requires_grad_(False)
            blocks = tower.blocks()
            n = int(ctl.get("unlocked_blocks", 0))
            if n > len(blocks):
                raise ConfigError(f"train.towers.{name}.unlocked_blocks: {n} > the tower's {len(blocks)} blocks")
            for blk in blocks[len(blocks) - n:] if n else []:
                blk.requires_grad_(True)
        if ctl.get("grad_checkpointing"):
            tower.set_grad_checkpointing(True)
        if "lr" in ctl:
            lrs[name] = float(ctl["lr"])
    return lrs


def param_groups(model: MultimodalModel, cfg: Config, tower_lrs: dict[str, float]) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms (1-D) and the objective's scalars; per-tower lrs."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim < 2 or any(s in name for s in NO_DECAY_NAMES) else cfg.train.weight_decay
        parts = name.split(".")
        lr = tower_lrs.get(parts[1], cfg.train.lr) if parts[0] in ("towers", "heads") else cfg.train.lr
        groups.setdefault((lr, decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def lr_lambda(warmup: int, total: int, schedule: str):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def parameter_report(model: MultimodalModel) -> str:
    lines = [f"{'part':<12} {'trainable':>12} {'frozen':>12}"]
    parts = {f"tower:{n}": model.towers[n] for n in model.towers}
    parts.update({f"head:{n}": model.heads[n] for n in model.heads})
    parts["objective"] = model.objective
    for name, mod in parts.items():
        tr = sum(p.numel() for p in mod.parameters() if p.requires_grad)
        fr = sum(p.numel() for p in mod.parameters() if not p.requires_grad)
        lines.append(f"{name:<12} {tr:>12,} {fr:>12,}")
    return "\n".join(lines)


def make_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    precision = cfg.train.precision if cuda else "fp32"
    # On CPU accelerate must be told gloo, else it believes the world size is 1 (see shared/ENV.md).
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not cuda else []
    return Accelerator(cpu=not cuda, mixed_precision={"fp32": "no"}.get(precision, precision),
                       kwargs_handlers=handlers)


class JsonlLog:
    def __init__(self, path: Path, enabled: bool):
        self.f = open(path, "a") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


def train(cfg: Config, out_dir: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns ``{"train": {...}, "data": {"skipped": ...}, **eval results}``."""
    out = Path(out_dir)
    expand_shards(cfg.data.train)  # fail on a bad shard spec before building anything
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed + rank)

    # The objective's init must not depend on the rank: build on the common seed, then reseed per rank.
    torch.manual_seed(cfg.train.seed)
    model = MultimodalModel(cfg.model, cfg.objective)
    seed_everything(cfg.train.seed + rank)
    tower_lrs = apply_tower_controls(model, cfg.train.towers)
    loader = build_loader(
        cfg.data.train, model.modalities, cfg.data.batch_size, train=True, workers=cfg.data.workers, world=world,
        shuffle_buffer=cfg.data.shuffle_buffer, shard_shuffle=cfg.data.shard_shuffle, resample=cfg.data.resample,
        seed=cfg.train.seed, on_missing=cfg.data.on_missing, cache=cfg.data.cache)
    if cfg.train.steps > 0:
        total_steps = cfg.train.steps
    elif loader.size is not None and not cfg.data.resample:
        total_steps = cfg.train.epochs * math.ceil(loader.size / (cfg.data.batch_size * world))
    else:
        raise ConfigError("train.steps: the dataset size is unknown (no sizes.json or data.resample): set train.steps > 0")

    optimizer = torch.optim.AdamW(param_groups(model, cfg, tower_lrs), lr=cfg.train.lr,
                                  betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.warmup_steps, total_steps, cfg.train.schedule))

    step, epoch, batch_in_epoch, samples = 0, 0, 0, 0
    skipped: Counter = Counter()
    ckpt_root = out / "checkpoints"
    if resume:
        path = resolve_resume(resume, ckpt_root)
        if path is not None:
            weights, state = load_checkpoint(path)
            missing, unexpected = model.load_state_dict(weights, strict=False)
            if missing or unexpected:
                raise ConfigError(f"--resume {path}: checkpoint does not fit this model "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            samples = state["samples"]
            skipped.update(state.get("skipped", {}))
            set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, step, epoch, batch_in_epoch)

    model, optimizer = accelerator.prepare(model, optimizer)
    inner: MultimodalModel = accelerator.unwrap_model(model)

    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        log.info("parameters:\n%s", parameter_report(inner))
    jlog = JsonlLog(out / "log.jsonl", main)
    tb = None
    if main:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(out / "tb"))

    bar = tqdm(total=total_steps, initial=step, disable=not (main and cfg.train.progress), dynamic_ncols=True,
               desc="train")
    t_start = time.time()
    t_window, samples_window = time.time(), 0
    model.train()
    done = step >= total_steps
    while not done:
        loader.set_epoch(epoch)
        to_skip = batch_in_epoch
        for batch in loader:
            if to_skip > 0:  # resuming mid-epoch: the stream is deterministic, fast-forward it
                to_skip -= 1
                continue
            n = len(batch["keys"])
            loss = model(batch["inputs"], batch["present"])
            accelerator.backward(loss)
            if cfg.train.clip_grad > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            inner.objective.clamp_()
            step += 1
            batch_in_epoch += 1
            samples += n * world
            samples_window += n * world
            bar.update(1)
            skipped.update(loader.skipped)
            loader.skipped.clear()
            if step % cfg.train.log_every == 0 or cfg.train.log_keys or step == total_steps:
                now = time.time()
                rec = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                       "samples": samples, "samples_per_s": samples_window / max(now - t_window, 1e-9),
                       **inner.objective.logs()}
                if skipped:
                    rec["skipped"] = dict(skipped)
                if cfg.train.log_keys:
                    rec["keys"] = batch["keys"]
                jlog.write(rec)
                if tb:
                    for k in ("loss", "lr", "samples_per_s", *inner.objective.logs()):
                        tb.add_scalar(f"train/{k}", rec[k], step)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.0f}")
                t_window, samples_window = now, 0
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                _checkpoint(accelerator, inner, optimizer, scheduler, ckpt_root, cfg,
                            step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, samples=samples, skipped=skipped)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps:
                _periodic_eval(accelerator, inner, cfg, step, jlog, tb)
            if step >= total_steps:
                done = True
                break
        skipped.update(loader.skipped)
        loader.skipped.clear()
        if not done:
            epoch += 1
            batch_in_epoch = 0
    bar.close()
    seconds = time.time() - t_start
    summary: dict[str, Any] = {"train": {"steps": step, "samples": samples, "seconds": round(seconds, 2),
                                         "samples_per_s": samples / max(seconds, 1e-9)},
                               "data": {"skipped": dict(skipped)}}
    accelerator.wait_for_everyone()
    if main:
        inner.save_pretrained(out / "final")
        if cfg.eval.suite:
            from mmcl.eval.suite import load_suite, run_suite

            results = run_suite(inner, load_suite(cfg.eval.suite), cfg.data.test, out_dir=out / "eval",
                                model_name=str(out / "final"))
            summary.update({k: v for k, v in results.items() if k != "eval_data"})
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        tb.close()
    jlog.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _checkpoint(accelerator: Accelerator, model: MultimodalModel, optimizer, scheduler, ckpt_root: Path,
                cfg: Config, **position: Any) -> None:
    rngs = accelerator.gather_for_metrics([rng_state()], use_gather_object=True) if accelerator.num_processes > 1 \
        else [rng_state()]
    if accelerator.is_main_process:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs,
                 "config": to_dict(cfg), **position}
        save_checkpoint(ckpt_root, position["step"], model.state_dict(), state, cfg.train.keep_last)
    accelerator.wait_for_everyone()


def _periodic_eval(accelerator: Accelerator, model: MultimodalModel, cfg: Config, step: int, jlog: JsonlLog,
                   tb) -> None:
    if accelerator.is_main_process and cfg.eval.suite:
        from mmcl.eval.suite import load_suite, run_suite

        results = run_suite(model, load_suite(cfg.eval.suite), cfg.data.test)
        flat = {f"eval/{kind}/{task}/{m}": v for kind in ("zeroshot_classification", "retrieval")
                for task, ms in results[kind].items() for m, v in ms.items() if isinstance(v, float)}
        jlog.write({"step": step, **flat})
        if tb:
            for k, v in flat.items():
                if not math.isnan(v):
                    tb.add_scalar(k, v, step)
    accelerator.wait_for_everyone()
