"""Pretrained weights from local paths, never a download (clusters are offline).

Shared by the towers that start from Hugging Face directories or timm checkpoint files: a missing path, or a
checkpoint whose keys do not fit the architecture, is one :class:`~mmcl.config.ConfigError` line naming the
config field, the path and the keys (refused unless the tower's config says ``strict: false``).

:func:`hf_encoder` and :class:`HFTower` turn a ``transformers`` model directory into a tower (text and audio
use them); :func:`pool` is the tokens -> one vector pooling they share.

Tower builders take ``pretrained``: False (``MultimodalModel.from_pretrained``: the saved safetensors hold every
weight) builds the architecture alone and reads no checkpoint, so a saved model loads without the checkpoints
it started from.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn

from mmcl.config import ConfigError
from mmcl.modalities.base import Tower

#: How many key names an error lists before "... and N more".
_SHOWN_KEYS = 5


def tell_deepspeed_the_device(cuda: bool | None = None) -> None:
    """Without a GPU (``cuda`` False; None: ask torch), tell DeepSpeed it runs on the CPU (``DS_ACCELERATOR=cpu``,
    unless set) before it is first imported (by accelerate, or by transformers' ``save_pretrained``): its own
    detection warns "Setting accelerator to CPU" on every command. Done when this module is imported."""
    if not (torch.cuda.is_available() if cuda is None else cuda):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


tell_deepspeed_the_device()

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


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{where}: cannot load {directory} with {getattr(auto_cls, '__name__', auto_cls)}: "
                              f"{_first_line(e)}") from None


def use_sdpa(model: nn.Module) -> nn.Module:
    """Set a transformers model's attention to ``scaled_dot_product_attention`` when its class supports it
    (FlashAttention / memory-efficient kernels on GPUs); ``model.config._attn_implementation`` tells which
    one runs."""
    if getattr(model, "_supports_sdpa", False) and model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    return model


def load_hf_model(auto_cls: Any, path: str | Path, where: str, strict: bool = True, pretrained: bool = True,
                  **kwargs: Any) -> nn.Module:
    """``auto_cls.from_pretrained`` on a local directory, offline, with the loading report checked.

    ``auto_cls`` is a ``transformers`` Auto class (``AutoModel``) or a concrete model class. Checkpoint keys
    outside every top-level module of the model are the task head of the checkpoint's own class (BERT's
    pre-training ``cls.*``, an AudioSet-tuned AST's ``classifier.*``), which the encoder does not have: they are
    dropped, not a mismatch. Unexpected keys inside the model's modules (a layer more) are. With
    ``pretrained=False`` the model is built from the directory's ``config.json`` alone (random weights)."""
    directory = local_path(path, where)
    if not pretrained:
        from transformers import AutoConfig

        config = load_hf_component(AutoConfig, directory, where)
        build = getattr(auto_cls, "from_config", None) or auto_cls._from_config
        return use_sdpa(build(config, **kwargs))
    with offline():
        try:
            model, info = auto_cls.from_pretrained(str(directory), local_files_only=True,
                                                   output_loading_info=True, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError(f"{where}: cannot load {directory} with {getattr(auto_cls, '__name__', auto_cls)}: "
                              f"{_first_line(e)}") from None
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", [])]
    own = {k.split(".")[0] for k in model.state_dict()}
    unexpected = [k for k in info.get("unexpected_keys", []) if k.split(".")[0] in own]
    check_keys(list(info.get("missing_keys", [])) + mismatched, unexpected, where, str(directory),
               type(model).__name__, strict)
    return use_sdpa(model)


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


def shape_mismatches(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    """``"key (checkpoint shape) vs (module shape)"`` for each key of ``state`` that ``own`` has in another shape."""
    return [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
            if k in own and own[k].shape != v.shape]


def load_state_dict_checked(module: nn.Module, path: str | Path, where: str, strict: bool = True,
                            adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> None:
    """Load a checkpoint file into ``module``, refusing (``strict``) missing/unexpected keys and always
    refusing shape mismatches, each named in one line. ``adapt`` rewrites the checkpoint's tensors first
    (e.g. a timm classifier head dropped, RGB input weights summed to one channel)."""
    state = read_state_dict(path, where)
    if adapt is not None:
        state = adapt(state)
    own = module.state_dict()
    wrong = shape_mismatches(state, own)
    if wrong:
        raise ConfigError(f"{where}: checkpoint {path} does not fit {type(module).__name__}: "
                          f"{len(wrong)} shape mismatches ({_keys(wrong)})")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    check_keys(missing, unexpected, where, str(path), type(module).__name__, strict)
    module.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------------------
# transformers directories as towers

#: ``init`` of a tower read from a transformers directory: the checkpoint's weights, or only the architecture
#: of its ``config.json`` with random weights.
HFInit = Literal["pretrained", "config"]


@dataclass
class HFTowerFields:
    """The fields of a tower config that can read a transformers directory (``type: hf``)."""

    #: ``hf``: local directory of a transformers model (``config.json`` + weights, and its tokenizer or feature
    #: extractor); relative to the config.
    path: str = ""
    #: ``hf``: refuse a checkpoint whose keys do not fit the model (missing / unexpected ones).
    strict: bool = True
    #: ``hf``: ``pretrained`` loads the checkpoint's weights, ``config`` only its architecture (random init).
    init: HFInit = "pretrained"


def load_hf_config(path: str | Path, where: str) -> Any:
    """``AutoConfig`` of a local transformers directory, offline."""
    from transformers import AutoConfig

    return load_hf_component(AutoConfig, path, where)


def hf_encoder(path: str | Path, where: str, init: HFInit = "pretrained", strict: bool = True) -> nn.Module:
    """The encoder of a local transformers model directory (``AutoModel``), with its checkpoint's weights
    (``init: pretrained``, keys checked as :func:`load_hf_model` does) or randomly initialised from its
    config (``init: config``). Of an encoder-decoder (Whisper, T5) only the encoder is kept."""
    from transformers import AutoModel

    if init == "pretrained":
        model = load_hf_model(AutoModel, path, where, strict=strict)
    else:
        model = use_sdpa(AutoModel.from_config(load_hf_config(path, where)))
    if model.config.is_encoder_decoder:
        model = model.get_encoder()
    # BERT-style models carry a pooler (dense + tanh over the first token, trained for next-sentence
    # prediction). The tower pools the hidden states itself; an unused parameter would also break DDP, which
    # wants a gradient for every trainable parameter. Models built with ``add_pooling_layer`` accept None.
    if getattr(model, "pooler", None) is not None and "add_pooling_layer" in inspect.signature(type(model)).parameters:
        model.pooler = None
    return model


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """``[N, L, D]`` token states -> ``[N, D]``: ``cls`` (the first token), ``mean`` (over the tokens where
    ``mask [N, L]`` is 1, all tokens without a mask) or ``last`` (the last token where ``mask`` is 1)."""
    if how == "cls":
        return hidden[:, 0]
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if how == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * (positions + 1)).argmax(dim=1)  # padding on either side
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


#: Models read during one build (:func:`load_once`), by key; None outside a build.
_LOADED: dict[Any, Any] | None = None


@contextmanager
def build_session() -> Iterator[None]:
    """While building one model: what :func:`load_once` reads is read once (one CLIP directory feeding the
    video and the text tower is loaded a single time), then released."""
    global _LOADED
    outer = _LOADED
    if outer is None:
        _LOADED = {}
    try:
        yield
    finally:
        if outer is None:
            _LOADED = None


def load_once(key: Any, load: Callable[[], Any]) -> Any:
    """``load()``, or inside :func:`build_session` the value already loaded under ``key``."""
    if _LOADED is None:
        return load()
    if key not in _LOADED:
        _LOADED[key] = load()
    return _LOADED[key]


def hf_blocks(model: nn.Module) -> list[nn.Module]:
    """A transformers model's stack of transformer layers: the last ``ModuleList`` of transformers'
    ``GradientCheckpointingLayer`` (wav2vec2's convolutional feature layers come before it)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)
              and all(isinstance(layer, GradientCheckpointingLayer) for layer in m)]
    return list(stacks[-1]) if stacks else []


class HFTower(Tower):
    """A transformers encoder as a tower. Its blocks are the model's stack of transformer layers (the
    last ``ModuleList`` of transformers' ``GradientCheckpointingLayer``: wav2vec2's convolutional feature
    layers come before it); gradient checkpointing is the model's own. Subclasses define ``forward``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.out_dim = int(model.config.hidden_size)

    def blocks(self) -> list[nn.Module]:
        return hf_blocks(self.model)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.activation_checkpointing_disable()
