"""timm image models as towers, with weights from local checkpoint files (never a download).

- Video (:class:`TimmVideoTower`): the image model on every frame (``[N, T, 3, S, S]`` -> ``[N*T, 3, S, S]``),
  then a temporal module: ``mean`` (average of the T frame features), ``transformer`` (a small transformer
  with learned time positions over the T frame features, mean-pooled) or ``divided`` (divided space-time
  attention as in TimeSformer: before each of a timm ViT's own blocks, attention over time among the patch
  tokens of each spatial position).
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
from torch.utils.checkpoint import checkpoint

from mmcl.config import ConfigError
from mmcl.modalities.base import Tower
from mmcl.modalities.layers import Trunk, init_linear_like_vit
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
                                  f"{', '.join(_RESERVED_KWARGS)}; the frame size is the modality's size, "
                                  f"tower.img_size builds a ViT for another)")


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

    def train(self, mode: bool = True) -> TimmTower:
        """Batch norm whose parameters are all frozen (a locked CNN) stays in eval mode: its running
        statistics are weights too, and a locked tower must not move."""
        super().train(mode)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        return self


class TimeAttention(nn.Module):
    """Attention over time among the patch tokens of each spatial position: ``[N*T, prefix + P, D]`` -> the
    same shape, prefix (class / register) tokens untouched. The output projection starts at zero, so a new
    block leaves the image model's features as they are until training moves it (TimeSformer's init)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=True)
        init_linear_like_vit(self)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x: torch.Tensor, frames: int, prefix: int) -> torch.Tensor:
        nt, length, dim = x.shape
        n, p = nt // frames, length - prefix
        patches = x[:, prefix:]
        y = patches.reshape(n, frames, p, dim).transpose(1, 2).reshape(n * p, frames, dim)
        y = self.attn(self.norm(y))
        y = y.reshape(n, p, frames, dim).transpose(1, 2).reshape(nt, p, dim)
        return torch.cat([x[:, :prefix], patches + y], dim=1)


class DividedBlock(nn.Module):
    """One divided space-time block: time attention, then the ViT's own block (space attention + MLP).
    Holds the two modules the tower registers elsewhere (``time_blocks.i``, ``model.blocks.i``): it is the
    unit of :meth:`TimmVideoTower.blocks` for locking and freezing, never registered itself."""

    def __init__(self, space: nn.Module, time: TimeAttention, prefix: int):
        super().__init__()
        self.space, self.time, self.prefix = space, time, prefix

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return self.space(self.time(x, frames, self.prefix))


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
    frame, then the temporal module of ``cfg.temporal``.

    ``divided`` needs a timm ``VisionTransformer`` (``vit_*``, ``deit_*``, ...: patch tokens through a
    ``blocks`` sequence, then its own pooling); other models are refused in one line. With its zero-initialised
    time attention and time positions, it starts equal to ``mean``."""

    def __init__(self, cfg: TimmVideoTowerConfig, frames: int, size: int, checkpoint: Path | None, where: str):
        super().__init__()
        self.temporal = cfg.temporal
        self.frames = frames
        self.grad_checkpointing = False
        kwargs = {"img_size": cfg.img_size} if cfg.img_size else {}
        model = create_timm_model(cfg, checkpoint, where, **kwargs)
        if cfg.temporal == "divided":
            if not isinstance(model, VisionTransformer):
                raise ConfigError(f"{where}.temporal: divided needs a timm VisionTransformer (vit_*, deit_*: patch "
                                  f"tokens through its blocks), {cfg.model} is a {type(model).__name__} "
                                  f"(allowed for it: 'mean', 'transformer')")
            # Time positions: zero, so the untrained temporal part leaves the image model's features as they are.
            self.time_pos = nn.Parameter(torch.zeros(1, frames, 1, model.embed_dim))
        self.model = model
        check_input(model, (3, size, size), where.rsplit(".", 1)[0] + ".size", f"{size} ({size}x{size} px frames)",
                    cfg.model + (f" built for img_size {cfg.img_size}" if cfg.img_size else ""))
        dim = model.num_features
        self.out_dim = dim
        if cfg.temporal == "transformer":
            if dim % cfg.temporal_heads:
                raise ConfigError(f"{where}.temporal_heads: {cfg.temporal_heads} does not divide the feature width "
                                  f"{dim} of {cfg.model}")
            self.temporal_module = TemporalTransformer(frames, dim, cfg.temporal_depth, cfg.temporal_heads)
        elif cfg.temporal == "divided":
            self.time_blocks = nn.ModuleList(TimeAttention(model.embed_dim, blk.attn.num_heads)
                                             for blk in model.blocks)
            # Plain list: the pairs reuse modules registered above (no second copy in the state dict).
            self._divided = [DividedBlock(s, t, model.num_prefix_tokens)
                             for s, t in zip(model.blocks, self.time_blocks)]

    def blocks(self) -> list[nn.Module]:
        if self.temporal == "divided":
            return list(self._divided)
        extra = list(self.temporal_module.trunk.blocks) if self.temporal == "transformer" else []
        return timm_blocks(self.model) + extra

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        if self.temporal != "divided":
            self.model.set_grad_checkpointing(enable)
        if self.temporal == "transformer":
            self.temporal_module.trunk.grad_checkpointing = enable

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, T, 3, S, S]`` -> ``[N, T, D]``: the image model's pooled features of every frame."""
        n, t = x.shape[:2]
        return self.model(x.flatten(0, 1)).view(n, t, -1)

    def _divided_forward(self, x: torch.Tensor) -> torch.Tensor:
        vit, (n, t) = self.model, x.shape[:2]
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x.flatten(0, 1)))))
        prefix = vit.num_prefix_tokens
        patches = tokens[:, prefix:].unflatten(0, (n, t)) + self.time_pos
        tokens = torch.cat([tokens[:, :prefix], patches.flatten(0, 1)], dim=1)
        for blk in self._divided:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, t, use_reentrant=False)
            else:
                tokens = blk(tokens, t)
        return vit.forward_head(vit.norm(tokens), pre_logits=True).view(n, t, -1).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.temporal == "divided":
            return self._divided_forward(x)
        feats = self.frame_features(x)
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
