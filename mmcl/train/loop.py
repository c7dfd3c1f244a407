"""The one training loop, on ``accelerate``: single-process CPU/GPU, DDP (``torchrun`` / ``accelerate
launch``) and DeepSpeed ZeRO-1/2/3 (accelerate's DeepSpeed plugin, whether started by ``accelerate launch``,
by the ``deepspeed`` launcher or by ``torchrun`` with ``train.deepspeed`` set). Writes ``DIR/log.jsonl``,
tensorboard logs under ``DIR/tb``, ``DIR/checkpoints/step_N/``, ``DIR/final/`` (save_pretrained format),
``DIR/results.json`` and ``DIR/eval/``.

Gradient accumulation keeps the contrastive negatives of the whole accumulated batch (open_clip's
accum-freq): every micro-batch is first encoded without gradient, then re-encoded with gradient one at a
time and the loss computed against the cached embeddings of the others. Each of those backward passes
carries the whole batch's gradient for its own micro-batch's embeddings, so their sum is the large-batch
gradient of the towers; the objective's own parameters (logit scale, bias) see the whole loss every
time, so their gradient is divided by the number of micro-batches. The update therefore equals the
large-batch update, provided the towers are deterministic between the two passes (no dropout).

Exact resume: the data stream is deterministic per (seed, epoch, rank, worker), so a resumed run
re-creates the epoch's loader from the RNG state the rank had when the epoch began (which also seeds the
loader workers), fast-forwards it by the optimizer steps already taken in the epoch, then restores the RNG
state the rank had at the checkpoint.
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
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, gather_object
from torch import nn
from tqdm import tqdm

from mmcl.config import Config, ConfigError, save_config, to_dict
from mmcl.data.shards import Loader, build_loader, expand_shards
from mmcl.model import MultimodalModel
from mmcl.shared import TRUNK
from mmcl.train.checkpoint import (
    checkpoint_tmp_dir,
    commit_checkpoint,
    load_checkpoint,
    resolve_resume,
    rng_state,
    set_rng_state,
    write_state,
)

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

#: Parameter names (substrings) never weight-decayed besides biases and norms: temperatures and bias.
NO_DECAY_NAMES = ("logit_scale", "logit_bias", "temperature", "missing")
TOWER_CONTROLS = {"lock", "unlocked_blocks", "frozen_blocks", "lr", "grad_checkpointing"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_tower_controls(model: MultimodalModel, controls: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per tower: ``lock`` (LiT: the whole tower frozen, ``unlocked_blocks`` of its last blocks trainable
    again), ``frozen_blocks: N`` (the first N blocks frozen, with the stem registered before them: patch or
    token embedding and positions), ``grad_checkpointing`` and ``lr``. Returns the per-tower lrs. With a
    shared trunk the towers are the modalities' tokenisers (no blocks) and ``trunk`` (see mmcl.shared)."""
    lrs = {}
    for name, ctl in controls.items():
        if name not in model.towers:
            raise ConfigError(f"train.towers.{name}: no such tower (allowed: {', '.join(model.towers)})")
        unknown = sorted(set(ctl) - TOWER_CONTROLS)
        if unknown:
            raise ConfigError(f"train.towers.{name}.{unknown[0]}: unknown field "
                              f"(allowed: {', '.join(sorted(TOWER_CONTROLS))})")
        tower = model.towers[name]
        blocks = tower.blocks()
        if ctl.get("lock") and "frozen_blocks" in ctl:
            raise ConfigError(f"train.towers.{name}: lock and frozen_blocks exclude each other (lock freezes "
                              f"the whole tower; unlocked_blocks then unfreezes its last blocks)")
        if ctl.get("lock"):
            tower.requires_grad_(False)
            n = int(ctl.get("unlocked_blocks", 0))
            if not 0 <= n <= len(blocks):
                raise ConfigError(f"train.towers.{name}.unlocked_blocks: {n} is not in 0..{len(blocks)} "
                                  f"(the tower's blocks)")
            for blk in blocks[len(blocks) - n:] if n else []:
                blk.requires_grad_(True)
        elif "unlocked_blocks" in ctl:
            raise ConfigError(f"train.towers.{name}.unlocked_blocks: only meaningful with lock: true")
        if "frozen_blocks" in ctl:
            freeze_first_blocks(tower, blocks, int(ctl["frozen_blocks"]), f"train.towers.{name}.frozen_blocks")
        if ctl.get("grad_checkpointing"):
            if not blocks:
                hint = f" (the shared blocks are train.towers.{TRUNK})" if model.model_cfg.shared_trunk else ""
                raise ConfigError(f"train.towers.{name}.grad_checkpointing: the tower has no blocks to "
                                  f"checkpoint{hint}")
            tower.set_grad_checkpointing(True)
        if "lr" in ctl:
            lrs[name] = float(ctl["lr"])
    return lrs


