"""The one training loop, on ``accelerate``: single-process CPU/GPU, DDP (``torchrun`` / ``accelerate
launch``) and DeepSpeed ZeRO-1/2/3 (accelerate's DeepSpeed plugin, whether started by ``accelerate launch``
or by the ``deepspeed`` launcher). Writes ``DIR/log.jsonl``, tensorboard logs under ``DIR/tb``,
``DIR/checkpoints/step_N/``, ``DIR/final/`` (save_pretrained format) and ``DIR/eval/``.

Gradient accumulation keeps the contrastive negatives of the whole accumulated batch (open_clip's
accum-freq): every micro-batch is first encoded without gradient, then re-encoded with gradient one at a
time and the loss computed against the cached embeddings of the others, so the summed gradients equal the
gradient of the large-batch loss (the towers must be deterministic between the two passes: no dropout).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
from torch import nn
from tqdm import tqdm

from mmcl.config import Config, ConfigError, save_config, to_dict
from mmcl.data.shards import Loader, build_loader, expand_shards
from mmcl.model import MultimodalModel
from mmcl.train.checkpoint import (
    checkpoint_tmp_dir,
    commit_checkpoint,
    load_checkpoint,
    resolve_resume,
    rng_state,
    set_rng_state,
    write_checkpoint_files,
)

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
            raise ConfigError(f"train.towers.{name}.{unknown[0]}: unknown field "
                              f"(allowed: {', '.join(sorted(TOWER_CONTROLS))})")
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
    lines = [f"{'part':<14} {'trainable':>12} {'frozen':>12}"]
    parts = {f"tower:{n}": model.towers[n] for n in model.towers}
    parts.update({f"head:{n}": model.heads[n] for n in model.heads})
    parts["objective"] = model.objective
    for name, mod in parts.items():
        tr = sum(p.numel() for p in mod.parameters() if p.requires_grad)
        fr = sum(p.numel() for p in mod.parameters() if not p.requires_grad)
        lines.append(f"{name:<14} {tr:>12,} {fr:>12,}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Engines


def deepspeed_config(cfg: Config, path: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON and fill its "auto" fields from the train config; a field set to a value that
    disagrees with the train config is a one-line error (DeepSpeed would otherwise fail mid-setup)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed: file not found: {path}")
    ds = json.loads(p.read_text())
    wanted = {"train_micro_batch_size_per_gpu": cfg.data.batch_size,
              "gradient_accumulation_steps": cfg.train.grad_accum,
              "gradient_clipping": cfg.train.clip_grad}
    for key, value in wanted.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(f"train.deepspeed: {path} sets {key}={ds[key]} but the train config gives {value} "
                              f"(set it to \"auto\" or make them agree)")
    if "train_batch_size" in ds and ds["train_batch_size"] != "auto":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        expect = cfg.data.batch_size * cfg.train.grad_accum * world
        if ds["train_batch_size"] != expect:
            raise ConfigError(f"train.deepspeed: {path} sets train_batch_size={ds['train_batch_size']} but "
                              f"data.batch_size x train.grad_accum x world = {expect}")
    ds.pop("train_batch_size", None)
    for prec in ("bf16", "fp16"):
        if isinstance(ds.get(prec), dict) and ds[prec].get("enabled") == "auto":
            ds[prec]["enabled"] = cfg.train.precision == prec and torch.cuda.is_available()
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def make_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    precision = cfg.train.precision if cuda else "fp32"
    # On CPU accelerate must be told gloo, else it believes the world size is 1 (see shared/ENV.md).
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not cuda else []
    kwargs: dict[str, Any] = {}
    ds_path = cfg.train.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if ds_path:
        os.environ.pop("ACCELERATE_DEEPSPEED_CONFIG_FILE", None)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, ds_path))
    return Accelerator(cpu=not cuda, mixed_precision={"fp32": "no"}.get(precision, precision),
                       kwargs_handlers=handlers, **kwargs)


def zero_stage(accelerator: Accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


class JsonlLog:
    """``log.jsonl``: one JSON object per line, flushed as written (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.f = open(path, "a") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


# ----------------------------------------------------------------------------------------------------
# The step


def micro_batches(loader: Loader, accum: int) -> Iterator[list[dict[str, Any]]]:
    """Group the loader's batches ``accum`` at a time (a short group at the end of an epoch is kept)."""
    group: list[dict[str, Any]] = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []
    if group:
        yield group


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def train_step(accelerator: Accelerator, model: nn.Module, inner: MultimodalModel,
               group: list[dict[str, Any]]) -> torch.Tensor:
    """Forward and backward of one optimizer step over ``group`` (micro-batches). Returns the loss."""
    if len(group) == 1:
        loss = model(group[0]["inputs"], group[0]["present"])
        accelerator.backward(loss)
        return loss.detach()
    present = _cat([b["present"] for b in group])
    with torch.no_grad():
        cached = [model(b["inputs"], embeddings_only=True) for b in group]
    loss_value = torch.zeros(())
    for j, b in enumerate(group):
        last = j == len(group) - 1
        sync = nullcontext() if last or zero_stage(accelerator) else accelerator.no_sync(model)
        with sync:
            fresh = model(b["inputs"], embeddings_only=True)
            emb = _cat([fresh if i == j else c for i, c in enumerate(cached)])
            loss = inner.objective(emb, present)
            # DeepSpeed divides every backward by its accumulation steps; each of these losses is already
            # the whole batch's loss, so undo that division.
            accelerator.backward(loss * len(group) if zero_stage(accelerator) else loss)
        loss_value = loss.detach()
    return loss_value


# ----------------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, out_dir: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns ``{"train": {...}, "data": {"skipped": ...}, **eval results}``."""
    out = Path(out_dir)
    expand_shards(cfg.data.train)  # fail on a bad shard spec before building anything
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)

    # Initial weights must not depend on the rank: build on the common seed, then reseed per rank.
    seed_everything(cfg.train.seed)
    model = MultimodalModel(cfg.model, cfg.objective)
    seed_everything(cfg.train.seed + rank)
    tower_lrs = apply_tower_controls(model, cfg.train.towers)
    loader = build_loader(
        cfg.data.train, model.modalities, cfg.data.batch_size, train=True, workers=cfg.data.workers, world=world,
        shuffle_buffer=cfg.data.shuffle_buffer, shard_shuffle=cfg.data.shard_shuffle, resample=cfg.data.resample,
        seed=cfg.train.seed, on_missing=cfg.data.on_missing, cache=cfg.data.cache)
    accum = cfg.train.grad_accum
    if cfg.train.steps > 0:
        total_steps = cfg.train.steps
    elif loader.size is not None and not cfg.data.resample:
        total_steps = cfg.train.epochs * math.ceil(loader.size / (cfg.data.batch_size * world * accum))
    else:
        raise ConfigError("train.steps: the dataset size is unknown (no sizes.json, or data.resample): "
                          "set train.steps > 0")

    optimizer = torch.optim.AdamW(param_groups(model, cfg, tower_lrs), lr=cfg.train.lr,
                                  betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.warmup_steps, total_steps, cfg.train.schedule))

    ckpt_root = out / "checkpoints"
    position = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0}
    skipped: Counter = Counter()
    resume_path = resolve_resume(resume, ckpt_root) if resume else None
    resume_state = None
    if resume_path is not None:
        weights, resume_state = load_checkpoint(resume_path)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ConfigError(f"--resume {resume_path}: the checkpoint does not fit this model "
                              f"(missing keys {missing[:3]}, unexpected keys {unexpected[:3]})")

    model, optimizer = accelerator.prepare(model, optimizer)
    inner: MultimodalModel = accelerator.unwrap_model(model)
    if resume_state is not None:
        if zero_stage(accelerator):
            model.load_checkpoint(str(resume_path / "deepspeed"), load_module_strict=True)
        else:
            optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        position = {k: resume_state[k] for k in position}
        skipped.update(resume_state.get("skipped", {}))
        rngs = resume_state["rng"]
        if len(rngs) != world:
            raise ConfigError(f"--resume {resume_path}: written by {len(rngs)} rank(s), resumed with {world}")
        set_rng_state(rngs[rank])
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, position["step"],
                 position["epoch"], position["batch_in_epoch"])

    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        log.info("world size %d, ZeRO stage %d, parameters:\n%s", world, zero_stage(accelerator),
                 parameter_report(inner))
    jlog = JsonlLog(out / "log.jsonl", main)
    tb = None
    if main:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(out / "tb"))

    step = position["step"]
    bar = tqdm(total=total_steps, initial=step, disable=not (main and cfg.train.progress), dynamic_ncols=True,
               desc="train")
    t_start = time.time()
    t_window, samples_window = time.time(), 0
    model.train()
    done = step >= total_steps
    while not done:
        loader.set_epoch(position["epoch"])
        to_skip = position["batch_in_epoch"]
        for group in micro_batches(loader, accum):
            if to_skip > 0:  # resuming mid-epoch: the stream is deterministic, fast-forward it
                to_skip -= 1
                continue
            loss = train_step(accelerator, model, inner, group)
            if cfg.train.clip_grad > 0 and not zero_stage(accelerator):
                accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            clamp_objective(inner, zero_stage(accelerator))
            n = sum(len(b["keys"]) for b in group)
            step += 1
            position.update(step=step, batch_in_epoch=position["batch_in_epoch"] + 1)
            position["samples"] += n * world
            samples_window += n * world
            bar.update(1)
            skipped.update(loader.skipped)
            loader.skipped.clear()
            if step % cfg.train.log_every == 0 or cfg.train.log_keys or step == total_steps:
                now = time.time()
                mean_loss = accelerator.reduce(loss, "mean").item() if world > 1 else loss.item()
                rec = {"step": step, "epoch": position["epoch"], "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                       "samples": position["samples"], "samples_per_s": samples_window / max(now - t_window, 1e-9),
                       **inner.objective.logs()}
                if skipped:
                    rec["skipped"] = dict(skipped)
                if cfg.train.log_keys:
                    keys = [k for b in group for k in b["keys"]]
                    rec["keys"] = [k for part in accelerator.gather_for_metrics([keys], use_gather_object=True)
                                   for k in part] if world > 1 else keys
                jlog.write(rec)
                if tb:
                    for k in ("loss", "lr", "samples_per_s", *inner.objective.logs()):
                        tb.add_scalar(f"train/{k}", rec[k], step)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.0f}")
                t_window, samples_window = now, 0
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                save_training_checkpoint(accelerator, model, optimizer, scheduler, ckpt_root, cfg, position, skipped)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps:
                _periodic_eval(accelerator, model, inner, cfg, step, jlog, tb)
            if step >= total_steps:
                done = True
                break
        skipped.update(loader.skipped)
        loader.skipped.clear()
        if not done:
            position.update(epoch=position["epoch"] + 1, batch_in_epoch=0)
    bar.close()
    seconds = time.time() - t_start
    summary: dict[str, Any] = {"train": {"steps": step, "samples": position["samples"], "seconds": round(seconds, 2),
                                         "samples_per_s": position["samples"] / max(seconds, 1e-9)},
                               "data": {"skipped": dict(skipped)}}
    final = export_model(accelerator, model, inner, cfg)
    if main:
        final.save_pretrained(out / "final")
        if cfg.eval.suite:
            from mmcl.eval.suite import load_suite, run_suite

            results = run_suite(final, load_suite(cfg.eval.suite), cfg.data.test, workers=cfg.data.workers,
                                out_dir=out / "eval", model_name=str(out / "final"))
            summary.update({k: v for k, v in results.items() if k != "eval_data"})
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        tb.close()
    jlog.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def clamp_objective(inner: MultimodalModel, stage: int) -> None:
    """The logit-scale clamp after each step; under ZeRO-3 the scale is partitioned, so gather it first."""
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(inner.objective.parameters()), modifier_rank=0):
            inner.objective.clamp_()
    else:
        inner.objective.clamp_()


