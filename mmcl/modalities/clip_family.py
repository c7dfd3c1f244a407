"""CLIP-family checkpoints as towers (``tower: {type: clip, path: DIR}``): the halves of a contrastive
image-text (or audio-text) model, each with the model's own pooling and projection, so that towers from one
checkpoint start in its joint embedding space.

A local transformers directory of a two-tower model (``CLIPModel``, ``SiglipModel``, ``Siglip2Model``,
``ClapModel``) or of one of its single-tower parts (``CLIPVisionModelWithProjection``,
``CLIPTextModel``, ``SiglipVisionModel``, ``ClapAudioModelWithProjection``, ...) feeds:

- **video** (CLIP, SigLIP, SigLIP2): the vision transformer on every frame, then its own pooling (CLIP: the CLS token
  through ``post_layernorm``; SigLIP: its attention-pooling head) and visual projection: exactly
  ``get_image_features`` per frame (:meth:`ClipVideoTower.frame_features`); then a temporal module (``mean``,
  ``transformer``, or ``divided`` space-time attention as the timm video tower has). Frames are normalised
  with the directory's image processor ``image_mean`` / ``image_std``; its vision ``image_size`` must be
  ``video.size`` (SigLIP2's NaFlex towers take any multiple of their patch size: each frame is its grid of
  patches).
- **text** (CLIP, SigLIP, SigLIP2, CLAP): the text transformer with its own pooling (CLIP: the EOS token;
  SigLIP: the last position through its head, captions padded to ``max_len`` without a mask, as SigLIP was
  trained; CLAP: RoBERTa's pooler) and text projection: exactly ``get_text_features``. The directory's
  tokenizer, whose ``model_max_length`` must be at least ``text.max_len``.
- **audio** (CLAP): the HTS-AT audio encoder with its projection (``get_audio_features``) on the directory's
  feature extractor's output for the window.

One directory feeding two towers (video and text of one CLIP) is read once per model build
(:func:`mmcl.modalities.pretrained.load_once`). The towers remember where their joint space comes from
(:attr:`ClipTower.joint`: the source checkpoint and its logit scale / bias), which
``model.logit_scale_init: checkpoint`` uses.

open_clip checkpoints (a state-dict file and the model config JSON it was trained with, OpenAI's layout
included) map onto the same towers through :mod:`mmcl.modalities.open_clip`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmcl.config import ConfigError
from mmcl.modalities.audio import Audio, FeatureExtractorInput
from mmcl.modalities.base import Tower, register_tower
from mmcl.modalities.pretrained import (hf_blocks, load_hf_component, load_hf_config, load_hf_model, load_once,
                                        local_path)
from mmcl.modalities.text import HFTokenizer, Text
from mmcl.modalities.timm_towers import DividedBlock, TemporalTransformer
from mmcl.modalities.video import NormalizedFrames, Video


@dataclass(frozen=True)
class Part:
    """Where one tower's modules sit in a model class of the family."""

    #: Attribute of the two-tower model (and of the ``*WithProjection`` part classes) holding the encoder.
    encoder: str
    #: Attribute holding the projection after the pooled output (None: the encoder's pooler output is the
    #: embedding, SigLIP).
    projection: str | None
    #: Attribute of the two-tower config holding this part's config.
    config: str