def freeze_first_blocks(tower: nn.Module, blocks: list[nn.Module], n: int, where: str) -> None:
    """Freeze ``blocks[:n]`` and the tower's parameters registered before the first block (its stem)."""
    if not 0 <= n <= len(blocks):
        raise ConfigError(f"{where}: {n} is not in 0..{len(blocks)} (the tower's blocks)")
    if n == 0:
        return
    first = {id(p) for p in blocks[0].parameters()}
    for p in tower.parameters():
        if id(p) in first:
            break
        p.requires_grad_(False)
    for blk in blocks[:n]:
        blk.requires_grad_(False)


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


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
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


#: DeepSpeed's communication buffers are allocated at their configured size whatever the model's (its
#: default, 5e8 elements, is 2 GB in fp32 under ZeRO-3); "auto" sizes them to the largest parameter.
BUCKETS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")


def bucket_size(model: nn.Module) -> int:
    """Elements of the model's largest parameter, rounded up to a multiple of 1024 (DeepSpeed wants
    aligned buckets): the "auto" size of DeepSpeed's communication buckets (accelerate uses hidden^2)."""
    return -(-max(p.numel() for p in model.parameters()) // 1024) * 1024


def deepspeed_config(cfg: Config, path: str, world: int, bucket: int) -> dict[str, Any]:
    """Read a DeepSpeed JSON and fill its "auto" fields from the train config (batch sizes, accumulation,
    clipping, precision) and the model (communication buckets of ``bucket`` elements, see
    :func:`bucket_size`); a field set to a value that disagrees with the train config is a one-line error
    (DeepSpeed would otherwise fail mid-setup)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed: file not found: {path}")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed: {path} is not valid JSON ({e})") from None
    wanted = {"train_micro_batch_size_per_gpu": cfg.data.batch_size,
              "gradient_accumulation_steps": cfg.train.grad_accum,
              "gradient_clipping": cfg.train.clip_grad,
              "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world}
    for key, value in wanted.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            source = ("data.batch_size x train.grad_accum x world size" if key == "train_batch_size"
                      else {"train_micro_batch_size_per_gpu": "data.batch_size",
                            "gradient_accumulation_steps": "train.grad_accum",
                            "gradient_clipping": "train.clip_grad"}[key])
            raise ConfigError(f"train.deepspeed: {path} sets {key}={ds[key]} but {source} = {value} "
                              f"(set it to \"auto\" or make them agree)")
    cuda = torch.cuda.is_available()
    for prec in ("bf16", "fp16"):
        section = ds.get(prec)
        if isinstance(section, dict) and section.get("enabled", False) == "auto":
            section["enabled"] = cfg.train.precision == prec and cuda
        elif isinstance(section, dict) and section.get("enabled") and not (cfg.train.precision == prec and cuda):
            raise ConfigError(f"train.deepspeed: {path} enables {prec} but train.precision={cfg.train.precision}"
                              f"{'' if cuda else ' and there is no GPU'} (set {prec}.enabled to \"auto\")")
    zero = ds.get("zero_optimization", {})
    for key in BUCKETS:
        if zero.get(key) == "auto":
            zero[key] = bucket
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def make_accelerator(cfg: Config, model: nn.Module) -> Accelerator:
    """The Accelerator for this launch (DeepSpeed when ``train.deepspeed`` or ``accelerate launch`` names a
    config; ``model`` sizes its "auto" buckets)."""
    cuda = torch.cuda.is_available()
    precision = cfg.train.precision if cuda else "fp32"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # On CPU accelerate must be told gloo, else it believes the world size is 1 (see shared/ENV.md).
    handlers = [InitProcessGroupKwargs(backend="gloo")] if world > 1 and not cuda else []
    kwargs: dict[str, Any] = {}
    ds_path = cfg.train.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if ds_path:
        os.environ.pop("ACCELERATE_DEEPSPEED_CONFIG_FILE", None)
        ds_config = deepspeed_config(cfg, ds_path, world, bucket_size(model))
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config)
    # accelerate drops a DeepSpeed plugin without a word when told cpu=True; it runs on CPU regardless.
    accelerator = Accelerator(cpu=not cuda and not ds_path, kwargs_handlers=handlers,
                              mixed_precision={"fp32": "no"}.get(precision, precision), **kwargs)
    if accelerator.num_processes != world:
        raise ConfigError(f"the launcher started {world} process(es) but accelerate sees "
                          f"{accelerator.num_processes}: check the launcher settings")
    if bool(ds_path) != uses_deepspeed(accelerator):
        hint = " (ACCELERATE_USE_CPU=1 in the environment drops it)" if os.environ.get("ACCELERATE_USE_CPU") else ""
        raise ConfigError(f"DeepSpeed config {ds_path} given but accelerate set up "
                          f"{accelerator.distributed_type}{hint}")
    return accelerator


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def zero_stage(accelerator: Accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


class JsonlLog:
    """``log.jsonl``: one JSON object per line, flushed as written (main process only). A resumed run first
    drops the records after its checkpoint's step (and a line torn by a crash), so the file tells the
    history of the weights the run ends with."""

    def __init__(self, path: Path, enabled: bool, resumed_at: int | None = None):
        if enabled and resumed_at is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= resumed_at]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, path)
        self.f = open(path, "a") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


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


def to_device(group: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """The micro-batches with their tensors on the training device (the loader yields CPU tensors)."""
    if device.type == "cpu":
        return group
    return [{**b, "inputs": {k: v.to(device, non_blocking=True) for k, v in b["inputs"].items()},
             "present": {k: v.to(device, non_blocking=True) for k, v in b["present"].items()}} for b in group]


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class ObjectiveGradScale:
    """Divides the gradient of the objective's parameters by the number of micro-batches of the step: each
    micro-batch's backward carries the whole accumulated batch's gradient for them (see the module doc)."""

    def __init__(self, objective: nn.Module):
        self.micro_batches = 1
        self.handles = [p.register_hook(self._scale) for p in objective.parameters() if p.requires_grad]

    def _scale(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / self.micro_batches if self.micro_batches > 1 else grad


def train_step(accelerator: Accelerator, model: nn.Module, inner: MultimodalModel,
               group: list[dict[str, Any]], objective_scale: ObjectiveGradScale) -> torch.Tensor:
    """Forward and backward of one optimizer step over ``group`` (micro-batches); under DeepSpeed also the
    update (its engine clips and steps). Returns the (local) loss of the whole group."""
    deepspeed = uses_deepspeed(accelerator)

    def backward(loss: torch.Tensor, last: bool) -> None:
        if deepspeed:
            # The boundary is set by hand: each of these losses is the whole group's loss (no division by
            # the accumulation steps), and a short group at the end of an epoch still ends in an update.
            model.set_gradient_accumulation_boundary(last)
            model.backward(loss, scale_wrt_gas=False)
        else:
            accelerator.backward(loss)

    objective_scale.micro_batches = len(group)
    if len(group) == 1:
        loss = model(group[0]["inputs"], group[0]["present"])
        backward(loss, True)
    else:
        present = _cat([b["present"] for b in group])
        with torch.no_grad():
            cached = [model(b["inputs"], embeddings_only=True) for b in group]
        for j, b in enumerate(group):
            last = j == len(group) - 1
            with nullcontext() if last or deepspeed else accelerator.no_sync(model):
                fresh = model(b["inputs"], embeddings_only=True)
                emb = _cat([fresh if i == j else c for i, c in enumerate(cached)])
                loss = inner.objective(emb, present)
                backward(loss, last)
    if deepspeed:
        model.step()
    return loss.detach()


def update(accelerator: Accelerator, model: nn.Module, inner: MultimodalModel, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LRScheduler, clip_grad: float) -> None:
    """After :func:`train_step`: clip, step and zero the gradients (DeepSpeed's engine did that already),
    advance the schedule, clamp the logit scale."""
    if not uses_deepspeed(accelerator):
        if clip_grad > 0:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    clamp_objective(accelerator, inner)


def clamp_objective(accelerator: Accelerator, inner: MultimodalModel) -> None:
    """The logit-scale clamp after each step. Under DeepSpeed the optimizer keeps its own fp32 copy of the
    weights (partitioned from ZeRO-1 on): a clamped value is written there too, else the next step would
    start again from the unclamped one."""
    if not uses_deepspeed(accelerator):
        inner.objective.clamp_()
        return
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    params = [p for p in inner.objective.parameters() if p.requires_grad]
    stage3 = zero_stage(accelerator) == 3
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0) if stage3 else nullcontext():
        before = [p.detach().float().clone() for p in params]
        inner.objective.clamp_()
        after = [p.detach().float().clone() for p in params]
    for p, b, a in zip(params, before, after):
        if torch.equal(a, b):
            continue
        if stage3:  # the gather's exit left this rank's partition of the clamped value in ds_tensor
            # (DeepSpeed 0.19's full-value setter fails on partitions padded past the parameter's end)
            safe_set_local_fp32_param(p, p.ds_tensor.detach().float())
        else:  # a collective; every rank computes the same clamp, so it runs everywhere
            safe_set_full_fp32_param(p, a)


def objective_logs(accelerator: Accelerator, inner: MultimodalModel) -> dict[str, float]:
    """The objective's scalars (logit scale ...); under ZeRO-3 gathered first (a collective)."""
    if zero_stage(accelerator) != 3:
        return inner.objective.logs()
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(inner.objective.parameters())):
        return inner.objective.logs()


# ----------------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config, out_dir: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns ``{"train": {...}, "data": {"skipped": ...}, **eval results}``."""
    out = Path(out_dir)
    expand_shards(cfg.data.train)  # fail on a bad shard spec before building anything
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    # Initial weights must not depend on the rank: build on the common seed, then reseed per rank.
    seed_everything(cfg.train.seed)
    model = MultimodalModel(cfg.model, cfg.objective)
    accelerator = make_accelerator(cfg, model)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    deepspeed = uses_deepspeed(accelerator)
    seed_everything(cfg.train.seed + rank)
    tower_lrs = apply_tower_controls(model, cfg.train.towers)
    loader = build_loader(
        cfg.data.train, model.processors, cfg.data.batch_size, train=True, workers=cfg.data.workers, world=world,
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
        check_resume(resume_path, weights, resume_state, model, world, deepspeed)
        model.load_state_dict(weights)

    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if deepspeed:
        lift_scalar_parameters(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner: MultimodalModel = accelerator.unwrap_model(model)
    objective_scale = ObjectiveGradScale(inner.objective)
    resume_rng = None
    if resume_state is not None:
        if deepspeed:
            model.load_checkpoint(str(resume_path / "deepspeed"), load_module_strict=True)
        else:
            optimizer.load_state_dict(resume_state["optimizer"])
        if accelerator.scaler is not None and resume_state.get("scaler"):
            accelerator.scaler.load_state_dict(resume_state["scaler"])
        scheduler.load_state_dict(resume_state["scheduler"])
        position = {k: resume_state[k] for k in position}
        skipped.update(resume_state.get("skipped", {}))
        resume_rng = resume_state["rng"][rank]
        if cfg.data.cache and position["epoch"] > 0:
            log.warning("data.cache: the epochs after the first are read from the RAM cache in another order "
                        "than from the shards, so after this resume the sample order differs from an "
                        "uninterrupted run's")
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, position["step"],
                 position["epoch"], position["batch_in_epoch"])

    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        log.info("world size %d, %s, parameters:\n%s", world,
                 f"DeepSpeed ZeRO stage {zero_stage(accelerator)}" if deepspeed else "no DeepSpeed",
                 parameter_report(inner))
    resumed_at = position["step"] if resume_state is not None else None
    jlog = JsonlLog(out / "log.jsonl", main, resumed_at)
    tb: SummaryWriter | None = None
    if main:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(out / "tb"), purge_step=None if resumed_at is None else resumed_at + 1)

    step = position["step"]
    bar = tqdm(total=total_steps, initial=step, disable=not (main and cfg.train.progress), dynamic_ncols=True,
               desc="train")
    t_start = time.time()
    t_window, samples_window = time.time(), 0
    model.train()
    done = step >= total_steps
    while not done:
        loader.set_epoch(position["epoch"])
        if resume_rng is not None:
            set_rng_state(resume_rng["epoch_start"])
        epoch_rng = rng_state()  # seeds this epoch's loader (and its workers)
        groups = micro_batches(loader, accum)
        if resume_rng is not None:  # resuming mid-epoch: the stream is deterministic, fast-forward it
            for _ in range(position["batch_in_epoch"]):
                if next(groups, None) is None:
                    raise ConfigError(f"--resume {resume_path}: epoch {position['epoch']} of the data has fewer "
                                      f"than {position['batch_in_epoch']} steps: the data changed since")
            loader.skipped.clear()  # already counted in the checkpoint
            set_rng_state(resume_rng["now"])
            resume_rng = None
        for group in groups:
            loss = train_step(accelerator, model, inner, to_device(group, accelerator.device), objective_scale)
            update(accelerator, model, inner, optimizer, scheduler, cfg.train.clip_grad)
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
                scalars = objective_logs(accelerator, inner)
                rec = {"step": step, "epoch": position["epoch"], "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                       "samples": position["samples"], "samples_per_s": samples_window / max(now - t_window, 1e-9),
                       **scalars}
                if skipped:
                    rec["skipped"] = dict(skipped)
                if cfg.train.log_keys:
                    keys = [k for b in group for k in b["keys"]]
                    rec["keys"] = gather_object(keys) if world > 1 else keys
                jlog.write(rec)
                if tb:
                    for k in ("loss", "lr", "samples_per_s", *scalars):
                        tb.add_scalar(f"train/{k}", rec[k], step)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.0f}")
                t_window, samples_window = now, 0
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                save_training_checkpoint(accelerator, model, optimizer, scheduler, ckpt_root, cfg, shapes,
                                         position, skipped, epoch_rng)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < total_steps:
                _periodic_eval(accelerator, model, cfg, shapes, step, jlog, tb)
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
                                         "samples_per_s": position["samples"] / max(seconds, 1e-9),
                                         "world_size": world},
                               "data": {"skipped": dict(skipped)}}
    final = export_model(accelerator, model, cfg, shapes)
    if main:
        final.save_pretrained(out / "final")
        if cfg.eval.suite:
            from mmcl.eval.suite import load_suite, run_suite

            from mmcl.hub import read_eval_dir, write_model_card

            results = run_suite(final, load_suite(cfg.eval.suite), cfg.data.test, workers=cfg.data.workers,
                                out_dir=out / "eval", model_name=str(out / "final"))
            summary.update({k: v for k, v in results.items() if k != "eval_data"})
            write_model_card(out / "final", read_eval_dir(out / "eval"), to_dict(cfg))
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        tb.close()
    jlog.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def check_resume(path: Path, weights: dict[str, torch.Tensor], state: dict[str, Any], model: MultimodalModel,
                 world: int, deepspeed: bool) -> None:
    """One-line errors for a checkpoint this run cannot continue from, before anything is trained."""
    theirs = {k: tuple(v.shape) for k, v in weights.items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if theirs != ours:
        diff = sorted(set(theirs) ^ set(ours)) or sorted(k for k in ours if theirs[k] != ours[k])
        raise ConfigError(f"--resume {path}: the checkpoint holds another model (first difference: {diff[0]})")
    if len(state["rng"]) != world:
        raise ConfigError(f"--resume {path}: written by {len(state['rng'])} rank(s), resumed with {world}")
    if deepspeed and not (path / "deepspeed").is_dir():
        raise ConfigError(f"--resume {path}: written without DeepSpeed, resumed with DeepSpeed")
    if not deepspeed and "optimizer" not in state:
        raise ConfigError(f"--resume {path}: written under DeepSpeed, resumed without it")


def lift_scalar_parameters(model: nn.Module) -> None:
    """Give 0-dim parameters (the objective's logit scale, bias, temperature) shape [1]: DeepSpeed 0.19
    broadcasts every parameter at start-up as ``p.data.view(torch.uint8)``, which fails on 0-dim tensors.
    The objectives broadcast them either way; :func:`full_state_dict` restores the shapes on export."""
    for p in model.parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)