def full_state_dict(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's fp32 weights on the main process (gathered under ZeRO-3); None elsewhere."""
    sd = accelerator.get_state_dict(model)
    if sd is None:
        return None
    return {k: v.float() for k, v in sd.items()}


def export_model(accelerator: Accelerator, model: nn.Module, inner: MultimodalModel, cfg: Config) -> MultimodalModel:
    """A plain single-device model with the trained weights (ZeRO-3 shards gathered), for save and eval."""
    if zero_stage(accelerator) != 3:
        return inner
    sd = full_state_dict(accelerator, model)
    fresh = MultimodalModel(cfg.model, cfg.objective)
    if sd is not None:
        fresh.load_state_dict(sd)
    return fresh


def save_training_checkpoint(accelerator: Accelerator, model: nn.Module, optimizer, scheduler, ckpt_root: Path,
                             cfg: Config, position: dict[str, int], skipped: Counter) -> None:
    """Every rank contributes its RNG state (and, under DeepSpeed, its optimizer shards); the main process
    writes weights + state and renames the directory into place once all ranks are done."""
    world = accelerator.num_processes
    rngs = accelerator.gather_for_metrics([rng_state()], use_gather_object=True) if world > 1 else [rng_state()]
    tmp = checkpoint_tmp_dir(ckpt_root, position["step"]) if accelerator.is_main_process else None
    if world > 1:
        holder = [str(tmp) if tmp else None]
        torch.distributed.broadcast_object_list(holder, src=0)
        tmp = Path(holder[0])
    stage = zero_stage(accelerator)
    if stage:
        model.save_checkpoint(str(tmp / "deepspeed"), tag="state")
    weights = full_state_dict(accelerator, model) if stage == 3 else accelerator.unwrap_model(model).state_dict()
    if accelerator.is_main_process:
        state = {"scheduler": scheduler.state_dict(), "rng": rngs, "config": to_dict(cfg),
                 "skipped": dict(skipped), **position}
        if not stage:
            state["optimizer"] = optimizer.state_dict()
        write_checkpoint_files(tmp, weights, state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit_checkpoint(tmp, ckpt_root, position["step"], cfg.train.keep_last)
    accelerator.wait_for_everyone()


def _periodic_eval(accelerator: Accelerator, model: nn.Module, inner: MultimodalModel, cfg: Config, step: int,
                   jlog: JsonlLog, tb) -> None:
    if not cfg.eval.suite:
        return
    plain = export_model(accelerator, model, inner, cfg)
    if accelerator.is_main_process:
        from mmcl.eval.suite import load_suite, run_suite

        results = run_suite(plain, load_suite(cfg.eval.suite), cfg.data.test, workers=cfg.data.workers)
        flat = {f"eval/{kind}/{task}/{m}": v for kind in ("zeroshot_classification", "retrieval")
                for task, ms in results[kind].items() for m, v in ms.items() if isinstance(v, float)}
        jlog.write({"step": step, **flat})
        if tb:
            for k, v in flat.items():
                if not math.isnan(v):
                    tb.add_scalar(k, v, step)
    accelerator.wait_for_everyone()
