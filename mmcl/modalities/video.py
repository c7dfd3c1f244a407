"""Video: the processor (decode with torchcodec, PyAV fallback; uniform frame sampling, resize, the input
its tower type declares) and the registered tower types, picked by ``tower.type``:

- ``tubelet`` (default): :func:`tubelet_tower` = 3-D tubelet tokens + fixed sin-cos space-time positions + timm
  ViT blocks with joint space-time attention (mean-pooling per-frame features cannot tell left from right;
  joint attention over tubelets can), trained from scratch on per-clip standardised frames;
- ``timm``: a timm image model per frame from a local checkpoint, then a temporal module
  (:class:`~mmcl.modalities.timm_towers.TimmVideoTower`); frames normalised with the model's mean / std;
- ``hf``: a transformers video model (VideoMAE, TimeSformer) from a local directory (:class:`HFVideoTower`);
  frames go through the image processor saved in the same directory.
"""

from __future__ import annotations

import bisect
import io
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import ConfigError, TrunkFields
from mmcl.data.augment import augment_frames
from mmcl.data.context import SampleContext
from mmcl.data.window import Window, sample_duration
from mmcl.modalities.base import Processor, SampleError, Tower, register_processor, register_tower
from mmcl.modalities.layers import PatchTokens, TokenTower, Trunk, patch_grid, tubelet_stem
from mmcl.modalities.pretrained import load_hf_component, load_hf_model, local_path
from mmcl.modalities.timm_towers import TimmVideoTower, TimmVideoTowerConfig, timm_pretrained_cfg


@dataclass
class VideoTowerConfig(TrunkFields):
    type: Literal["tubelet"] = "tubelet"
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
    #: Frames sampled uniformly over the clip (with ``data.clip``: over the sample's window).
    frames: int = 8
    #: Sample the ``frames`` at this fixed rate instead (``1 / fps`` s apart), their span ``frames / fps``
    #: centred in the window (with ``data.clip``, which must be at least that long) or in the clip; None:
    #: spread over it.
    fps: float | None = None
    #: Square output size in pixels (frames are resized, shorter side, then centre-cropped; ``hf`` towers:
    #: the image processor's output size, which it must equal).
    size: int = 48
    #: Decoder: ``auto`` (windows and ``fps`` spans with PyAV, which drops the frames no sampled time needs on
    #: the way from the keyframe; whole-clip spreads with torchcodec: the faster of the two for each, frame for
    #: frame the same; each falls back to the other when it cannot open a clip), ``torchcodec`` (PyAV when it
    #: cannot open a clip) or ``pyav`` alone.
    decoder: str = "auto"
    #: The tower's config: a registered video tower type (``tubelet``, ``timm``, ``hf``), picked by ``type``.
    tower: Any = None

    def validate(self, where: str) -> None:
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ConfigError(f"{where}.fps: must be > 0 (or null: frames spread over the window), got {self.fps}")
        if self.decoder not in ("auto", "torchcodec", "pyav"):
            raise ConfigError(f"{where}.decoder: {self.decoder!r} is not allowed (allowed: 'auto', 'torchcodec', "
                              f"'pyav')")


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


def _clamped(times: list[float], begin: float, end: float) -> list[float]:
    """``times`` inside the stream's ``[begin, end)``: before its first frame -> the first frame, at or after
    its end -> the last one (a source shorter than the window repeats its last frame)."""
    last = max(begin, end - 1e-6)
    return [min(max(t, begin), last) for t in times]


def _covers(pts: torch.Tensor, duration: torch.Tensor, times: list[float]) -> bool:
    """Whether each decoded frame (``pts``, ``duration`` in seconds) is the one played at its requested time."""
    t = torch.tensor(times, dtype=torch.float64)
    pts, duration = pts.double(), duration.double()
    return bool(((pts <= t + 1e-6) & ((t < pts + duration + 1e-6) | (duration <= 0))).all())


