"""A saved model directory: its file names, writing and reading it, and converting what older formats saved
(format version: :data:`mmcl.config.FORMAT_VERSION`, 2 since the objective's config kept only its own fields
and the towers made of a token embedder hold it under ``embed``, 3 since ``hf`` audio towers pool over real
audio and fit Whisper to the window).

``save_pretrained`` writes ``config.json`` (``{"mmcl_format", "model", "objective"}``, and ``"data": {"clip"}``, the
time window of the run that trained it, when known), ``model.safetensors``,
the files the processors read (tokenizers; a transformers tower's config with its tokenizer, feature extractor
or image processor in ``<modality>_hf/`` or ``<modality>_<dir>/``) and ``README.md``. Weights are never pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmcl.config import upgrade_config

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"

#: Format-1 tower types whose tower was one module with its patch embedding at ``embed``: now a token embedder
#: (``embed``) holding it at ``embed.embed``. Other towers kept their keys.
_V1_PATCH_TOWERS = {"video": "tubelet", "audio": "vit"}


def write_model_dir(out: Path, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """``config.json`` and ``model.safetensors`` (the tensors detached, contiguous, on the CPU) into ``out``."""
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(out / WEIGHTS_NAME),
              metadata={"format": "pt", "mmcl_format": str(config["mmcl_format"])})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a model directory; a directory without one is refused."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"not an mmcl model directory (no {CONFIG_NAME}): {path}")
    return json.loads(config_file.read_text())


def weights_file(path: Path) -> Path:
    """``model.safetensors`` of a model directory; a directory without one is refused."""
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path} (mmcl loads safetensors weights only)")
    return weights


def read_model_dir(path: Path, map_location: str = "cpu") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, weights)`` of a model directory, in this format (an older format's converted by
    :func:`upgrade`)."""
    config = read_config(path)
    return upgrade(config, load_file(str(weights_file(path)), device=map_location))


def upgrade(config: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A saved ``config.json`` mapping and its weights of any earlier format -> this format (``FORMAT_VERSION``,
    :data:`mmcl.config.FORMAT_VERSION`). v1 -> v2: the objective's config (:func:`mmcl.config.upgrade_config`)
    and the keys of the towers made of a token embedder (:func:`upgrade_state_dict_v1`); v2 -> v3: the ``hf``
    audio towers' ``chunk`` and ``pooling`` (config only, the weights are as they were)."""
    upgraded = upgrade_config(config)  # refuses an unknown format first
    if config.get("mmcl_format", 1) < 2:
        state = upgrade_state_dict_v1(config, state)
    return upgraded, state


def upgrade_state_dict_v1(config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Format-1 weights -> format 2: a separate ``tubelet`` video or ``vit`` audio tower's patch embedding
    ``towers.<m>.embed.*`` moves to ``towers.<m>.embed.embed.*`` (its token embedder's). Shared-trunk models
    (whose token embedders were already modules of their own) and every other key are as they were."""
    if config["model"].get("shared_trunk") is not None:
        return state
    moved = []
    for name, spec in config["model"]["modalities"].items():
        kind = spec.get("kind", name)
        if kind in _V1_PATCH_TOWERS and spec.get("tower", {}).get("type", _V1_PATCH_TOWERS[kind]) == _V1_PATCH_TOWERS[kind]:
            moved.append(f"towers.{name}.embed.")
    out = {}
    for key, value in state.items():
        prefix = next((p for p in moved if key.startswith(p)), None)
        out[prefix + "embed." + key[len(prefix):] if prefix else key] = value
    return out
