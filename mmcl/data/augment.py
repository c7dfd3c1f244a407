"""Train-time augmentation (``data.augment``): off by default, so recipes without the block are unchanged.

- video (:class:`VideoAugment`): a random resized crop drawn once per clip and applied identically to every
  frame (the clip keeps its motion), an optional horizontal flip (off by default: it reverses the direction
  of motion, which the synthetic world and many action labels depend on), and colour jitter (brightness,
  contrast, saturation, hue factors drawn once per clip). Frames stay uint8 ``[T, 3, H, W]`` of the same size;
  the tower type's input (standardisation, normalisation) runs after it.
- audio (:class:`AudioAugment`): SpecAugment time and frequency masks on the log-mel window the tower sees,
  ``[1, n_mels, frames]``, after its per-clip standardisation (masked cells are set to 0, the clip's mean).

Every draw comes from ``ctx.generator("augment.<kind>")`` (:class:`~mmcl.data.context.SampleContext`): a function
of (seed, epoch, key), so two ranks, a resumed run and a re-run augment a sample the same way. Only training
loaders augment (``train`` and a context); evaluation never does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mmcl.errors import ConfigError

if TYPE_CHECKING:  # the config classes are read by mmcl.config, which every CLI command imports: no torch there
    import torch


def _check_range(where: str, name: str, pair: list[float], low: float, high: float) -> None:
    if len(pair) != 2 or not (low <= pair[0] <= pair[1] <= high):
        raise ConfigError(f"{where}.{name}: {pair} must be [min, max] with {low:g} <= min <= max <= {high:g}")


@dataclass
class VideoAugment:
    """One clip's spatial and colour augmentation, the same on all its frames."""

    #: Random resized crop: the crop's area as a fraction of the frame, ``[min, max]`` (``[1, 1]`` with ratio
    #: ``[1, 1]`` on square frames: no crop).
    scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    #: The crop's aspect ratio (width / height), ``[min, max]``, drawn log-uniformly.
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    #: Mirror the clip left-right with probability 0.5 (off: a flip reverses the direction of motion).
    flip: bool = False
    #: Colour jitter: factors drawn uniformly in ``[1 - x, 1 + x]`` (hue: a shift in ``[-x, x]`` turns,
    #: ``x <= 0.5``); 0 leaves that property alone.
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def validate(self, where: str) -> None:
        _check_range(where, "scale", self.scale, 1e-3, 1.0)
        _check_range(where, "ratio", self.ratio, 1e-2, 1e2)
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{where}.{name}: must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"{where}.hue: must be in [0, 0.5], got {self.hue}")


@dataclass
class AudioAugment:
    """SpecAugment (Park et al. 2019) on the log-mel window: ``time_masks`` masks of up to ``time_width``
    spectrogram frames and ``freq_masks`` masks of up to ``freq_width`` mel bins, each width drawn uniformly in
    ``[0, max]`` and placed uniformly inside the window."""

    time_masks: int = 2
    time_width: int = 20
    freq_masks: int = 2
    freq_width: int = 8

    def validate(self, where: str) -> None:
        for name in ("time_masks", "time_width", "freq_masks", "freq_width"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass
class AugmentConfig:
    """``data.augment``: the augmentation of each time-based modality kind (absent: none)."""

    video: VideoAugment | None = None
    audio: AudioAugment | None = None


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    import torch

    return low + (high - low) * float(torch.rand((), generator=gen))


def crop_box(height: int, width: int, scale: list[float], ratio: list[float],
             gen: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop (torchvision's ``RandomResizedCrop`` rule: 10 draws of
    area and log-uniform aspect ratio, else the largest centred crop within ``ratio``)."""
    import torch

    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(gen, scale[0], scale[1])
        aspect = math.exp(_uniform(gen, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_frames(frames: torch.Tensor, cfg: VideoAugment, gen: torch.Generator) -> torch.Tensor:
    """uint8 ``[T, 3, H, W]`` -> uint8 ``[T, 3, H, W]``: one crop box, one flip decision and one set of jitter
    factors drawn from ``gen`` and applied to every frame alike."""
    import torch
    import torchvision.transforms.v2.functional as TF

    _, _, height, width = frames.shape
    top, left, h, w = crop_box(height, width, cfg.scale, cfg.ratio, gen)
    if (top, left, h, w) != (0, 0, height, width):
        frames = TF.resized_crop(frames, top, left, h, w, [height, width], antialias=True)
    if cfg.flip and float(torch.rand((), generator=gen)) < 0.5:
        frames = frames.flip(-1)
    if cfg.brightness:
        frames = TF.adjust_brightness(frames, _uniform(gen, 1 - cfg.brightness, 1 + cfg.brightness))
    if cfg.contrast:
        frames = TF.adjust_contrast(frames, _uniform(gen, 1 - cfg.contrast, 1 + cfg.contrast))
    if cfg.saturation:
        frames = TF.adjust_saturation(frames, _uniform(gen, 1 - cfg.saturation, 1 + cfg.saturation))
    if cfg.hue:
        frames = TF.adjust_hue(frames, _uniform(gen, -cfg.hue, cfg.hue))
    return frames


def mask_spans(length: int, masks: int, max_width: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """``masks`` spans ``[start, end)`` inside ``[0, length)``, each of a width drawn in ``[0, max_width]``
    (clipped to ``length``)."""
    import torch

    spans = []
    for _ in range(masks):
        width = int(torch.randint(0, min(max_width, length) + 1, (), generator=gen))
        start = int(torch.randint(0, length - width + 1, (), generator=gen))
        spans.append((start, start + width))
    return spans


def spec_augment(mel: torch.Tensor, cfg: AudioAugment, gen: torch.Generator) -> torch.Tensor:
    """Log-mel ``[..., n_mels, frames]`` -> the same with the drawn frequency and time masks set to 0 (a new
    tensor; the input, which a RAM cache may hold, is left alone)."""
    n_mels, frames = mel.shape[-2:]
    out = mel.clone()
    for start, end in mask_spans(n_mels, cfg.freq_masks, cfg.freq_width, gen):
        out[..., start:end, :] = 0.0
    for start, end in mask_spans(frames, cfg.time_masks, cfg.time_width, gen):
        out[..., start:end] = 0.0
    return out