def _decode_torchcodec_window(data: bytes, times: list[float]) -> torch.Tensor:
    """The frames played at ``times`` (seconds, ascending) -> ``[T, 3, H, W]`` uint8. Seeks in approximate mode (no
    scan of the file: the header's frame rate places the frames); when a returned frame is not the one played
    at its time (variable frame rate, a header that lies), again in exact mode (one demux scan)."""
    from torchcodec.decoders import VideoDecoder

    for mode in ("approximate", "exact"):
        dec = VideoDecoder(data, dimension_order="NCHW", seek_mode=mode)
        meta = dec.metadata
        begin = meta.begin_stream_seconds or 0.0
        end = meta.end_stream_seconds
        if end is None or end <= begin:
            if mode == "approximate":
                continue
            raise SampleError("bad_video", "no frames")
        clamped = _clamped(times, begin, end)
        try:
            batch = dec.get_frames_played_at(clamped)
        except (IndexError, RuntimeError):
            if mode == "approximate":
                continue
            raise
        if mode == "exact" or _covers(batch.pts_seconds, batch.duration_seconds, clamped):
            return batch.data
    raise AssertionError("unreachable")


def _played(container: Any, stream: Any, times: list[float], start: float) -> list[Any]:
    """Decode ``stream`` from the keyframe before ``start`` and keep the frame played at each of ``times``
    (seconds, ascending): the one of the greatest display time at or before it (the first frame before the
    stream starts, the last after it ends).

    A packet that cannot be any of those is decoded with ``skip_frame NONREF``, so the codec drops it when
    no other frame refers to it (most B-frames): its display time ``p`` is followed by another seen one ``q``
    (packets come in decode order: a B-frame's later reference is already demuxed) with no sampled time in
    ``[p, q)``, and it is not the earliest frame. Frame for frame what a full decode keeps: the frame played at
    a time ``x`` has no display time in ``(p, x]`` after its own, so it never qualifies."""
    codec, base = stream.codec_context, float(stream.time_base or 0)  # float: Fractions cost ms per clip
    if start > 0 and base:
        container.seek(int(start / base), stream=stream)
    t, j, picked, previous = len(times), 0, [None] * len(times), None
    seen: list[float] = []  # display times of the packets demuxed, sorted
    for packet in container.demux(stream):
        unneeded = False
        if packet.pts is not None and base:
            p = packet.pts * base
            k = bisect.bisect_right(seen, p)
            seen.insert(k, p)
            i = bisect.bisect_left(times, p - 1e-6)
            unneeded = k > 0 and k + 1 < len(seen) and (i == t or times[i] >= seen[k + 1] + 1e-6)
        codec.skip_frame = "NONREF" if unneeded else "DEFAULT"
        for frame in codec.decode(packet):
            if frame.time is None:
                continue
            while j < t and times[j] < frame.time:
                picked[j] = previous if previous is not None else frame
                j += 1
            previous = frame
            if j == t:
                return picked
    if previous is None:
        raise SampleError("bad_video", "no frames")
    while j < t:
        picked[j] = previous
        j += 1
    return picked


def _decode_pyav_window(data: bytes, times: list[float], start: float) -> torch.Tensor:
    """PyAV: the frames played at ``times`` (seconds, ascending), decoded from the keyframe before ``start``
    (the sampled span's start) to the last sampled time, the frames no sampled time needs dropped where the
    codec allows (:func:`_played`) -> ``[T, 3, H, W]`` uint8. Frame for frame what torchcodec returns, and
    faster on long groups of pictures: torchcodec cannot drop frames it decodes on the way to a seek target."""
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise SampleError("bad_video", "no video stream")
        picked = _played(container, container.streams.video[0], times, start)
        arrays: dict[int, np.ndarray] = {}
        for f in picked:
            arrays.setdefault(id(f), f.to_ndarray(format="rgb24"))
        frames = np.stack([arrays[id(f)] for f in picked])
    return torch.from_numpy(frames).permute(0, 3, 1, 2)


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


class StandardizedFrames:
    """The input of towers trained from scratch: frames resized to ``size``, standardised per clip and
    channel."""

    resize = True

    def transform(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.float()
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-3)


class NormalizedFrames:
    """The input of a pretrained image model: frames resized to ``size``, scaled to [0, 1] and normalised with
    its per-channel ``mean`` / ``std``."""

    resize = True

    def __init__(self, mean: list[float], std: list[float]):
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def transform(self, frames: torch.Tensor) -> torch.Tensor:
        return (frames.float() / 255.0 - self.mean) / self.std


