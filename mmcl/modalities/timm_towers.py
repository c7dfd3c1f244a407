"""timm image models as towers, with weights from local checkpoint files (never a download).

- Video (:class:`TimmVideoTower`): the image model on every frame (``[N, T, 3, S, S]`` -> ``[N*T, 3, S, S]``),
  then a temporal module: ``mean`` (average of the T frame features), ``transformer`` (a small transformer
  with learned time positions over the T frame features, mean-pooled) or ``divided`` (divided space-time
  attention as in TimeSformer: before each of a timm ViT's own blocks, attention over time among the patch
  tokens of each spatial position; the ViT's own forward runs it, so no timm internals are called).
- Audio (:class:`TimmAudioTower`): the image model on the log-mel spectrogram, one input channel.

The architecture comes from the timm name (``timm.create_model(name, pretrained=False, num_classes=0)``) and
the tower config, the weights from ``checkpoint`` through :func:`mmcl.modalities.pretrained.load_state_dict_checked`,
adapted the way timm adapts its own pretrained weights (:func:`adapt_timm_state`).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from timm.layers import Attention, resample_abs_pos_embed
from timm.models import adapt_input_conv, get_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mmcl.config import ConfigError
from mmcl.modalities.base import Tower
from mmcl.modalities.layers import Trunk, init_linear_like_vit, use_fused_attention
from mmcl.modalities.pretrained import load_state_dict_checked

#: ``timm.create_model`` arguments the tower sets itself (no download, features only, the input's shape).
_RESERVED_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "num_classes",
                    "in_chans", "img_size")


@dataclass(kw_only=True)
class TimmTowerConfig:
    type: Literal["timm"] = "timm"
    #: timm model name, optionally with a pretrained tag (``vit_small_patch16_224.augreg_in21k``): it picks the
    #: architecture and the pretrained_cfg (normalisation, classifier and input-conv names); nothing is fetched.
    model: str
    #: Local checkpoint file (``.safetensors``, or a torch file); empty: random initial weights.
    checkpoint: str = ""
    #: Refuse a checkpoint with missing or unexpected keys (shape mismatches are always refused).
    strict: bool = True
    #: Further ``timm.create_model`` arguments, e.g. ``{depth: 6, drop_path_rate: 0.1}``.
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        timm_pretrained_cfg(self.model, f"{where}.model")
        for key in self.kwargs:
            if key in _RESERVED_KWARGS:
                raise ConfigError(f"{where}.kwargs.{key}: set by mmcl, not allowed here (reserved: "
                                  f"{', '.join(_RESERVED_KWARGS)}; the input's shape comes from the modality)")


@dataclass(kw_only=True)
class TimmVideoTowerConfig(TimmTowerConfig):
    #: Build the model for this image size (ViTs; the checkpoint's positions are resampled to it); default:
    #: the model's own (pretrained_cfg ``input_size``). The modality's frame ``size`` must fit the model.
    img_size: int | None = None
    #: Per-channel normalisation of frames in [0, 1]; default: the model's pretrained_cfg ``mean`` / ``std``.
    mean: list[float] | None = None
    std: list[float] | None = None
    temporal: Literal["mean", "transformer", "divided"] = "mean"
    #: ``transformer``: its depth and heads (over the image model's feature width).
    temporal_depth: int = 2
    temporal_heads: int = 4

    def validate(self, where: str) -> None:
        super().validate(where)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ConfigError(f"{where}.{name}: expected 3 values (R, G, B), got {value}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"{where}.std: must be > 0, got {self.std}")
        if self.img_size is not None and self.img_size <= 0:
            raise ConfigError(f"{where}.img_size: must be > 0, got {self.img_size}")
        if self.temporal_depth <= 0 or self.temporal_heads <= 0:
            raise ConfigError(f"{where}.temporal_depth/temporal_heads: must be > 0, got "
                              f"{self.temporal_depth}/{self.temporal_heads}")


def timm_pretrained_cfg(name: str, where: str) -> dict[str, Any]:
    """The pretrained_cfg timm registers for ``name`` (its default tag unless one is given), as a dict; an
    unknown name is one line with the closest known names."""
    if not name:
        raise ConfigError(f"{where}: required (a timm model name, e.g. vit_small_patch16_224)")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
        hint = f"did you mean: {', '.join(close)}" if close else "see timm.list_models()"
        raise ConfigError(f"{where}: unknown timm model {name!r} ({hint})")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # a tag timm does not know for this architecture
        raise ConfigError(f"{where}: {e}") from None
    return cfg.to_dict() if cfg is not None else {}


def _names(value: str | tuple[str, ...] | list[str] | None) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def adapt_timm_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm checkpoint -> ``model``'s layout, as timm adapts its own pretrained weights on load:

    - the classifier (the keys under pretrained_cfg ``classifier``, e.g. ``head.*``, ``fc.*``) is dropped when
      the model has none: the tower is the feature extractor (``num_classes=0``), so a classification
      checkpoint's head has nothing to load into and must not fail strict loading;
    - the input convolution (pretrained_cfg ``first_conv``) is adapted to the model's input channels;
    - a ViT's absolute position table is resampled to the model's patch grid (another image size).

    Anything else that does not fit stays as it is, for :func:`load_state_dict_checked` to refuse."""
    own = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    state = dict(state)
    for prefix in _names(cfg.get("classifier")):
        for key in [k for k in state if (k == prefix or k.startswith(prefix + ".")) and k not in own]:
            del state[key]
    for conv in _names(cfg.get("first_conv")):
        key = f"{conv}.weight"
        if key in state and key in own and state[key].ndim == 4 and state[key].shape[1] != own[key].shape[1]:
            # One channel (a spectrogram) from RGB weights: timm's adapt_input_conv sums the colour filters, so
            # the model computes on x what the RGB model computed on the grey image (x, x, x). A mean would
            # scale every first-layer response by 1/3 against what the following layers were trained on.
            state[key] = adapt_input_conv(own[key].shape[1], state[key])
    key = "pos_embed"
    if isinstance(model, VisionTransformer) and key in state and key in own:
        old, new = state[key], own[key]
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        side = math.isqrt(old.shape[1] - prefix)
        if old.shape != new.shape and old.shape[-1] == new.shape[-1] and side * side == old.shape[1] - prefix:
            state[key] = resample_abs_pos_embed(old, new_size=list(model.patch_embed.grid_size),
                                                old_size=[side, side], num_prefix_tokens=prefix)
    return state


