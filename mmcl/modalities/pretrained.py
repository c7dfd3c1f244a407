"""Pretrained weights from local paths, never a download (clusters are offline).

Shared by the towers that start from Hugging Face directories or timm checkpoint files: a missing path, or a
checkpoint whose keys do not fit the architecture, is one :class:`~mmcl.config.ConfigError` line naming the
config field, the path and the keys (refused unless the tower's config says ``strict: false``).

Inside :func:`architecture_only` (``MultimodalModel.from_pretrained``: the saved safetensors hold every
weight) the loaders build the architecture alone and read no checkpoint, so a saved model loads without
the checkpoints it started from.
"""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from mmcl.config import ConfigError

#: How many key names an error lists before "... and N more".
_SHOWN_KEYS = 5

_LOAD_WEIGHTS = contextvars.ContextVar("mmcl_load_pretrained_weights", default=True)


@contextmanager
def architecture_only() -> Iterator[None]:
    """Towers built inside skip their pretrained checkpoints (the caller loads all weights afterwards)."""
    token = _LOAD_WEIGHTS.set(False)
    try:
        yield
    finally:
        _LOAD_WEIGHTS.reset(token)


def loading_weights() -> bool:
    """False inside :func:`architecture_only`."""
    return _LOAD_WEIGHTS.get()


def local_path(path: str | Path, where: str, kind: str = "directory") -> Path:
    """``path`` as an existing local ``kind`` (``"directory"`` or ``"file"``), else a one-line error."""
    p = Path(path).expanduser()
    ok = p.is_dir() if kind == "directory" else p.is_file()
    if not ok:
        raise ConfigError(f"{where}: {kind} not found: {p} (pretrained weights are read from local paths only)")
    return p


@contextmanager
def offline() -> Iterator[None]:
    """Hugging Face libraries with the network off: a missing file is an error, never a download."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _keys(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:_SHOWN_KEYS])
    more = len(names) - _SHOWN_KEYS
    return shown + (f" ... and {more} more" if more > 0 else "")


def check_keys(missing: list[str], unexpected: list[str], where: str, source: str, target: str,
               strict: bool) -> None:
    """Refuse (``strict``) a checkpoint ``source`` whose keys do not fit ``target``, naming the keys."""
    if strict and (missing or unexpected):
        parts = [f"{len(missing)} missing keys ({_keys(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected keys ({_keys(unexpected)})" if unexpected else ""]
        raise ConfigError(f"{where}: checkpoint {source} does not fit {target}: "
                          f"{'; '.join(p for p in parts if p)} (set strict: false to load anyway)")


def load_hf_component(auto_cls: Any, path: str | Path, where: str, **kwargs: Any) -> Any:
    """``auto_cls.from_pretrained`` on a local directory, offline, for what is not a model: a config, an image
    processor, a feature extractor, a tokenizer. A missing or unreadable file is one line naming ``where``."""
    directory = local_path(path, where)
    with offline():
        try:
            return auto_cls.from_pretrained(str(directory), local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{where}: cannot load {directory} with {getattr(auto_cls, '__name__', auto_cls)}: "
                              f"{first}") from None


def load_hf_model(auto_cls: Any, path: str | Path, where: str, strict: bool = True, **kwargs: Any) -> nn.Module:
    """``auto_cls.from_pretrained`` on a local directory, offline, with the loading report checked.

    ``auto_cls`` is a ``transformers`` Auto class (``AutoModel``) or a concrete model class. Inside
    :func:`architecture_only` the model is built from the directory's ``config.json`` alone (random weights)."""
    directory = local_path(path, where)
    if not loading_weights():
        from transformers import AutoConfig

        config = load_hf_component(AutoConfig, directory, where)
        build = getattr(auto_cls, "from_config", None) or auto_cls._from_config
        return build(config, **kwargs)
    with offline():
        try:
            model, info = auto_cls.from_pretrained(str(directory), local_files_only=True,
                                                   output_loading_info=True, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{where}: cannot load {directory} with {getattr(auto_cls, '__name__', auto_cls)}: "
                              f"{first}") from None
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", [])]
    check_keys(list(info.get("missing_keys", [])) + mismatched, list(info.get("unexpected_keys", [])),
               where, str(directory), type(model).__name__, strict)
    return model


def read_state_dict(path: str | Path, where: str) -> dict[str, torch.Tensor]:
    """A checkpoint file (``.safetensors``, or a torch file read with ``weights_only``) -> its tensors.
    A torch file holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped."""
    file = local_path(path, where, kind="file")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zips: all mean "not a checkpoint we can read"
        raise ConfigError(f"{where}: cannot read checkpoint {file}: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{where}: checkpoint {file} holds a {type(state).__name__}, not a state dict")
    return state


def load_state_dict_checked(module: nn.Module, path: str | Path, where: str, strict: bool = True,
                            adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> None:
    """Load a checkpoint file into ``module``, refusing (``strict``) missing/unexpected keys and always
    refusing shape mismatches, each named in one line. ``adapt`` rewrites the checkpoint's tensors first
    (e.g. a timm classifier head dropped, RGB input weights summed to one channel). Nothing is read inside
    :func:`architecture_only`."""
    if not loading_weights():
        return
    state = read_state_dict(path, where)
    if adapt is not None:
        state = adapt(state)
    own = module.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise ConfigError(f"{where}: checkpoint {path} does not fit {type(module).__name__}: "
                          f"{len(wrong)} shape mismatches ({_keys(wrong)})")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    check_keys(missing, unexpected, where, str(path), type(module).__name__, strict)
    module.load_state_dict(state, strict=False)