class HFImageProcessorFrames:
    """The input of a transformers video model: the frames as decoded through the image processor saved in its
    directory, checked against the model's config and the modality's ``frames`` and ``size`` (each mismatch
    one line naming both). Saved with the model's config into ``<modality>_<dir name>/``."""

    resize = False

    def __init__(self, path: Path, frames: int, size: int, where: str):
        from transformers import AutoConfig, AutoImageProcessor

        field_ = f"{where}.tower.path"
        self.path = local_path(path, field_)
        self.processor = load_hf_component(AutoImageProcessor, self.path, field_)
        model_cfg = load_hf_component(AutoConfig, self.path, field_)
        wanted = getattr(model_cfg, "num_frames", frames)
        if wanted != frames:
            raise ConfigError(f"{where}.frames: {frames} does not fit {self.path} (its model takes num_frames "
                              f"{wanted})")
        wide, tall = _processor_output(self.processor, frames, 48, 64), _processor_output(self.processor, frames, 64, 48)
        if wide != tall:
            raise ConfigError(f"{field_}: the image processor of {self.path} makes frames of a size that depends "
                              f"on the clip's ({wide[2:]} vs {tall[2:]}); it needs a centre crop")
        if wide[1:] != (3, size, size):
            raise ConfigError(f"{where}.size: {size} does not fit {self.path} (its image processor makes "
                              f"{wide[1]}x{wide[2]}x{wide[3]} frames: set size: {wide[2]})")
        image_size = getattr(model_cfg, "image_size", size)
        if image_size != size:
            raise ConfigError(f"{where}.size: {size} does not fit {self.path} (its model takes image_size "
                              f"{image_size})")

    def transform(self, frames: torch.Tensor) -> torch.Tensor:
        return self.processor(list(frames), return_tensors="pt")["pixel_values"][0]

    def files(self) -> dict[str, str]:
        """The model's directory: its config and image processor are copied on save (not its weights)."""
        return {"tower.path": str(self.path)}


@register_processor
class Video(Processor):
    kind = "video"
    Config = VideoConfig
    members = ("mp4", "webm", "mkv", "avi", "mov")
    timed = True

    def decode(self, sample: dict, ctx: SampleContext | None = None) -> torch.Tensor:
        """-> ``[T, 3, size, size]`` uint8 (kept small: decoded clips may be cached in RAM); an input that
        resizes itself (an HF image processor): ``[T, 3, H, W]`` as decoded. With ``ctx.window``: the ``T``
        frames played at the window's sampled times (:meth:`Window.times` with ``fps``), only the window
        decoded; else spread over the clip, or with ``fps`` those of the clip's centred span (its duration: the
        ``json`` member's, else the container's; a clip shorter than the span adds ``short_source`` to
        ``ctx.adjusted``)."""
        _, data = self.find_member(sample)
        t, fps = self.cfg.frames, self.cfg.fps
        window = ctx.window if ctx is not None else None
        try:
            if window is None and fps is not None:
                duration = sample_duration(sample, [data])
                window = Window(0.0, duration, duration)
                if duration < t / fps and ctx is not None:  # the span runs past the end: its last frame repeats
                    ctx.adjusted.append("short_source")
            if window is None:
                torchcodec, pyav = partial(_decode_torchcodec, data, t), partial(_decode_pyav, data, t)
            else:
                times = window.times(t, fps)
                torchcodec = partial(_decode_torchcodec_window, data, times)
                pyav = partial(_decode_pyav_window, data, times, window.span(t, fps)[0])
            order = {"torchcodec": (torchcodec, pyav), "pyav": (pyav,),
                     "auto": (torchcodec, pyav) if window is None else (pyav, torchcodec)}[self.cfg.decoder]
            try:
                frames = order[0]()
            except SampleError:
                raise
            except Exception:
                if len(order) == 1:
                    raise
                frames = order[1]()
        except SampleError:
            raise
        except Exception as e:
            raise SampleError("bad_video", f"{type(e).__name__}: {e}") from None
        if frames.shape[1] != 3:
            raise SampleError("bad_video", f"expected 3 channels, got {frames.shape[1]}")
        return resize_center_crop(frames, self.cfg.size) if self.input.resize else frames

    def transform(self, data: torch.Tensor, train: bool, ctx: SampleContext | None = None) -> torch.Tensor:
        """uint8 frames -> ``[T, 3, S, S]`` float32 as the tower type's input makes them; training with
        ``data.augment.video`` first crops / flips / jitters the whole clip alike (:func:`augment_frames`, drawn
        from ``ctx.generator("augment.video")``)."""
        if train and ctx is not None and self.augment is not None:
            data = augment_frames(data, self.augment, ctx.generator("augment.video"))
        return self.input.transform(data)

    def check_window(self, seconds: float, where: str) -> None:
        if self.cfg.fps is not None and self.cfg.frames / self.cfg.fps > seconds + 1e-9:
            raise ConfigError(f"{where}.seconds: {seconds:g} is shorter than {self.where}.frames / fps = "
                              f"{self.cfg.frames} / {self.cfg.fps:g} = {self.cfg.frames / self.cfg.fps:g} s "
                              f"(the sampled frames must fit in the window)")

    def cache_window(self, data: Any, train: bool, ctx: SampleContext | None = None) -> str:
        """No train-time randomness: the sample alone fixes its input."""
        return ""

    def empty(self) -> torch.Tensor:
        return torch.zeros(self.cfg.frames, 3, self.cfg.size, self.cfg.size)