#: transformers ``model_type`` -> the family's parts by modality kind. Single-tower parts have their own
#: model types (below).
FAMILIES: dict[str, dict[str, Part]] = {
    "clip": {"video": Part("vision_model", "visual_projection", "vision_config"),
             "text": Part("text_model", "text_projection", "text_config")},
    "siglip": {"video": Part("vision_model", None, "vision_config"),
               "text": Part("text_model", None, "text_config")},
    "siglip2": {"video": Part("vision_model", None, "vision_config"),
                "text": Part("text_model", None, "text_config")},
    "clap": {"audio": Part("audio_model", "audio_projection", "audio_config"),
             "text": Part("text_model", "text_projection", "text_config")},
}
#: Single-tower model types: (family, kind).
PARTS: dict[str, tuple[str, str]] = {
    "clip_vision_model": ("clip", "video"), "clip_text_model": ("clip", "text"),
    "siglip_vision_model": ("siglip", "video"), "siglip_text_model": ("siglip", "text"),
    "siglip2_vision_model": ("siglip2", "video"), "siglip2_text_model": ("siglip2", "text"),
    "clap_audio_model": ("clap", "audio"), "clap_text_model": ("clap", "text"),
}
#: The class read when ``config.json`` names no (or no known) architecture.
DEFAULT_CLASS = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model", "clap": "ClapModel",
                 "clip_vision_model": "CLIPVisionModelWithProjection", "clip_text_model": "CLIPTextModelWithProjection",
                 "siglip_vision_model": "SiglipVisionModel", "siglip_text_model": "SiglipTextModel",
                 "siglip2_vision_model": "Siglip2VisionModel", "siglip2_text_model": "Siglip2TextModel",
                 "clap_audio_model": "ClapAudioModelWithProjection", "clap_text_model": "ClapTextModelWithProjection"}
#: The classes accepted per model type (``config.json`` ``architectures``).
CLASSES = {**{k: {v} for k, v in DEFAULT_CLASS.items()},
           "clip_vision_model": {"CLIPVisionModelWithProjection", "CLIPVisionModel"},
           "clip_text_model": {"CLIPTextModelWithProjection", "CLIPTextModel"},
           "clap_audio_model": {"ClapAudioModelWithProjection", "ClapAudioModel"},
           "clap_text_model": {"ClapTextModelWithProjection", "ClapTextModel"}}


def allowed_types(kind: str) -> list[str]:
    """The model types whose directories can feed a ``clip`` tower of modality ``kind``."""
    return [t for t, parts in FAMILIES.items() if kind in parts] + [t for t, (_, k) in PARTS.items() if k == kind]


@dataclass(frozen=True)
class Source:
    """What a ``clip`` tower reads from its directory: the family, the part, the model class and the config."""

    path: Path
    family: str
    part: Part
    cls_name: str
    #: The directory's whole config (two-tower or single part).
    config: Any
    #: Whether the directory holds the two-tower model (then it has a logit scale).
    joint: bool

    @property
    def part_config(self) -> Any:
        return getattr(self.config, self.part.config) if self.joint else self.config


def clip_source(path: Path, kind: str, where: str) -> Source:
    """Identify ``path`` as a CLIP-family directory with a ``kind`` tower, else one line naming what it is
    and the model types allowed."""
    config = load_hf_config(path, where)
    model_type = config.model_type
    if model_type in FAMILIES and kind in FAMILIES[model_type]:
        family, joint = model_type, True
    elif model_type in PARTS and PARTS[model_type][1] == kind:
        family, joint = PARTS[model_type][0], False
    else:
        raise ConfigError(f"{where}: {path} is a {model_type!r} model, not a CLIP-family model with a tower for {kind} "
                          f"(allowed model types: {', '.join(allowed_types(kind))})")
    named = [a for a in (getattr(config, "architectures", None) or []) if a in CLASSES[model_type]]
    return Source(path, family, FAMILIES[family][kind], named[0] if named else DEFAULT_CLASS[model_type], config,
                  joint)


@dataclass(frozen=True)
class JointSpace:
    """The joint embedding space a tower starts in: its source checkpoint and, for a two-tower checkpoint read
    with its weights, the model's logit scale ``t = log s`` and (SigLIP) bias."""

    source: str
    logit_scale: float | None = None
    logit_bias: float | None = None


