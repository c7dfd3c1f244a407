"""Atomic training checkpoints: ``DIR/checkpoints/step_N/`` holding the model in the ``save_pretrained``
format (``config.json``, fp32 ``model.safetensors``, tokenizer files: ``from_pretrained`` loads it) and the
rest of the training state in ``state.pt`` (optimizer, scheduler, grad scaler, RNG states of every rank,
data position), plus DeepSpeed's own partitioned checkpoint in ``deepspeed/`` under ZeRO.

A checkpoint is written into a temporary sibling directory, every file fsynced, then renamed into place,
so a crash mid-write leaves the previous checkpoints intact and ``latest`` never points at a torn one;
the leftovers of such a crash are removed by the next successful commit.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmcl.config import Config, ConfigError, to_dict
from mmcl.persistence import WEIGHTS_NAME, read_model_dir

if TYPE_CHECKING:
    from mmcl.model import MultimodalModel
    from mmcl.train.engine import Engine

STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp_step_"
WEIGHTS = WEIGHTS_NAME
STATE = "state.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``ckpt_root``, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / WEIGHTS).is_file() and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_tmp_dir(ckpt_root: Path, step: int) -> Path:
    """A fresh temporary directory beside the final ``step_<step>`` (same filesystem: the rename is atomic)."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f"{TMP_PREFIX}{step}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_state(tmp: Path, state: dict[str, Any]) -> None:
    """The training state beside the weights (pickled: it holds RNG states and optimizer tensors)."""
    torch.save(state, tmp / STATE)


def commit_checkpoint(tmp: Path, ckpt_root: Path, step: int, keep_last: int = 0) -> Path:
    """fsync everything under ``tmp``, rename it to ``step_<step>``, then keep the ``keep_last`` newest and
    remove the temporary directories of earlier writers that died mid-write."""
    for f in sorted(tmp.rglob("*"), reverse=True):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            _fsync_dir(f)
    _fsync_dir(tmp)
    final = ckpt_root / f"step_{step}"
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    if keep_last > 0:
        for _, old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def resolve_resume(spec: str, ckpt_root: Path) -> Path | None:
    """``latest`` -> the newest complete checkpoint (None when there is none yet); else the given path."""
    if spec == "latest":
        found = list_checkpoints(ckpt_root)
        return found[-1][1] if found else None
    path = Path(spec)
    if not (path / WEIGHTS).is_file() or not (path / STATE).is_file():
        raise FileNotFoundError(f"--resume {spec}: not a checkpoint directory (needs {WEIGHTS} and {STATE})")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights (an older format's converted, as ``from_pretrained`` does) and the training state."""
    return read_model_dir(path)[1], torch.load(path / STATE, weights_only=False)


def check_resume(path: Path, weights: dict[str, torch.Tensor], state: dict[str, Any], model: MultimodalModel,
                 engine: Engine) -> None:
    """One-line errors for a checkpoint this run cannot continue from, before anything is trained."""
    theirs = {k: tuple(v.shape) for k, v in weights.items()}
    ours = {k: tuple(engine.shapes.get(k, v.shape)) for k, v in model.state_dict().items()}
    if theirs != ours:
        diff = sorted(set(theirs) ^ set(ours)) or sorted(k for k in ours if theirs[k] != ours[k])
        raise ConfigError(f"--resume {path}: the checkpoint holds another model (first difference: {diff[0]})")
    if len(state["rng"]) != engine.world:
        raise ConfigError(f"--resume {path}: written by {len(state['rng'])} rank(s), resumed with {engine.world}")
    engine.check_checkpoint(path, state)


def save_training_checkpoint(engine: Engine, scheduler: torch.optim.lr_scheduler.LRScheduler, ckpt_root: Path,
                             cfg: Config, position: dict[str, int], skipped: Counter,
                             epoch_rng: dict[str, Any]) -> None:
    """``step_N/``: the save_pretrained files (config.json, fp32 model.safetensors, tokenizer: loadable by
    ``from_pretrained``), ``state.pt`` (scheduler, every rank's RNG states, data position and the engine's
    entries: optimizer, grad scaler) and what the engine writes itself (DeepSpeed: every rank's partitions
    in ``deepspeed/``). Written into a temporary directory that the main process renames into place once all
    ranks are done; every rank calls it."""
    rngs = engine.gather_object([{"now": rng_state(), "epoch_start": epoch_rng}])
    tmp = Path(engine.broadcast_object(str(checkpoint_tmp_dir(ckpt_root, position["step"]))
                                       if engine.is_main else None))
    engine_state = engine.save_state(tmp)
    weights = engine.full_state_dict()
    if engine.is_main:
        engine.inner.save_pretrained(tmp, state_dict=weights, data_clip=cfg.data.clip)
        write_state(tmp, {"scheduler": scheduler.state_dict(), "rng": rngs, "config": to_dict(cfg),
                          "skipped": dict(skipped), **position, **engine_state})
    engine.wait()
    if engine.is_main:
        commit_checkpoint(tmp, ckpt_root, position["step"], cfg.train.keep_last)
    engine.wait()