# ----------------------------------------------------------------------------------------------------
# Tower types


def _tubelet_input(video: Video) -> StandardizedFrames:
    cfg, tc = video.cfg, video.cfg.tower
    if cfg.frames % tc.tubelet:
        raise ConfigError(f"{video.where}.frames: {cfg.frames} is not a multiple of tower.tubelet {tc.tubelet}")
    if cfg.size % tc.patch:
        raise ConfigError(f"{video.where}.size: {cfg.size} is not a multiple of tower.patch {tc.patch}")
    return StandardizedFrames()


def tubelet_tokens(video: Video, width: int, init: bool = True) -> PatchTokens:
    """``[N, T, 3, S, S]`` -> ``[N, T/tubelet * (S/patch)^2, width]`` tubelet tokens with sin-cos (t, h, w)
    positions."""
    cfg, tc = video.cfg, video.cfg.tower
    n = patch_grid(cfg.size, tc.patch, "video.size")
    stem = tubelet_stem(width, tc.patch, tc.tubelet, tc.stem, tc.stem_channels, f"{video.where}.tower")
    return PatchTokens(stem, (cfg.frames // tc.tubelet, n, n), width, time_first=True, init=init)


def tubelet_tower(video: Video, pretrained: bool) -> TokenTower:
    """Tubelet tokens + joint space-time attention over all tubelets + mean pooling (mean-pooling per-frame
    features cannot tell left from right; joint attention over tubelets can)."""
    tc = video.cfg.tower
    return TokenTower(tubelet_tokens(video, tc.width, init=False), Trunk.of(tc, tc.drop_path), tc.width,
                      init_vit=True)


def _timm_input(video: Video) -> NormalizedFrames:
    tc = video.cfg.tower
    pretrained = timm_pretrained_cfg(tc.model, f"{video.where}.tower.model")
    return NormalizedFrames(tc.mean or pretrained["mean"], tc.std or pretrained["std"])


def timm_tower(video: Video, pretrained: bool) -> TimmVideoTower:
    tc = video.cfg.tower
    checkpoint = video.resolve(tc.checkpoint) if tc.checkpoint and pretrained else None
    return TimmVideoTower(tc, video.cfg.frames, video.cfg.size, checkpoint, f"{video.where}.tower")


class HFVideoTower(Tower):
    """``[N, T, 3, S, S]`` (the image processor's output) -> ``[N, hidden_size]``: a transformers video model
    (``AutoModel``: VideoMAE, TimeSformer) loaded from a local directory, its last hidden states pooled."""

    def __init__(self, cfg: HFVideoTowerConfig, path: Path, where: str, pretrained: bool = True):
        super().__init__()
        from transformers import AutoModel

        self.model = load_hf_model(AutoModel, path, f"{where}.path", strict=cfg.strict, pretrained=pretrained,
                                   dtype=torch.float32)
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
        if enable:  # transformers' own (its gradient_checkpointing_* names are deprecated)
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.activation_checkpointing_disable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=x).last_hidden_state
        return hidden[:, 0] if self.pooling == "cls" else hidden[:, self.prefix:].mean(dim=1)


register_tower("video", "tubelet", config=VideoTowerConfig, build=tubelet_tower, inputs=_tubelet_input,
               embedder=tubelet_tokens)
register_tower("video", "timm", config=TimmVideoTowerConfig, build=timm_tower, inputs=_timm_input)
register_tower("video", "hf", config=HFVideoTowerConfig,
               build=lambda video, pretrained: HFVideoTower(video.cfg.tower, video.input.path,
                                                            f"{video.where}.tower", pretrained),
               inputs=lambda video: HFImageProcessorFrames(video.resolve(video.cfg.tower.path), video.cfg.frames,
                                                           video.cfg.size, video.where))