def full_state_dict(accelerator: Accelerator, model: nn.Module,
                    shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights, in the model's own ``shapes``. Under DeepSpeed they come from the
    optimizer's fp32 copy, gathered from every rank's partition (a collective: every rank calls it and
    gets them)."""
    inner = accelerator.unwrap_model(model)
    if not uses_deepspeed(accelerator):
        return {k: v.detach().float().cpu() for k, v in inner.state_dict().items()}
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    stage3 = zero_stage(accelerator) == 3
    params = {id(p) for p in inner.parameters()}
    out = {}
    for name, tensor in inner.state_dict(keep_vars=True).items():
        value = safe_get_full_fp32_param(tensor) if id(tensor) in params else None
        if value is None:  # a buffer, or a frozen parameter (not in the optimizer)
            with deepspeed.zero.GatheredParameters([tensor]) if stage3 and id(tensor) in params else nullcontext():
                value = tensor.detach().clone()
        out[name] = value.float().cpu().reshape(shapes[name])
    return out


def export_model(accelerator: Accelerator, model: nn.Module, cfg: Config,
                 shapes: dict[str, torch.Size]) -> MultimodalModel:
    """A plain single-device model with the trained fp32 weights (gathered under DeepSpeed), for save and
    eval; a collective under DeepSpeed."""
    if not uses_deepspeed(accelerator):
        return accelerator.unwrap_model(model)
    fresh = MultimodalModel(cfg.model, cfg.objective)
    fresh.load_state_dict(full_state_dict(accelerator, model, shapes))
    return fresh


def save_training_checkpoint(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                             scheduler: torch.optim.lr_scheduler.LRScheduler, ckpt_root: Path, cfg: Config,
                             shapes: dict[str, torch.Size], position: dict[str, int], skipped: Counter,
                             epoch_rng: dict[str, Any]) -> None:
    """``step_N/``: the save_pretrained files (config.json, fp32 model.safetensors, tokenizer: loadable by
    ``from_pretrained``), ``state.pt`` (scheduler, grad scaler, every rank's RNG states, data position; the
    optimizer without DeepSpeed) and, under DeepSpeed, its own checkpoint of every rank's partitions in
    ``deepspeed/``. Written into a temporary directory that the main process renames into place once all
    ranks are done."""
    world = accelerator.num_processes
    rngs = [{"now": rng_state(), "epoch_start": epoch_rng}]
    rngs = gather_object(rngs) if world > 1 else rngs
    holder = [str(checkpoint_tmp_dir(ckpt_root, position["step"])) if accelerator.is_main_process else None]
    if world > 1:
        torch.distributed.broadcast_object_list(holder, src=0)
    tmp = Path(holder[0])
    if uses_deepspeed(accelerator):
        model.save_checkpoint(str(tmp / "deepspeed"), tag="state")
    weights = full_state_dict(accelerator, model, shapes)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=weights)
        state = {"scheduler": scheduler.state_dict(), "rng": rngs, "config": to_dict(cfg),
                 "skipped": dict(skipped), **position}
        if accelerator.scaler is not None:
            state["scaler"] = accelerator.scaler.state_dict()
        if not uses_deepspeed(accelerator):
            state["optimizer"] = optimizer.state_dict()
        write_state(tmp, state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit_checkpoint(tmp, ckpt_root, position["step"], cfg.train.keep_last)
    accelerator.wait_for_everyone()


def _periodic_eval(accelerator: Accelerator, model: nn.Module, cfg: Config, shapes: dict[str, torch.Size],
                   step: int, jlog: JsonlLog, tb: SummaryWriter | None) -> None:
    if not cfg.eval.suite:
        return
    plain = export_model(accelerator, model, cfg, shapes)
    if accelerator.is_main_process:
        from mmcl.eval.suite import flat_metrics, load_suite, run_suite

        results = run_suite(plain, load_suite(cfg.eval.suite), cfg.data.test, workers=cfg.data.workers)
        flat = flat_metrics(results)
        jlog.write({"step": step, **flat})
        if tb:
            for k, v in flat.items():
                if not math.isnan(v):
                    tb.add_scalar(k, v, step)
    accelerator.wait_for_everyone()