def create_timm_model(cfg: TimmTowerConfig, checkpoint: Path | None, where: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(cfg.model, pretrained=False, num_classes=0, **cfg.kwargs, **kwargs)`` with the
    weights of ``checkpoint`` (adapted by :func:`adapt_timm_state`, checked by ``load_state_dict_checked``)."""
    try:
        model = timm.create_model(cfg.model, pretrained=False, num_classes=0, **cfg.kwargs, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"{where}.kwargs: timm cannot build {cfg.model} with {cfg.kwargs}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if checkpoint is not None:
        load_state_dict_checked(model, checkpoint, f"{where}.checkpoint", cfg.strict,
                                adapt=lambda state: adapt_timm_state(state, model))
    use_fused_attention(model)
    return model


def check_input(model: nn.Module, shape: tuple[int, ...], where: str, what: str, name: str) -> None:
    """Run ``model`` once on zeros of ``[1, *shape]``: an input the model cannot take is one line naming
    ``what`` (the config's input) and the model (e.g. a ViT built for 224 px given 64 px frames)."""
    was_training = model.training
    model.eval()  # one sample through batch norm in training mode fails for the wrong reason
    try:
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: {what} does not fit timm model {name} ({first})") from None
    finally:
        model.train(was_training)


def timm_blocks(model: nn.Module) -> list[nn.Module]:
    """A timm model's repeated blocks, first to last: ViT-style ``blocks``, ConvNeXt-style ``stages``,
    Swin-style ``layers`` or ResNet ``layer1..4`` (timm has no single attribute for them)."""
    for attr in ("blocks", "stages", "layers"):
        seq = getattr(model, attr, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)):
            return list(seq)
    return [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]


class TimmTower(Tower):
    """Base of the timm towers: ``self.model`` is the timm model (its own parameter names, under ``model.``)."""

    model: nn.Module

    def blocks(self) -> list[nn.Module]:
        return timm_blocks(self.model)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


class TimeAttention(nn.Module):
    """Attention over time among the patch tokens of each spatial position: ``[N*T, prefix + P, D]`` -> the
    same shape, prefix (class / register) tokens untouched. The output projection starts at zero, so a new
    block leaves the image model's features as they are until training moves it (TimeSformer's init for its
    temporal blocks)."""

    def __init__(self, dim: int, heads: int, frames: int, prefix: int):
        super().__init__()
        self.frames, self.prefix = frames, prefix
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=True)
        init_linear_like_vit(self)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nt, length, dim = x.shape
        n, p, t = nt // self.frames, length - self.prefix, self.frames
        patches = x[:, self.prefix:]
        y = patches.reshape(n, t, p, dim).transpose(1, 2).reshape(n * p, t, dim)
        y = self.attn(self.norm(y))
        y = y.reshape(n, p, t, dim).transpose(1, 2).reshape(nt, p, dim)
        return torch.cat([x[:, :self.prefix], patches + y], dim=1)


class DividedBlock(nn.Module):
    """Divided space-time attention (TimeSformer) in one block: attention over time, then the ViT's own block
    (attention over space within each frame, MLP). It takes the ViT block's place in ``model.blocks``, so the
    ViT's own forward (patch embedding, positions, blocks, norm, pooling) runs it on ``[N*T, ...]`` frames.
    The first block also adds learned time positions to the patch tokens (zero at first, as TimeSformer's)."""

    def __init__(self, space: nn.Module, dim: int, heads: int, frames: int, prefix: int, time_positions: bool):
        super().__init__()
        self.frames, self.prefix = frames, prefix
        self.time_pos = nn.Parameter(torch.zeros(1, frames, 1, dim)) if time_positions else None
        self.time = TimeAttention(dim, heads, frames, prefix)
        self.space = space

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.time_pos is not None:
            patches = x[:, self.prefix:].unflatten(0, (-1, self.frames)) + self.time_pos
            x = torch.cat([x[:, :self.prefix], patches.flatten(0, 1)], dim=1)
        return self.space(self.time(x), **kwargs)


