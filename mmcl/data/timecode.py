"""Time-coded media: clips whose content says what moment it shows, to measure how well decoded video and
audio line up (the alignment tests, ``bench/clip_decode.py`` and ``docs/make_window_figure.py`` use it).

- **Video**: every frame shows its own presentation time in centiseconds as a 16-bit code, a 4 x 4 grid of
  black / white cells (bit ``b`` is cell ``b`` in row-major order, white = 1), robust to H.264 and to a
  resize: :func:`read_frame_time` reads it back.
- **Audio**: a sine tone whose frequency steps every :data:`STEP` seconds (``BASE_HZ + STEP_HZ * k`` in step
  ``k``), phase-continuous, so :func:`tone` gives the exact waveform at any time and a decoded span can be
  placed on the timeline by cross-correlation (:func:`audio_lag`).

:func:`encode_timecoded` writes an mp4 (H.264 + AAC) in memory: constant or variable frame rate, and the
audio track may start later than the video (an edit list, as real files have).
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
import torch

#: Seconds between the tone's frequency steps.
STEP = 0.25
BASE_HZ = 300.0
STEP_HZ = 25.0
#: Cells per side of the frame code (``GRID * GRID`` bits).
GRID = 4


def frame_times(seconds: float, fps: float, variable: bool = False, seed: int = 0) -> np.ndarray:
    """Presentation times (s) of the frames of a ``seconds``-long clip: every ``1 / fps`` s, or (``variable``)
    gaps drawn uniformly in ``[0.5, 1.5] / fps``, on a millisecond grid."""
    if not variable:
        return np.round(np.arange(0.0, seconds, 1.0 / fps), 3)
    rng = np.random.default_rng(seed)
    gaps = rng.uniform(0.5, 1.5, int(seconds * fps * 2) + 2) / fps
    times = np.round(np.concatenate([[0.0], np.cumsum(gaps)]), 3)
    return times[times < seconds]


def code_frame(t: float, size: int = 64) -> np.ndarray:
    """The frame shown at ``t`` seconds: ``[size, size, 3]`` uint8, ``round(100 t)`` as :data:`GRID` x GRID bits."""
    value = int(round(t * 100))
    bits = np.array([(value >> b) & 1 for b in range(GRID * GRID)], dtype=np.uint8).reshape(GRID, GRID)
    cell = size // GRID
    img = np.kron(bits * 255, np.ones((cell, cell), dtype=np.uint8))
    return np.repeat(img[:, :, None], 3, axis=2)


def read_frame_time(frame: torch.Tensor) -> float:
    """``[3, H, W]`` (uint8 or float in [0, 255]) frame made by :func:`code_frame` -> its time in seconds (the
    centre half of each cell is read)."""
    gray = frame.float().mean(dim=0)
    h, w = gray.shape
    value = 0
    for b in range(GRID * GRID):
        r, c = divmod(b, GRID)
        y0, y1 = int((r + 0.25) * h / GRID), int((r + 0.75) * h / GRID)
        x0, x1 = int((c + 0.25) * w / GRID), int((c + 0.75) * w / GRID)
        if gray[y0:y1, x0:x1].mean() > 127.5:
            value |= 1 << b
    return value / 100.0


def tone(t: np.ndarray) -> np.ndarray:
    """The time-coded tone at times ``t`` (s, >= 0): amplitude 0.5, frequency ``BASE_HZ + STEP_HZ * k`` in
    step ``k = floor(t / STEP)``, phase-continuous."""
    t = np.asarray(t, dtype=np.float64)
    k = np.floor(t / STEP)
    # phase at the start of step k: 2 pi STEP sum_{j<k} (BASE + STEP_HZ j)
    start_phase = STEP * (BASE_HZ * k + STEP_HZ * k * (k - 1) / 2)
    phase = start_phase + (BASE_HZ + STEP_HZ * k) * (t - k * STEP)
    return 0.5 * np.sin(2 * np.pi * phase)


def encode_timecoded(seconds: float, fps: float = 10.0, *, size: int = 64, variable: bool = False,
                     audio_start: float = 0.0, sample_rate: int = 48000, gop: int = 10, bframes: int = 0) -> bytes:
    """An mp4 of ``seconds`` s: H.264 frames made by :func:`code_frame` at :func:`frame_times`, and an AAC
    track of :func:`tone` from ``audio_start`` s to the end (it starts ``audio_start`` s after the video,
    the audio's own samples counted from there; the tone still follows the shared timeline). Keyframe every
    ``gop`` frames; up to ``bframes`` B-frames between references (libx264's pyramid: some of them referenced,
    the others not)."""
    buffer = io.BytesIO()
    times = frame_times(seconds, fps, variable)
    with av.open(buffer, mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=int(round(fps)))
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        video.time_base = Fraction(1, 1000)
        video.codec_context.time_base = Fraction(1, 1000)
        video.codec_context.options = {"crf": "18", "preset": "veryfast", "g": str(gop), "bf": str(bframes)}
        video.codec_context.thread_count = 1
        audio = container.add_stream("aac", rate=sample_rate)
        audio.layout = "mono"
        n_audio = int(round((seconds - audio_start) * sample_rate))
        wav = tone(audio_start + np.arange(n_audio) / sample_rate).astype(np.float32)
        chunk = 1024
        a_pos, a_first = 0, int(round(audio_start * sample_rate))
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(code_frame(float(t), size), format="rgb24")
            frame.pts = int(round(t * 1000))
            frame.time_base = Fraction(1, 1000)
            container.mux(video.encode(frame))
            # interleave: audio up to this frame's time
            while a_pos < n_audio and (a_first + a_pos) / sample_rate <= t:
                a_pos = _mux_audio(container, audio, wav, a_pos, a_first, chunk, sample_rate)
        container.mux(video.encode(None))
        while a_pos < n_audio:
            a_pos = _mux_audio(container, audio, wav, a_pos, a_first, chunk, sample_rate)
        container.mux(audio.encode(None))
    return buffer.getvalue()


def _mux_audio(container: av.container.OutputContainer, stream: av.audio.stream.AudioStream, wav: np.ndarray,
               pos: int, first: int, chunk: int, sample_rate: int) -> int:
    part = wav[pos:pos + chunk]
    frame = av.AudioFrame.from_ndarray(part[None], format="flt", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = first + pos
    frame.time_base = Fraction(1, sample_rate)
    container.mux(stream.encode(frame))
    return pos + len(part)


def audio_lag(decoded: np.ndarray, start: float, sample_rate: int, search: float = 0.3) -> float:
    """Where a decoded span ``decoded`` (``[S]`` at ``sample_rate``, meant to start at ``start`` s) really starts,
    minus ``start``: the lag in seconds (within ``+- search``) that best matches it to :func:`tone`
    (cross-correlation over its non-silent part). Positive: the decoded samples are of later moments than
    asked."""
    x = np.asarray(decoded, dtype=np.float64)
    live = np.abs(x) > 1e-3
    if live.sum() < sample_rate * 0.1:
        raise ValueError("too little audio to place")
    lo, hi = np.argmax(live), len(live) - np.argmax(live[::-1])
    x = x[lo:hi]
    span_start = start + lo / sample_rate
    lags = np.arange(-int(search * sample_rate), int(search * sample_rate) + 1)
    t_ref = span_start - search + np.arange(len(x) + 2 * int(search * sample_rate) + 1) / sample_rate
    ref = tone(np.clip(t_ref, 0.0, None))
    # correlation at lag L: sum_n x[n] ref[n + L + S] (the "valid" part of a cross-correlation, by FFT)
    size = 1 << int(np.ceil(np.log2(len(ref) + len(x))))
    full = np.fft.irfft(np.fft.rfft(ref, size) * np.conj(np.fft.rfft(x, size)), size)
    corr = full[: len(ref) - len(x) + 1]
    best = int(np.argmax(corr))
    return float(lags[best]) / sample_rate
