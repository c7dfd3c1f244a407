"""Video: decode (torchcodec, PyAV fallback), uniform frame sampling, resize, normalisation, and the tower,
picked by ``tower.type``:

- ``tubelet`` (default): :class:`VideoTower` = 3-D tubelet patches + fixed sin-cos space-time positions + timm
  ViT blocks with joint space-time attention (mean-pooling per-frame features cannot tell left from right;
  joint attention over tubelets can), trained from scratch on per-clip standardised frames;
- ``timm``: a timm image model per frame from a local checkpoint, then a temporal module
  (:class:`~mmcl.modalities.timm_towers.TimmVideoTower`); frames normalised with the model's mean / std;
- ``hf``: a transformers video model (VideoMAE, TimeSformer) from a local directory (:class:`HFVideoTower`);
  frames go through the image processor saved in the same directory.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import ConfigError
from mmcl.modalities.base import Modality, SampleError, TokenEmbedder, Tower, register_modality
from mmcl.modalities.layers import PatchTokens, Trunk, init_linear_like_vit, patch_grid, sincos_nd, tubelet_stem
from mmcl.modalities.pretrained import load_hf_component, load_hf_model, local_path
from mmcl.modalities.timm_towers import TimmVideoTower, TimmVideoTowerConfig, timm_pretrained_cfg


@dataclass
class VideoTowerConfig:
    type: Literal["tubelet"] = "tubelet"
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    patch: int = 8
    #: Frames per tubelet (temporal patch size).
    tubelet: int = 2
    drop_path: float = 0.0
    #: Tubelet embedding: one linear ``patch``-sized projection, or a small convolutional stem (a 3x3
    #: stride-2 convolution per frame, then the projection of ``patch / 2`` cells): early convolutions help
    #: a ViT trained on little data see shapes (Xiao et al. 2021).
    stem: Literal["patch", "conv"] = "patch"
    stem_channels: int = 32


@dataclass(kw_only=True)
class HFVideoTowerConfig:
    type: Literal["hf"] = "hf"
    #: Local directory of a transformers video model (VideoMAE, TimeSformer: ``config.json`` + weights) with
    #: its image processor (``preprocessor_config.json``), as ``save_pretrained`` writes them.
    path: str
    #: Mean of the patch tokens, or the CLS token (models that have one: TimeSformer).
    pooling: Literal["mean", "cls"] = "mean"
    #: Refuse a checkpoint with missing or unexpected keys.
    strict: bool = True


@dataclass
class VideoConfig:
    #: Frames sampled uniformly over the clip.
    frames: int = 8
    #: Square output size in pixels (frames are resized, shorter side, then centre-cropped; ``hf`` towers:
    #: the image processor's output size, which it must equal).
    size: int = 48
    #: Decoder: torchcodec, or PyAV (also used automatically when torchcodec cannot open a clip).
    decoder: str = "torchcodec"
    tower: VideoTowerConfig | TimmVideoTowerConfig | HFVideoTowerConfig = field(default_factory=VideoTowerConfig)

    def validate(self, where: str) -> None:
        if self.decoder not in ("torchcodec", "pyav"):
            raise ConfigError(f"{where}.decoder: {self.decoder!r} is not allowed (allowed: 'torchcodec', 'pyav')")
        if not isinstance(self.tower, VideoTowerConfig):
            return
        if self.frames % self.tower.tubelet:
            raise ConfigError(f"{where}.frames: {self.frames} is not a multiple of tower.tubelet {self.tower.tubelet}")
        if self.size % self.tower.patch:
            raise ConfigError(f"{where}.size: {self.size} is not a multiple of tower.patch {self.tower.patch}")


def uniform_indices(n_frames: int, t: int) -> list[int]:
    """``t`` frame indices spread uniformly over ``n_frames`` (centres of ``t`` equal segments)."""
    return [min(n_frames - 1, int((i + 0.5) * n_frames / t)) for i in range(t)]


def _decode_torchcodec(data: bytes, t: int) -> torch.Tensor:
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(data, dimension_order="NCHW", seek_mode="exact")
    n = dec.metadata.num_frames
    if not n:
        raise SampleError("bad_video", "no frames")
    return dec.get_frames_at(uniform_indices(n, t)).data


def _decode_pyav(data: bytes, t: int) -> torch.Tensor:
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise SampleError("bad_video", "no video stream")
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise SampleError("bad_video", "no frames")
    picked = np.stack([frames[i] for i in uniform_indices(len(frames), t)])
    return torch.from_numpy(picked).permute(0, 3, 1, 2)


def resize_center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """``[T, C, H, W]`` uint8 -> ``[T, C, size, size]`` uint8 (shorter side to ``size``, centre crop)."""
    _, _, h, w = frames.shape
    if (h, w) == (size, size):
        return frames
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(frames.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, :, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


def _processor_output(processor: Any, frames: int, height: int, width: int) -> tuple[int, ...]:
    """Shape ``[T, C, H, W]`` of what an HF image processor makes of ``frames`` frames of ``height x width``."""
    video = list(torch.zeros(frames, 3, height, width, dtype=torch.uint8))
    return tuple(processor(video, return_tensors="pt")["pixel_values"][0].shape)


@register_modality
class Video(Modality):
    kind = "video"
    Config = VideoConfig
    members = ("mp4", "webm", "mkv", "avi", "mov")

    def __init__(self, name: str, cfg: VideoConfig, base_dir: str | Path | None = None):
        super().__init__(name, cfg, base_dir)
        where = f"model.modalities.{name}"
        tower = cfg.tower
        self.processor = None
        if isinstance(tower, TimmVideoTowerConfig):
            pretrained = timm_pretrained_cfg(tower.model, f"{where}.tower.model")
            self.mean = torch.tensor(tower.mean or pretrained["mean"]).view(3, 1, 1)
            self.std = torch.tensor(tower.std or pretrained["std"]).view(3, 1, 1)
        elif isinstance(tower, HFVideoTowerConfig):
            self.hf_path = local_path(self.resolve(tower.path), f"{where}.tower.path")
            self._load_processor(where)

    def _load_processor(self, where: str) -> None:
        """The HF directory's image processor, checked against the model's config and this config's
        ``frames`` and ``size`` (each mismatch one line naming both)."""
        from transformers import AutoConfig, AutoImageProcessor

        field_ = f"{where}.tower.path"
        self.processor = load_hf_component(AutoImageProcessor, self.hf_path, field_)
        model_cfg = load_hf_component(AutoConfig, self.hf_path, field_)
        t, s = self.cfg.frames, self.cfg.size
        wanted = getattr(model_cfg, "num_frames", t)
        if wanted != t:
            raise ConfigError(f"{where}.frames: {t} does not fit {self.hf_path} (its model takes num_frames {wanted})")
        wide, tall = _processor_output(self.processor, t, 48, 64), _processor_output(self.processor, t, 64, 48)
        if wide != tall:
            raise ConfigError(f"{field_}: the image processor of {self.hf_path} makes frames of a size that depends "
                              f"on the clip's ({wide[2:]} vs {tall[2:]}); it needs a centre crop")
        if wide[1:] != (3, s, s):
            raise ConfigError(f"{where}.size: {s} does not fit {self.hf_path} (its image processor makes "
                              f"{wide[1]}x{wide[2]}x{wide[3]} frames: set size: {wide[2]})")
        image_size = getattr(model_cfg, "image_size", s)
        if image_size != s:
            raise ConfigError(f"{where}.size: {s} does not fit {self.hf_path} (its model takes image_size "
                              f"{image_size})")

    def decode(self, sample: dict) -> torch.Tensor:
        """-> ``[T, 3, size, size]`` uint8 (kept small: decoded clips may be cached in RAM); ``hf`` towers:
        ``[T, 3, H, W]`` as decoded, for the image processor to resize."""
        _, data = self.find_member(sample)
        try:
            if self.cfg.decoder == "torchcodec":
                try:
                    frames = _decode_torchcodec(data, self.cfg.frames)
                except SampleError:
                    raise
                except Exception:
                    frames = _decode_pyav(data, self.cfg.frames)
            else:
                frames = _decode_pyav(data, self.cfg.frames)
        except SampleError:
            raise
        except Exception as e:
            raise SampleError("bad_video", f"{type(e).__name__}: {e}") from None
        if frames.shape[1] != 3:
            raise SampleError("bad_video", f"expected 3 channels, got {frames.shape[1]}")
        return frames if self.processor is not None else resize_center_crop(frames, self.cfg.size)

    def transform(self, data: torch.Tensor, train: bool) -> torch.Tensor:
        """uint8 frames -> ``[T, 3, S, S]`` float32: standardised per clip and channel (``tubelet``), scaled to
        [0, 1] and normalised with the model's mean / std (``timm``), or the image processor's output (``hf``)."""
        if self.processor is not None:
            return self.processor(list(data), return_tensors="pt")["pixel_values"][0]
        x = data.float()
        if isinstance(self.cfg.tower, TimmVideoTowerConfig):
            return (x / 255.0 - self.mean) / self.std
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-3)

    def empty(self) -> torch.Tensor:
        return torch.zeros(self.cfg.frames, 3, self.cfg.size, self.cfg.size)

    def files(self) -> dict[str, str]:
        """``hf`` towers: the model's directory (its config and image processor are copied on save)."""
        return {"tower.path": str(self.hf_path)} if isinstance(self.cfg.tower, HFVideoTowerConfig) else {}

    def build_tower(self) -> Tower:
        tower, where = self.cfg.tower, f"model.modalities.{self.name}.tower"
        if isinstance(tower, TimmVideoTowerConfig):
            checkpoint = self.resolve(tower.checkpoint) if tower.checkpoint else None
            return TimmVideoTower(tower, self.cfg.frames, self.cfg.size, checkpoint, where)
        if isinstance(tower, HFVideoTowerConfig):
            return HFVideoTower(tower, self.hf_path, where)
        return VideoTower(self.cfg)

    def build_token_embedder(self, width: int) -> TokenEmbedder:
        """Shared-trunk tokens: the tower's tubelets (``tower.patch``, ``tubelet``, ``stem``), ``width`` wide."""
        if self.cfg.tower.type != "tubelet":
            raise ConfigError(f"model.modalities.{self.name}.tower.type: a shared trunk embeds tubelets itself; "
                              f"{self.cfg.tower.type!r} towers are not available with model.shared_trunk "
                              f"(allowed: 'tubelet')")
        tc, n, where = self.cfg.tower, self.cfg.size // self.cfg.tower.patch, f"model.modalities.{self.name}.tower"
        stem = tubelet_stem(width, tc.patch, tc.tubelet, tc.stem, tc.stem_channels, where)
        return PatchTokens(stem, (self.cfg.frames // tc.tubelet, n, n), width, time_first=True)


class VideoTower(Tower):
    """``[N, T, 3, S, S]`` -> ``[N, width]``: tubelet embedding, sin-cos (t, h, w) positions, joint
    space-time attention over all tubelets, mean pooling."""

    def __init__(self, cfg: VideoConfig):
        super().__init__()
        tc = cfg.tower
        grid = (cfg.frames // tc.tubelet, patch_grid(cfg.size, tc.patch, "video.size"),
                patch_grid(cfg.size, tc.patch, "video.size"))
        if tc.stem == "conv":
            if tc.patch % 2:
                raise ConfigError(f"video.tower.patch: the conv stem needs an even patch, got {tc.patch}")
            half = tc.patch // 2
            self.embed = nn.Sequential(
                nn.Conv3d(3, tc.stem_channels, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
                nn.GELU(),
                nn.Conv3d(tc.stem_channels, tc.width, kernel_size=(tc.tubelet, half, half),
                          stride=(tc.tubelet, half, half)),
            )
        else:
            self.embed = nn.Conv3d(3, tc.width, kernel_size=(tc.tubelet, tc.patch, tc.patch),
                                   stride=(tc.tubelet, tc.patch, tc.patch))
        self.register_buffer("pos", sincos_nd(grid, tc.width)[None], persistent=False)
        self.trunk = Trunk(tc.width, tc.depth, tc.heads, tc.mlp_ratio, tc.drop_path)
        self.out_dim = tc.width
        init_linear_like_vit(self)

    def blocks(self) -> list[nn.Module]:
        return list(self.trunk.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.transpose(1, 2))  # [N, C, T, H, W] -> [N, width, t, h, w]
        tokens = x.flatten(2).transpose(1, 2) + self.pos
        return self.trunk(tokens)


class HFVideoTower(Tower):
    """``[N, T, 3, S, S]`` (the image processor's output) -> ``[N, hidden_size]``: a transformers video model
    (``AutoModel``: VideoMAE, TimeSformer) loaded from a local directory, its last hidden states pooled."""

    def __init__(self, cfg: HFVideoTowerConfig, path: Path, where: str):
        super().__init__()
        from transformers import AutoModel

        self.model = load_hf_model(AutoModel, path, f"{where}.path", strict=cfg.strict, dtype=torch.float32)
        self.prefix = 1 if getattr(getattr(self.model, "embeddings", None), "cls_token", None) is not None else 0
        if cfg.pooling == "cls" and not self.prefix:
            raise ConfigError(f"{where}.pooling: 'cls' needs a model with a CLS token, {type(self.model).__name__} "
                              f"has none (allowed here: 'mean')")
        self.pooling = cfg.pooling
        self.out_dim = self.model.config.hidden_size

    def blocks(self) -> list[nn.Module]:
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        return list(layers) if layers is not None else []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable()
        else:
            self.model.gradient_checkpointing_disable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=x).last_hidden_state
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, self.prefix:].mean(dim=1)
