"""Video: decode (torchcodec, PyAV fallback), uniform frame sampling, resize, per-clip standardisation;
:class:`VideoTower` = 3-D tubelet patches + fixed sin-cos space-time positions + timm ViT blocks with
joint space-time attention (mean-pooling per-frame features cannot tell left from right; joint attention
over tubelets can)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import ConfigError
from mmcl.modalities.base import Modality, SampleError, TokenEmbedder, Tower, register_modality
from mmcl.modalities.layers import PatchTokens, Trunk, init_linear_like_vit, patch_grid, sincos_nd, tubelet_stem


@dataclass
class VideoTowerConfig:
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


@dataclass
class VideoConfig:
    #: Frames sampled uniformly over the clip.
    frames: int = 8
    #: Square output size in pixels (frames are resized, shorter side, then centre-cropped).
    size: int = 48
    #: Decoder: torchcodec, or PyAV (also used automatically when torchcodec cannot open a clip).
    decoder: str = "torchcodec"
    tower: VideoTowerConfig = field(default_factory=VideoTowerConfig)

    def validate(self, where: str) -> None:
        if self.decoder not in ("torchcodec", "pyav"):
            raise ConfigError(f"{where}.decoder: {self.decoder!r} is not allowed (allowed: 'torchcodec', 'pyav')")
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


@register_modality
class Video(Modality):
    kind = "video"
    Config = VideoConfig
    members = ("mp4", "webm", "mkv", "avi", "mov")

    def decode(self, sample: dict) -> torch.Tensor:
        """-> ``[T, 3, size, size]`` uint8 (kept small: decoded clips may be cached in RAM)."""
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
        return resize_center_crop(frames, self.cfg.size)

    def transform(self, data: torch.Tensor, train: bool) -> torch.Tensor:
        """``[T, 3, S, S]`` uint8 -> float32, standardised per clip and channel."""
        x = data.float()
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-3)

    def empty(self) -> torch.Tensor:
        return torch.zeros(self.cfg.frames, 3, self.cfg.size, self.cfg.size)

    def build_tower(self) -> Tower:
        return VideoTower(self.cfg)

    def build_token_embedder(self, width: int) -> TokenEmbedder:
        """Shared-trunk tokens: the tower's tubelets (``tower.patch``, ``tubelet``, ``stem``), ``width`` wide."""
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