class _Loaded:
    """A model read once per build; the parts already handed to a tower (a second tower of the same part gets
    a copy, so no parameter is shared between towers)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.taken: set[str] = set()

    def take(self, name: str) -> nn.Module | None:
        module = self.model if name == "" else getattr(self.model, name, None)
        if module is None:
            return None
        if name in self.taken:
            return copy.deepcopy(module)
        self.taken.add(name)
        return module


def read_parts(source: Source, where: str, strict: bool,
               pretrained: bool) -> tuple[nn.Module, nn.Module | None, JointSpace]:
    """The encoder and projection of ``source``'s part (the directory read once per build), and its joint
    space. ``pretrained=False``: the architecture alone from the directory's config (random weights)."""
    import transformers

    cls = getattr(transformers, source.cls_name)
    key = ("clip", str(source.path.resolve()), source.cls_name, pretrained)
    loaded = load_once(key, lambda: _Loaded(load_hf_model(cls, source.path, where, strict=strict,
                                                          pretrained=pretrained, dtype=torch.float32)))
    model = loaded.model
    has_encoder = hasattr(model, source.part.encoder)
    encoder = loaded.take(source.part.encoder if has_encoder else "")
    projection = loaded.take(source.part.projection) if source.part.projection else None
    joint = JointSpace(str(source.path.resolve()))
    if source.joint and pretrained:
        scale = next((getattr(model, n) for n in ("logit_scale", "logit_scale_t") if hasattr(model, n)), None)
        bias = getattr(model, "logit_bias", None)
        joint = JointSpace(joint.source, float(scale.detach().reshape(-1)[0]) if scale is not None else None,
                           float(bias.detach().reshape(-1)[0]) if bias is not None else None)
    return cast(nn.Module, encoder), projection, joint


class ClipTower(Tower):
    """Base of the CLIP-family towers: ``encoder`` (the part's transformer), ``projection`` (None when the
    pooled output is the embedding) and :attr:`joint`. Blocks are the encoder's layers; gradient
    checkpointing is the encoder's own."""

    def __init__(self, encoder: nn.Module, projection: nn.Module | None, out_dim: int, joint: JointSpace | None):
        super().__init__()
        self.encoder = encoder
        self.projection = projection
        self.out_dim = out_dim
        #: Where the tower's embedding space comes from (not saved: a loaded model has its scale in the weights).
        self.joint = joint

    def blocks(self) -> list[nn.Module]:
        return hf_blocks(self.encoder)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every transformers ``GradientCheckpointingLayer`` of the encoder (their own mechanism, set
        on the layers: CLAP's audio model does not offer ``activation_checkpointing_enable`` but its stages are
        such layers; under ``divided`` they are the space layers)."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        for layer in self.encoder.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer.gradient_checkpointing = enable
                layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.projection(pooled) if self.projection is not None else pooled


def _out_dim(encoder: nn.Module, projection: nn.Module | None) -> int:
    """The embedding width: the projection's last ``Linear`` (CLAP's is Linear -> ReLU -> Linear), else the
    pooled output's (SigLIP's text head, else the hidden size)."""
    last = projection if projection is not None else getattr(encoder, "head", None)
    linears = [m for m in last.modules() if isinstance(m, nn.Linear)] if isinstance(last, nn.Module) else []
    return int(linears[-1].out_features) if linears else int(encoder.config.hidden_size)


# ----------------------------------------------------------------------------------------------------
# Video


@dataclass(kw_only=True)
class ClipSourceFields:
    """Where a ``clip`` video or text tower reads its half of the model: ``path``, a local transformers
    directory (the whole model or its part, with its processor / tokenizer), or ``open_clip``, an open_clip
    state-dict file with ``open_clip_config``, its model config JSON (``ViT-B-32.json``; see
    :mod:`mmcl.modalities.open_clip`). ``strict``: refuse a checkpoint with missing or unexpected keys."""

    path: str = ""
    open_clip: str = ""
    open_clip_config: str = ""
    strict: bool = True

    def validate(self, where: str) -> None:
        if bool(self.path) == bool(self.open_clip):
            raise ConfigError(f"{where}.path: give exactly one of path (a transformers directory) and open_clip "
                              f"(an open_clip checkpoint file, with open_clip_config)")
        if self.open_clip and not self.open_clip_config:
            raise ConfigError(f"{where}.open_clip_config: required with open_clip (the model config JSON)")