class TemporalTransformer(nn.Module):
    """``[N, T, D]`` frame features -> ``[N, D]``: learned time positions, transformer blocks, mean pooling."""

    def __init__(self, frames: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, frames, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.trunk = Trunk(dim, depth, heads)
        init_linear_like_vit(self.trunk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x + self.pos)


class TimmVideoTower(TimmTower):
    """``[N, T, 3, S, S]`` -> ``[N, D]`` (D: the image model's ``num_features``): a timm image model per
    frame, then the temporal module of ``cfg.temporal``: the mean of the T frame features, or a
    :class:`TemporalTransformer` over them, or (``divided``) :class:`DividedBlock` s in place of the ViT's
    blocks and the mean of the frame features.

    ``divided`` needs a timm ``VisionTransformer`` (``vit_*``, ``deit_*``, ...: patch tokens through a ``blocks``
    sequence whose blocks have ``attn.num_heads``); other models are refused in one line. Its parameters are
    ``model.blocks.<i>.space.*`` (the ViT block, loaded from the checkpoint), ``model.blocks.<i>.time.*`` and
    ``model.blocks.0.time_pos``. Its time attention starts as the identity and its time positions at zero, so
    the untrained tower equals ``mean``."""

    def __init__(self, cfg: TimmVideoTowerConfig, frames: int, size: int, checkpoint: Path | None, where: str):
        super().__init__()
        self.temporal = cfg.temporal
        self.frames = frames
        model = create_timm_model(cfg, checkpoint, where, **({"img_size": cfg.img_size} if cfg.img_size else {}))
        check_input(model, (3, size, size), where.rsplit(".", 1)[0] + ".size", f"{size} ({size}x{size} px frames)",
                    cfg.model + (f" built for img_size {cfg.img_size}" if cfg.img_size else ""))
        dim = model.num_features
        if cfg.temporal == "divided":
            heads = [getattr(getattr(blk, "attn", None), "num_heads", None) for blk in getattr(model, "blocks", [])]
            if not isinstance(model, VisionTransformer) or None in heads:
                raise ConfigError(f"{where}.temporal: divided needs a timm VisionTransformer (vit_*, deit_*: patch "
                                  f"tokens through its blocks), {cfg.model} is a {type(model).__name__} "
                                  f"(allowed for it: 'mean', 'transformer')")
            # After the checkpoint is loaded (its keys are the plain ViT's) and the input checked (per frame).
            prefix = model.num_prefix_tokens
            model.blocks = nn.Sequential(*(DividedBlock(blk, model.embed_dim, h, frames, prefix, i == 0)
                                           for i, (blk, h) in enumerate(zip(model.blocks, heads))))
        elif cfg.temporal == "transformer":
            if dim % cfg.temporal_heads:
                raise ConfigError(f"{where}.temporal_heads: {cfg.temporal_heads} does not divide the feature width "
                                  f"{dim} of {cfg.model}")
            self.temporal_module = TemporalTransformer(frames, dim, cfg.temporal_depth, cfg.temporal_heads)
        self.model = model
        self.out_dim = dim

    def blocks(self) -> list[nn.Module]:
        extra = list(self.temporal_module.trunk.blocks) if self.temporal == "transformer" else []
        return timm_blocks(self.model) + extra

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)
        if self.temporal == "transformer":
            self.temporal_module.trunk.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[:2]
        if t != self.frames:
            raise ValueError(f"expected clips of {self.frames} frames (the config's), got {t}")
        feats = self.model(x.flatten(0, 1)).view(n, t, -1)
        return self.temporal_module(feats) if self.temporal == "transformer" else feats.mean(dim=1)


class TimmAudioTower(TimmTower):
    """``[N, 1, n_mels, n_frames]`` log-mel -> ``[N, D]``: a timm image model with one input channel, built for
    the spectrogram's shape when its input size is fixed (ViTs; CNNs take any)."""

    def __init__(self, cfg: TimmTowerConfig, shape: tuple[int, int], checkpoint: Path | None, where: str):
        super().__init__()
        kwargs: dict[str, Any] = {"in_chans": 1}
        if timm_pretrained_cfg(cfg.model, f"{where}.model").get("fixed_input_size"):
            kwargs["img_size"] = shape
        self.model = create_timm_model(cfg, checkpoint, where, **kwargs)
        check_input(self.model, (1, *shape), where.rsplit(".", 1)[0], f"a [{shape[0]} x {shape[1]}] log-mel "
                    f"(n_mels x frames; frames = seconds * sample_rate / hop + 1)", cfg.model)
        self.out_dim = self.model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
