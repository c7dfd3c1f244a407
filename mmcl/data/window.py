"""One time window per sample, shared by every time-based modality (``data.clip``).

A sample's window ``[start, start + seconds)`` is drawn once, from the sample's duration (its ``json``
``duration``, as ``mmcl shards build`` writes it; probed from the media when absent), and handed to video and
audio alike through :class:`~mmcl.data.context.SampleContext` ``.window``: the frames are sampled inside it and
the audio is exactly that span, both placed by presentation time. Training draws the start uniformly from
``ctx.generator("window")``, a function of ``(seed, epoch, key)`` alone, so ranks, resumed runs and re-runs
draw the same windows; evaluation takes the centred window, or with ``eval_clips: K`` the ``K`` evenly spaced
ones (view ``k`` centred on ``(k + 0.5) / K`` of the duration) whose embeddings the eval suite averages.

Times are seconds on the member's own presentation timeline (0 = the start of the file). A source shorter
than the window gets ``start = 0`` and is padded (audio: silence; video: its last frame repeats); such a
window is ``short`` and counted as ``short_source`` in the loader's adjust report.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mmcl.data.context import SampleContext
from mmcl.errors import ConfigError


@dataclass
class WindowConfig:
    """``data.clip``: the time window each sample's video and audio share."""

    #: Length of the window in seconds (an audio modality's ``seconds`` must equal it).
    seconds: float = 2.0
    #: Training windows: drawn uniformly over the clip per (seed, epoch, key), or always the centred one.
    train: Literal["random", "center"] = "random"
    #: Evaluation windows: centred (``eval_clips`` > 1: evenly spaced).
    eval: Literal["center"] = "center"
    #: Windows per sample at evaluation; their embeddings are averaged (then L2-normalised again).
    eval_clips: int = 1

    def validate(self, where: str) -> None:
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise ConfigError(f"{where}.seconds: must be > 0, got {self.seconds}")
        if self.eval_clips < 1:
            raise ConfigError(f"{where}.eval_clips: must be >= 1, got {self.eval_clips}")


@dataclass(frozen=True)
class Window:
    """``[start, start + seconds)`` of a source of ``duration`` seconds (``duration < seconds``: padded)."""

    start: float
    seconds: float
    duration: float

    @property
    def end(self) -> float:
        return self.start + self.seconds

    @property
    def short(self) -> bool:
        return self.duration < self.seconds

    def span(self, n: int, fps: float | None = None) -> tuple[float, float]:
        """``(start, period)`` of the ``n`` sampling times :meth:`times` places: the window's own, or with
        ``fps`` the span ``n / fps`` centred in the window (a span longer than the window starts at its start)."""
        if fps is None:
            return self.start, self.seconds / n
        return self.start + max(0.0, (self.seconds - n / fps) / 2), 1.0 / fps

    def times(self, n: int, fps: float | None = None) -> list[float]:
        """``n`` sampling times inside the window: spread uniformly (centres of ``n`` equal segments), or with
        ``fps`` at a fixed rate, ``1 / fps`` apart, their span ``n / fps`` centred in the window (dense
        sampling, as SlowFast / VideoMAE recipes do). ``fps = n / seconds`` is the uniform spread."""
        if fps is None:
            return [self.start + (i + 0.5) * self.seconds / n for i in range(n)]
        start, period = self.span(n, fps)
        return [start + (i + 0.5) * period for i in range(n)]


def draw_window(cfg: WindowConfig, duration: float, ctx: SampleContext, view: int = 0) -> Window:
    """The window of the sample ``ctx`` names: random (``ctx.train`` with ``train: random``, from
    ``ctx.generator("window")``), else centred, or view ``view`` of ``eval_clips`` evenly spaced ones at
    evaluation. Starts are rounded to the microsecond."""
    room = max(0.0, duration - cfg.seconds)
    if ctx.train and cfg.train == "random":
        start = float(torch.rand((), generator=ctx.generator("window"), dtype=torch.float64)) * room
    elif ctx.train:
        start = room / 2
    else:
        k = cfg.eval_clips
        if not 0 <= view < k:
            raise ValueError(f"view {view} of {k} eval clips")
        start = min(max(0.0, (view + 0.5) * duration / k - cfg.seconds / 2), room)
    return Window(round(start, 6), cfg.seconds, duration)


def probe_duration(data: bytes) -> float:
    """Duration in seconds of a media file's bytes from its container header (PyAV): the end of its last
    stream, counted from 0. ``SampleError("bad_duration")`` when the header has none."""
    import av

    from mmcl.modalities.base import SampleError  # here: mmcl.config imports this module

    try:
        with av.open(io.BytesIO(data)) as container:
            if container.duration:
                start = max(0, container.start_time or 0)
                return (start + container.duration) / av.time_base
            ends = [float((s.start_time or 0) + s.duration) * float(s.time_base)
                    for s in container.streams if s.duration and s.time_base]
    except Exception as e:  # an unreadable file: the decoders then say what is wrong
        raise SampleError("bad_duration", f"{type(e).__name__}: {e}") from None
    if not ends:
        raise SampleError("bad_duration", "no duration in the container header")
    return max(ends)


def sample_duration(raw: dict[str, Any], members: list[bytes]) -> float:
    """The duration of a sample: its ``json`` ``duration`` (a number > 0) when it has one, else the probe of
    the first of ``members`` (the time-based modalities' media)."""
    from mmcl.modalities.base import SampleError

    if raw.get("json") is not None:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError):
            meta = None
        value = meta.get("duration") if isinstance(meta, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value):
            return float(value)
    if not members:
        raise SampleError("bad_duration", "no media to probe")
    return probe_duration(members[0])
