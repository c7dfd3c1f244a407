"""What is trained and how fast: per-tower controls (freezing, lrs, gradient checkpointing), AdamW's
parameter groups, the warm-up + cosine schedule. The trainer and ``bench/`` build them with these."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from mmcl.config import Config, ConfigError, TowerControl, from_dict
from mmcl.model import MultimodalModel, param_numel, param_shape
from mmcl.shared import TRUNK


def apply_tower_controls(model: MultimodalModel,
                         controls: Mapping[str, TowerControl | dict[str, Any]]) -> dict[str, float]:
    """Per tower (:class:`~mmcl.config.TowerControl`, or its mapping): ``lock`` (LiT: the whole tower
    frozen, ``unlocked_blocks`` of its last blocks trainable again), ``frozen_blocks: N`` (the first N blocks
    frozen, with the stem registered before them: patch or token embedding and positions),
    ``grad_checkpointing``, ``lr`` (the tower's) and ``head_lr`` (its projection head's). Returns the lrs that
    differ from ``train.lr`` by parameter prefix: ``{"towers.<name>": lr, "heads.<name>": head_lr}``. With a
    shared trunk the towers are the modalities' tokenisers (no blocks) and ``trunk`` (see mmcl.shared)."""
    lrs = {}
    for name, ctl in controls.items():
        where = f"train.towers.{name}"
        if name not in model.towers:
            raise ConfigError(f"{where}: no such tower (allowed: {', '.join(model.towers)})")
        if not isinstance(ctl, TowerControl):
            ctl = from_dict(TowerControl, ctl, where)
        tower = model.towers[name]
        blocks = tower.blocks()
        if ctl.lock:
            tower.requires_grad_(False)
            n = ctl.unlocked_blocks or 0
            if not 0 <= n <= len(blocks):
                raise ConfigError(f"{where}.unlocked_blocks: {n} is not in 0..{len(blocks)} (the tower's blocks)")
            for blk in blocks[len(blocks) - n:] if n else []:
                blk.requires_grad_(True)
        if ctl.frozen_blocks is not None:
            freeze_first_blocks(tower, blocks, ctl.frozen_blocks, f"{where}.frozen_blocks")
        if ctl.grad_checkpointing:
            if not blocks:
                hint = f" (the shared blocks are train.towers.{TRUNK})" if model.model_cfg.shared_trunk else ""
                raise ConfigError(f"{where}.grad_checkpointing: the tower has no blocks to checkpoint{hint}")
            tower.set_grad_checkpointing(True)
        if ctl.lr is not None:
            lrs[f"towers.{name}"] = ctl.lr
        if ctl.head_lr is not None:
            if name not in model.heads:
                raise ConfigError(f"{where}.head_lr: the tower has no projection head (heads: "
                                  f"{', '.join(model.heads)})")
            lrs[f"heads.{name}"] = ctl.head_lr
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


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """The names every submodule declares in ``no_weight_decay()`` (timm's and open_clip's convention:
    names relative to that submodule), prefixed with the submodule's path."""
    names = set()
    for prefix, module in model.named_modules():
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            names |= {f"{prefix}.{n}" if prefix else n for n in declared()}
    return names


def group_name(param_name: str, decay: bool) -> str:
    """The parameter group of a parameter: its part (``towers.<name>``, ``heads.<name>``, ``objective``, ...),
    with ``.no_decay`` for the parameters without weight decay."""
    parts = param_name.split(".")
    part = ".".join(parts[:2]) if parts[0] in ("towers", "heads") and len(parts) > 2 else parts[0]
    return part if decay else f"{part}.no_decay"


def param_groups(model: MultimodalModel, cfg: Config, lrs: dict[str, float]) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters, one per part and weight decay (named by :func:`group_name`,
    under ``"name"``): no weight decay on 1-D (biases, norms) and 0-D parameters and on those the modules
    declare (:func:`no_weight_decay_names`: the objective's scalars and missing embeddings); the lr of the
    part from ``lrs`` (``{"towers.<m>" | "heads.<m>": lr}``, :func:`apply_tower_controls`), else ``train.lr``."""
    no_decay = no_weight_decay_names(model)
    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (len(param_shape(p)) < 2 or name in no_decay)
        group = group_name(name, decay)
        part = group.removesuffix(".no_decay")
        if group not in groups:
            groups[group] = {"params": [], "lr": lrs.get(part, cfg.train.lr), "name": group,
                             "weight_decay": cfg.train.weight_decay if decay else 0.0}
        groups[group]["params"].append(p)
    return list(groups.values())


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current lr of every parameter group, by name (``lr/<name>`` in the run's log)."""
    return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


def build_optimizer(model: MultimodalModel, cfg: Config, lrs: dict[str, float]) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``train.lr``, ``betas`` and ``eps``; the fused kernel on CUDA (one
    launch for all parameters; the model is on the GPU by the first step)."""
    return torch.optim.AdamW(param_groups(model, cfg, lrs), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                             eps=cfg.train.eps, fused=True if torch.cuda.is_available() else None)


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    """The lr factor at a step: linear warm-up over ``warmup`` steps, then constant or cosine to 0 at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``train.schedule`` with ``train.warmup_steps`` over ``total_steps`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.warmup_steps, total_steps, cfg.train.schedule))


def parameter_report(model: MultimodalModel) -> str:
    """A table of trainable and frozen parameters per tower, head and the objective."""
    lines = [f"{'part':<14} {'trainable':>12} {'frozen':>12}"]
    parts = {f"tower:{n}": model.towers[n] for n in model.towers}
    parts.update({f"head:{n}": model.heads[n] for n in model.heads})
    parts["objective"] = model.objective
    for name, mod in parts.items():
        tr = sum(param_numel(p) for p in mod.parameters() if p.requires_grad)
        fr = sum(param_numel(p) for p in mod.parameters() if not p.requires_grad)
        lines.append(f"{name:<14} {tr:>12,} {fr:>12,}")
    return "\n".join(lines)