@dataclass(kw_only=True)
class ClipVideoTowerConfig(ClipSourceFields):
    """A CLIP / SigLIP vision part (with its image processor) per frame, then ``temporal``."""

    type: Literal["clip"] = "clip"
    #: Over the frames' embeddings: their mean, a small transformer (learned time positions), or divided
    #: space-time attention inside the vision transformer (starts as the identity: the untrained tower equals
    #: ``mean``).
    temporal: Literal["mean", "transformer", "divided"] = "mean"
    temporal_depth: int = 2
    temporal_heads: int = 4

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.temporal_depth <= 0 or self.temporal_heads <= 0:
            raise ConfigError(f"{where}.temporal_depth/temporal_heads: must be > 0, got "
                              f"{self.temporal_depth}/{self.temporal_heads}")


class ClipFrames(NormalizedFrames):
    """Frames resized to ``video.size`` and normalised with the checkpoint's image processor mean / std; the
    directory's config and image processor are copied on save (not its weights)."""

    def __init__(self, video: Video):
        tc = video.cfg.tower
        where = f"{video.where}.tower.path"
        self.path = local_path(video.resolve(tc.path), where)
        self.source = clip_source(self.path, "video", where)
        part = self.source.part_config
        if self.source.family == "siglip2":  # NaFlex: any grid of patches up to its position table
            patch, most = int(part.patch_size), int(part.num_patches)
            if video.cfg.size % patch or (video.cfg.size // patch) ** 2 > most:
                raise ConfigError(f"{video.where}.size: {video.cfg.size} does not fit {self.path} (its vision config "
                                  f"takes a multiple of patch_size {patch} with at most num_patches {most} patches)")
        elif int(part.image_size) != video.cfg.size:
            raise ConfigError(f"{video.where}.size: {video.cfg.size} does not fit {self.path} (its vision config "
                              f"has image_size {part.image_size}: set size: {part.image_size})")
        from transformers import AutoImageProcessor

        processor = load_hf_component(AutoImageProcessor, self.path, where)
        super().__init__(list(processor.image_mean), list(processor.image_std))

    def files(self) -> dict[str, str]:
        return {"tower.path": str(self.path)}


class _DividedLayer(DividedBlock):
    """:class:`~mmcl.modalities.timm_towers.DividedBlock` around a transformers encoder layer (which takes the
    attention mask positionally)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.time_pos is not None:
            patches = x[:, self.prefix:].unflatten(0, (-1, self.frames)) + self.time_pos
            x = torch.cat([x[:, :self.prefix], patches.flatten(0, 1)], dim=1)
        return self.space(self.time(x), *args, **kwargs)


class ClipVideoTower(ClipTower):
    """``[N, T, 3, S, S]`` normalised frames -> ``[N, P]``: :meth:`frame_features` per frame (the checkpoint's
    ``get_image_features``), then the temporal module."""

    def __init__(self, encoder: nn.Module, projection: nn.Module | None, out_dim: int, joint: JointSpace | None,
                 cfg: ClipVideoTowerConfig, frames: int, prefix: int):
        super().__init__(encoder, projection, out_dim, joint)
        self.frames = frames
        self.temporal = cfg.temporal
        if cfg.temporal == "transformer":
            self.temporal_module = TemporalTransformer(frames, out_dim, cfg.temporal_depth, cfg.temporal_heads)
        elif cfg.temporal == "divided":
            layers = self.layer_stack()
            for i, layer in enumerate(layers):
                layers[i] = self.divided(layer, i == 0, frames, prefix)

    def layer_stack(self) -> nn.Module:
        """The encoder's sequence of transformer layers (where ``divided`` puts its time attention)."""
        return self.encoder.encoder.layers

    def divided(self, layer: nn.Module, first: bool, frames: int, prefix: int) -> nn.Module:
        """``layer`` with time attention before it (the first one also adds time positions)."""
        attn = layer.self_attn
        return _DividedLayer(layer, attn.embed_dim, attn.num_heads, frames, prefix, first)

    def own_blocks(self) -> list[nn.Module]:
        return hf_blocks(self.encoder)

    def blocks(self) -> list[nn.Module]:
        extra = list(self.temporal_module.trunk.blocks) if self.temporal == "transformer" else []
        own = list(self.layer_stack()) if self.temporal == "divided" else self.own_blocks()
        return own + extra

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        if self.temporal == "transformer":
            self.temporal_module.trunk.grad_checkpointing = enable

    def frame_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[M, 3, S, S]`` -> ``[M, P]``: the checkpoint's pooled, projected image embedding of each frame."""
        return self.project(self.encoder(pixel_values=pixels).pooler_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[:2]
        if t != self.frames:
            raise ValueError(f"expected clips of {self.frames} frames (the config's), got {t}")
        feats = self.frame_features(x.flatten(0, 1)).view(n, t, -1)
        return self.temporal_module(feats) if self.temporal == "transformer" else feats.mean(dim=1)


class Siglip2VideoTower(ClipVideoTower):
    """SigLIP2 (NaFlex) frames: each ``[3, S, S]`` frame as its ``(S/p)^2`` patches of ``p * p * 3`` values in
    the order of ``Siglip2ImageProcessor`` (rows, columns, then pixels and channels), every patch attended,
    the position table resized to the ``S/p x S/p`` grid by the model."""

    def frame_features(self, pixels: torch.Tensor) -> torch.Tensor:
        m, c, s, _ = pixels.shape
        p = int(self.encoder.config.patch_size)
        g = s // p
        patches = pixels.reshape(m, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(m, g * g, p * p * c)
        mask = torch.ones(m, g * g, dtype=torch.long, device=pixels.device)
        shapes = torch.tensor([[g, g]], device=pixels.device).expand(m, 2)
        return self.encoder(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output


def _video_input(video: Video) -> Any:
    if video.cfg.tower.open_clip:
        from mmcl.modalities.open_clip import OpenClipFrames

        return OpenClipFrames(video)
    return ClipFrames(video)


def check_temporal(cfg: ClipVideoTowerConfig, width: int, where: str) -> None:
    """The temporal transformer's heads must divide the embedding width."""
    if cfg.temporal == "transformer" and width % cfg.temporal_heads:
        raise ConfigError(f"{where}.temporal_heads: {cfg.temporal_heads} does not divide the embedding width {width}")


def _video_tower(video: Video, pretrained: bool) -> Tower:
    tc = video.cfg.tower
    where = f"{video.where}.tower"
    if tc.open_clip:
        from mmcl.modalities.open_clip import open_clip_video_tower

        return open_clip_video_tower(video, pretrained)
    frames = cast(ClipFrames, video.input)
    source = frames.source
    encoder, projection, joint = read_parts(source, f"{where}.path", tc.strict, pretrained)
    width = _out_dim(encoder, projection)
    check_temporal(tc, width, where)
    prefix = 1 if source.family == "clip" else 0  # CLIP's class token; SigLIP has none
    cls = Siglip2VideoTower if source.family == "siglip2" else ClipVideoTower
    return cls(encoder, projection, width, joint, tc, video.cfg.frames, prefix)


# ----------------------------------------------------------------------------------------------------
# Text


@dataclass(kw_only=True)
class ClipTextTowerConfig(ClipSourceFields):
    """A CLIP / SigLIP / SigLIP2 / CLAP text part with its tokenizer (``text.tokenizer`` may name another
    tokenizer directory; with ``open_clip`` it names a transformers CLIP tokenizer directory: open_clip's own
    BPE is CLIP's)."""

    type: Literal["clip"] = "clip"


class ClipTokenizer(HFTokenizer):
    """The checkpoint's tokenizer, checked against its text config (vocabulary, positions) and its own
    ``model_max_length``. SigLIP reads ids alone (it was trained on captions padded to the maximum length,
    without an attention mask)."""

    def __init__(self, text: Text):
        tc = text.cfg.tower
        where = f"{text.where}.tower.path"
        path = local_path(text.resolve(tc.path), where)
        self.source = clip_source(path, "text", where)
        tok_where = f"{text.where}.tokenizer" if text.cfg.tokenizer else where
        super().__init__(text.resolve(text.cfg.tokenizer) if text.cfg.tokenizer else path, tok_where, path,
                         text.cfg.max_len, text.where)

    def _check_fits(self, where: str, max_len: int) -> None:
        part = self.source.part_config
        if self.vocab_size > part.vocab_size:
            raise ConfigError(f"{where}.tokenizer: tokenizer {self.path} has {self.vocab_size} tokens but the model "
                              f"{self.model_path} has vocab_size {part.vocab_size}")
        longest = int(self.tok.model_max_length)
        if longest < max_len:
            raise ConfigError(f"{where}.max_len: {max_len} exceeds the tokenizer's model_max_length {longest} "
                              f"({self.path})")
        if max_len > part.max_position_embeddings:
            raise ConfigError(f"{where}.max_len: {max_len} exceeds the model's max_position_embeddings "
                              f"{part.max_position_embeddings} ({self.model_path})")


class ClipTextTower(ClipTower):
    """``[N, K, L]`` token rows (ids, attention mask[, token type ids]) -> ``[N, P]``: the checkpoint's
    ``get_text_features``."""

    def __init__(self, encoder: nn.Module, projection: nn.Module | None, out_dim: int, joint: JointSpace | None,
                 use_mask: bool):
        super().__init__(encoder, projection, out_dim, joint)
        self.use_mask = use_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"attention_mask": x[:, 1]} if self.use_mask else {}
        return self.project(self.encoder(input_ids=x[:, 0], **kwargs).pooler_output)


def _text_input(text: Text) -> Any:
    if text.cfg.tower.open_clip:
        from mmcl.modalities.open_clip import OpenClipTokenizer

        return OpenClipTokenizer(text)
    return ClipTokenizer(text)


def _text_tower(text: Text, pretrained: bool) -> Tower:
    tc = text.cfg.tower
    if tc.open_clip:
        from mmcl.modalities.open_clip import open_clip_text_tower

        return open_clip_text_tower(text, pretrained)
    source = cast(ClipTokenizer, text.input).source
    encoder, projection, joint = read_parts(source, f"{text.where}.tower.path", tc.strict, pretrained)
    return ClipTextTower(encoder, projection, _out_dim(encoder, projection), joint,
                         use_mask=source.family not in ("siglip", "siglip2"))


# ----------------------------------------------------------------------------------------------------
# Audio


@dataclass(kw_only=True)
class ClipAudioTowerConfig:
    type: Literal["clip"] = "clip"
    #: Local transformers directory of a CLAP model or its audio part, with its feature extractor.
    path: str
    strict: bool = True


class ClapFeatures(FeatureExtractorInput):
    """The CLAP feature extractor's ``input_features`` of the window (``[C, frames, mel]``: C is 4 for a fusion
    model); the window must fit the extractor's ``max_length_s`` (a longer one would be cropped at random by
    the extractor, outside the per-sample randomness)."""

    def __init__(self, audio: Audio):
        where = f"{audio.where}.tower.path"
        path = local_path(audio.resolve(audio.cfg.tower.path), where)
        self.source = clip_source(path, "audio", where)
        super().__init__(audio.cfg, path, audio.where)
        longest = float(self.fe.max_length_s)
        if audio.cfg.seconds > longest:
            raise ConfigError(f"{audio.where}.seconds: {audio.cfg.seconds} exceeds the feature extractor's "
                              f"max_length_s {longest} ({path})")


class ClapAudioTower(ClipTower):
    """``[N, C, frames, mel]`` -> ``[N, P]``: CLAP's audio encoder and projection (``get_audio_features``
    before its L2 normalisation; the model normalises). The window is never longer than the extractor's chunk,
    so ``is_longer`` is False."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        is_longer = torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)
        return self.project(self.encoder(input_features=x, is_longer=is_longer).pooler_output)


def _audio_tower(audio: Audio, pretrained: bool) -> Tower:
    tc = audio.cfg.tower
    source = cast(ClapFeatures, audio.input).source
    encoder, projection, joint = read_parts(source, f"{audio.where}.tower.path", tc.strict, pretrained)
    return ClapAudioTower(encoder, projection, _out_dim(encoder, projection), joint)


register_tower("video", "clip", config=ClipVideoTowerConfig, build=_video_tower, inputs=_video_input)
register_tower("text", "clip", config=ClipTextTowerConfig, build=_text_tower, inputs=_text_input)
register_tower("audio", "clip", config=ClipAudioTowerConfig, build=_audio_tower, inputs=ClapFeatures)
