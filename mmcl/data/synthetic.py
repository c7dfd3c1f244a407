"""A procedural audio-visual-text world: the data ``mmcl demo`` and the tests train on, no download needed.

Every sample is generated from one integer seed (``numpy.random.default_rng(seed)``), so a dataset is
fully determined by ``(seed, split, n, world)``: the per-sample seeds of a split are drawn from
``numpy.random.SeedSequence(seed, spawn_key=<bytes of the split name>)``, so train and test (and any
other split name) use independent seed streams.

A clip is 16 RGB frames of 64 x 64 at 8 fps (2 s) over a noisy mid-grey background (per-pixel
uniform luminance noise, std 9 grey levels, on a smooth low-frequency shading), and 2 s of 16 kHz mono
audio: a harmonic tone whose amplitude pulses at a regular rate, plus a little noise. Shapes are
anti-aliased silhouettes (``circle``, ``square``, ``triangle`` pointing up, ``cross`` shaped like a plus
sign) in one of six saturated hues.

**simple** world (all attributes independent and uniform over :data:`ATTRIBUTES`):
  one shape (18-24 px) of one colour moves steadily ``up`` / ``down`` / ``left`` / ``right``, 28-36 px
  over the clip (at least 24 px when the shape is large). The tone's fundamental is ``low`` / ``medium``
  / ``high`` (:data:`PITCH_HZ`, +-3 %), its harmonic recipe is the timbre (:data:`TIMBRE_HARMONICS`;
  the fundamental is always the strongest partial), and its pulse rate follows the motion direction
  (:data:`PULSE_RATE`): the latent that video and audio share. The caption names colour, shape,
  direction, pitch and timbre in one of 10 sentence shapes with synonyms for verbs and nouns.
  ``labels = {"colour", "shape", "direction", "pitch", "timbre"}``, each an attribute name.

**joint** world (the caption depends on video and audio together, as in Symile's M3 set):
  two objects with different colours and different shapes (12-15 px), object 0 in the left half of
  the frame and object 1 in the right half, each moving in its own direction (uniform, independent).
  The pitch is ``low`` or ``high``: ``low`` names object 0 (left), ``high`` names object 1 (right).
  The caption names only the named object's colour, shape and direction, never the pitch. Timbre and
  pulse rate are random nuisances independent of everything else, so audio alone says nothing about the
  caption, video alone leaves two candidates, and only video + audio determine it.
  ``labels = {"colour", "shape", "direction"`` (of the named object), ``"pitch"``, ``"timbre"``,
  ``"named": 0 | 1``, ``"objects": [{"colour", "shape", "direction"}, {...}]}`` (left, right).

**xor** world (Symile's XOR set: three vector modalities, no media):
  bits ``a``, ``b`` uniform and independent; ``c = a XOR b`` with probability ``xor_p`` (default 1),
  else ``c = a``. Each bit is a float32 vector of :data:`XOR_DIM` entries, ``(2 bit - 1) + noise`` (each
  entry, Gaussian noise of std :data:`XOR_NOISE`). With ``xor_p = 1`` every pair of modalities is
  independent, so only a higher-order objective can learn the relation; ``xor_p < 1`` leaks ``c = a``.
  ``labels = {"a", "b", "c": 0 | 1}``.

:func:`synth` writes WebDataset shards ``{split}-{000000}.tar`` with members ``mp4`` (H.264 yuv420p,
video only), ``flac`` (16 kHz mono, 16 bit), ``txt`` (caption) and ``json`` (labels and metadata), plus
``sizes.json``, ``world.json`` and ``tokenizer.model`` (sentencepiece trained on the train captions;
ids: ``<pad>`` = :data:`PAD_ID` = 0, ``<unk>`` = :data:`UNK_ID` = 1, no bos / eos). The xor world's
members are ``a.npy``, ``b.npy``, ``c.npy`` (``numpy.save`` of float32 ``[XOR_DIM]``) and ``json``; it has
no captions and no tokenizer. Output files are byte-identical for the same arguments, whatever the
number of ``workers``.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import sentencepiece as spm
import soundfile as sf
import webdataset as wds

ATTRIBUTES: dict[str, list[str]] = {
    "colour": ["red", "green", "blue", "yellow", "magenta", "cyan"],
    "shape": ["circle", "square", "triangle", "cross"],
    "direction": ["up", "down", "left", "right"],
    "pitch": ["low", "medium", "high"],
    "timbre": ["flute", "clarinet", "violin", "organ"],
}
WORLDS: tuple[str, ...] = ("simple", "joint", "xor")
#: Pitch classes of the joint world: ``low`` names object 0 (left), ``high`` object 1 (right).
JOINT_PITCHES: tuple[str, ...] = ("low", "high")

FPS = 8
N_FRAMES = 16
SIZE = 64
SAMPLE_RATE = 16000
AUDIO_SECONDS = 2.0
N_SAMPLES = int(SAMPLE_RATE * AUDIO_SECONDS)

#: Nominal RGB of each colour (a little per-sample jitter is added).
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (235, 25, 25),
    "green": (25, 210, 25),
    "blue": (30, 50, 245),
    "yellow": (240, 230, 20),
    "magenta": (230, 25, 230),
    "cyan": (20, 220, 235),
}
#: Nominal fundamental frequency (Hz) of each pitch class (+-3 % per-sample jitter).
PITCH_HZ: dict[str, float] = {"low": 220.0, "medium": 440.0, "high": 880.0}
#: Relative amplitude of harmonics 1, 2, 3, ... of each timbre (the fundamental is the largest).
TIMBRE_HARMONICS: dict[str, tuple[float, ...]] = {
    "flute": (1.0, 0.1),
    "clarinet": (1.0, 0.0, 0.33, 0.0, 0.2, 0.0, 0.14),
    "violin": (1.0, 0.5, 0.33, 0.25, 0.2, 0.17, 0.14, 0.12),
    "organ": (1.0, 0.6, 0.55, 0.5),
}
#: Amplitude pulses per second for each motion direction (simple world: shared video-audio latent).
PULSE_RATE: dict[str, float] = {"up": 1.5, "down": 2.5, "left": 3.5, "right": 4.5}

#: xor world: entries of each bit's vector and the std of the Gaussian noise added to each entry.
XOR_DIM = 8
XOR_NOISE = 1.0
#: xor world: its vector modalities (tar members ``<name>.npy``).
XOR_MODALITIES: tuple[str, ...] = ("a", "b", "c")

#: Ids of the special pieces of the tokenizer that :func:`train_tokenizer` writes.
PAD_ID = 0
UNK_ID = 1

_SHARD_DIGITS = 6
_HIGHEST_PARTIAL_HZ = 7000.0
# asm=0: x264's C code only. Its AVX-512 macroblock-tree step (mbtree_propagate_list_internal_avx512) adds
# 8 macroblocks per iteration into the reference costs with no mask for the lanes past the row, so at widths
# that are not a multiple of 128 px (8 macroblocks; ours is 64) it folds in whatever memory follows the row, and
# the same frames gave different bytes from call to call. Its other SIMD paths are deterministic but not
# bit-exact with each other (SSE4.2 and up choose differently from C), so the bytes would also follow the CPU.
# The C path has no run-time CPU dispatch: the same frames give the same bytes on every x86-64 CPU.
_X264_OPTIONS = {"crf": "20", "preset": "veryfast", "x264-params": "asm=0"}

_GRID_Y, _GRID_X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_TIME = np.arange(N_SAMPLES, dtype=np.float32) / np.float32(SAMPLE_RATE)
_FADE = np.minimum(1.0, np.minimum(_TIME, _TIME[::-1]) / 0.01).astype(np.float32)  # 10 ms fade in / out

# ----------------------------------------------------------------------------------------------------
# Video


def _circle(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    return np.sqrt(dx * dx + dy * dy) - r


def _square(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r


def _triangle(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Equilateral, apex up, circumradius ``1.2 r``: the largest of the three edges' distances."""
    inradius, c = 0.6 * r, np.sqrt(3.0) / 2
    return np.maximum(np.maximum(dy - inradius, -c * dx - 0.5 * dy - inradius), c * dx - 0.5 * dy - inradius)


def _cross(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """A plus sign: two bars of half-length ``r`` and half-width ``0.33 r``."""
    ax, ay, w = np.abs(dx), np.abs(dy), 0.33 * r
    return np.minimum(np.maximum(ax - r, ay - w), np.maximum(ax - w, ay - r))


#: Signed distance (px, negative inside) of each shape with half-size ``r``, from the offsets ``dx``, ``dy``
#: of pixels to the shape's centre (y grows downwards; any shapes that broadcast, e.g. [T, 1, W] and [T, H, 1]).
_SIGNED_DISTANCE: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
}


def _half_extent(r: float) -> tuple[float, float]:
    """Largest horizontal and vertical reach (px) from the centre of any shape with half-size ``r``."""
    return 1.05 * r + 0.5, 1.2 * r + 0.5


def _trajectory(
    rng: np.random.Generator, direction: str, r: float, x_range: tuple[float, float], travel: float
) -> tuple[np.ndarray, np.ndarray]:
    """Centre positions ``([T], [T])`` of a shape moving steadily in ``direction`` inside the box.

    ``x_range`` bounds the columns the shape may cover (rows span the whole frame). ``travel`` is the
    wanted distance, shortened to what fits.
    """
    ex, ey = _half_extent(r)
    lo_x, hi_x = x_range[0] + ex, x_range[1] - 1 - ex
    lo_y, hi_y = ey, SIZE - 1 - ey
    horizontal = direction in ("left", "right")
    lo, hi = (lo_x, hi_x) if horizontal else (lo_y, hi_y)
    p_lo, p_hi = (lo_y, hi_y) if horizontal else (lo_x, hi_x)
    travel = min(travel, hi - lo)
    start = lo + rng.uniform() * (hi - lo - travel)
    along = start + travel * np.linspace(0.0, 1.0, N_FRAMES)
    if direction in ("left", "up"):
        along = along[::-1]
    across = np.full(N_FRAMES, rng.uniform(p_lo, p_hi))
    return (along, across) if horizontal else (across, along)


def _background(rng: np.random.Generator) -> np.ndarray:
    """Static mid-grey ``[H, W, 1]`` float32 background with a smooth low-frequency shading."""
    level = rng.uniform(110.0, 145.0)
    shade = np.zeros((SIZE, SIZE), np.float32)
    for _ in range(2):
        angle, wavelength, phase = rng.uniform(0, np.pi), rng.uniform(48.0, 128.0), rng.uniform(0, 2 * np.pi)
        along = _GRID_X * np.cos(angle) + _GRID_Y * np.sin(angle)
        shade += 9.0 * np.sin(2 * np.pi * along / wavelength + phase)
    return (level + shade)[..., None]


def _render(rng: np.random.Generator, objects: list[dict[str, Any]]) -> np.ndarray:
    """Draw moving ``objects`` over a noisy background -> uint8 ``[T, H, W, 3]``.

    Each object: ``{"shape", "colour", "r", "x": [T], "y": [T]}`` (centre positions in px). Only a
    square crop that follows the object (``[T, crop, crop]``) is rasterised.
    """
    frames = np.broadcast_to(_background(rng), (N_FRAMES, SIZE, SIZE, 3)).copy()
    frame_index = np.arange(N_FRAMES)[:, None, None]
    for obj in objects:
        crop = min(SIZE, int(np.ceil(2.5 * obj["r"])) + 3)  # covers the reach of every shape (see _half_extent)
        offsets = np.arange(crop)
        x0 = np.clip(np.floor(obj["x"] - crop / 2).astype(int) + 1, 0, SIZE - crop)  # [T]
        y0 = np.clip(np.floor(obj["y"] - crop / 2).astype(int) + 1, 0, SIZE - crop)
        cols = x0[:, None, None] + offsets[None, None, :]  # [T, 1, crop]
        rows = y0[:, None, None] + offsets[None, :, None]  # [T, crop, 1]
        dx = (cols - obj["x"][:, None, None]).astype(np.float32)
        dy = (rows - obj["y"][:, None, None]).astype(np.float32)
        alpha = np.clip(0.5 - _SIGNED_DISTANCE[obj["shape"]](dx, dy, obj["r"]), 0.0, 1.0)[..., None]
        rgb = np.asarray(COLOUR_RGB[obj["colour"]], np.float32) + rng.uniform(-12.0, 12.0, 3).astype(np.float32)
        patch = frames[frame_index, rows, cols]  # [T, crop, crop, 3]
        frames[frame_index, rows, cols] = patch + alpha * (rgb - patch)
    noise = rng.random((N_FRAMES, SIZE, SIZE, 1), dtype=np.float32) - np.float32(0.5)
    frames += noise * np.float32(31.0)  # uniform luminance noise, std 9 grey levels
    return np.clip(frames + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Audio


def _tone(rng: np.random.Generator, pitch: str, timbre: str, pulse_rate: float) -> np.ndarray:
    """A pulsing harmonic tone -> float32 ``[N_SAMPLES]``, peak in [0.6, 0.9]."""
    f0 = PITCH_HZ[pitch] * rng.uniform(0.97, 1.03)
    theta = np.float32(2 * np.pi) * ((np.float32(f0) * _TIME) % np.float32(1.0))  # phase of the fundamental
    tone = np.zeros(N_SAMPLES, np.float32)
    for n, amplitude in enumerate(TIMBRE_HARMONICS[timbre], start=1):
        if amplitude > 0 and n * f0 < _HIGHEST_PARTIAL_HZ:
            tone += np.float32(amplitude) * np.sin(n * theta + np.float32(rng.uniform(0, 2 * np.pi)))
    pulse = 0.5 - 0.5 * np.cos(np.float32(2 * np.pi * pulse_rate) * _TIME + np.float32(rng.uniform(0, 2 * np.pi)))
    audio = tone * ((0.15 + 0.85 * pulse * pulse) * _FADE)
    audio += rng.standard_normal(N_SAMPLES, dtype=np.float32) * np.float32(0.02)
    return audio * np.float32(rng.uniform(0.6, 0.9) / np.abs(audio).max())


# ----------------------------------------------------------------------------------------------------
# Captions

_DIRECTION_PHRASES = {
    "up": ("up", "upward", "upwards"),
    "down": ("down", "downward", "downwards"),
    "left": ("left", "to the left", "leftward"),
    "right": ("right", "to the right", "rightward"),
}
_VERBS = ("moves", "slides", "travels", "drifts", "glides", "goes")
_GERUNDS = ("moving", "sliding", "travelling", "drifting", "gliding", "heading")
_SOUNDS = ("note", "tone", "sound")
_SIMPLE_TEMPLATES = (
    "a {colour} {shape} {verb} {dir} while a {pitch} {timbre} {sound} plays",
    "a {pitch} {timbre} {sound} is heard as a {colour} {shape} {verb} {dir}",
    "the {colour} {shape} {verb} {dir}, accompanied by a {pitch} {timbre} {sound}",
    "a {colour} {shape} {ing} {dir} with a {pitch} {timbre} in the background",
    "video of a {colour} {shape} {ing} {dir}; audio of a {pitch} {timbre} {sound}",
    "a {timbre} plays a {pitch} {sound} while the {colour} {shape} {verb} {dir}",
    "we see a {colour} {shape} {ing} {dir} and hear a {pitch} {timbre}",
    "a {colour} {shape} {verb} {dir} to the sound of a {pitch} {timbre}",
    "a {pitch} {sound} from a {timbre} while a {colour} {shape} {verb} {dir}",
    "there is a {colour} {shape} {ing} {dir} and a {pitch} {timbre} {sound}",
)
_JOINT_TEMPLATES = (
    "a {colour} {shape} {verb} {dir}",
    "the {colour} {shape} is {ing} {dir}",
    "a {colour} {shape} {ing} {dir}",
    "look at the {colour} {shape}: it {verb} {dir}",
    "the one that {verb} {dir} is a {colour} {shape}",
    "video of a {colour} {shape} {ing} {dir}",
    "there is a {colour} {shape} {ing} {dir}",
    "the {colour} {shape} {verb} {dir} across the frame",
)
_ARTICLE_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")


def _caption_alphabet() -> str:
    """Every character a caption of either world can contain."""
    texts = [re.sub(r"\{\w+\}", "", t) for t in _SIMPLE_TEMPLATES + _JOINT_TEMPLATES]
    texts += [*_VERBS, *_GERUNDS, *_SOUNDS, "an"]
    texts += [phrase for phrases in _DIRECTION_PHRASES.values() for phrase in phrases]
    texts += [name for names in ATTRIBUTES.values() for name in names]
    return "".join(sorted(set("".join(texts)) - {" "}))


#: The tokenizer always covers these characters, so no caption of this world maps to ``<unk>``.
CAPTION_ALPHABET = _caption_alphabet()


def _caption(rng: np.random.Generator, templates: tuple[str, ...], labels: dict[str, Any]) -> str:
    """Fill a randomly chosen template with the labels' names and random synonyms."""
    template = templates[rng.integers(len(templates))]
    words = {
        "colour": labels["colour"],
        "shape": labels["shape"],
        "dir": _DIRECTION_PHRASES[labels["direction"]][rng.integers(3)],
        "verb": _VERBS[rng.integers(len(_VERBS))],
        "ing": _GERUNDS[rng.integers(len(_GERUNDS))],
        "sound": _SOUNDS[rng.integers(len(_SOUNDS))],
        "pitch": labels.get("pitch", ""),
        "timbre": labels.get("timbre", ""),
    }
    return _ARTICLE_BEFORE_VOWEL.sub("an ", template.format(**words))


# ----------------------------------------------------------------------------------------------------
# Samples


@dataclass(frozen=True)
class WorldParams:
    """Settings of a world beyond its seed (each world reads the ones it has)."""

    #: xor world: probability that ``c = a XOR b`` (else ``c = a``), in [0, 1].
    xor_p: float = 1.0


def _choice(rng: np.random.Generator, names: list[str] | tuple[str, ...]) -> str:
    return names[rng.integers(len(names))]


def _simple_sample(rng: np.random.Generator, params: WorldParams) -> dict[str, Any]:
    labels = {attr: _choice(rng, names) for attr, names in ATTRIBUTES.items()}
    r = rng.uniform(18.0, 24.0) / 2
    x, y = _trajectory(rng, labels["direction"], r, (0.0, float(SIZE)), rng.uniform(28.0, 36.0))
    frames = _render(rng, [{"shape": labels["shape"], "colour": labels["colour"], "r": r, "x": x, "y": y}])
    audio = _tone(rng, labels["pitch"], labels["timbre"], PULSE_RATE[labels["direction"]])
    return {"frames": frames, "audio": audio, "caption": _caption(rng, _SIMPLE_TEMPLATES, labels), "labels": labels}


def _joint_sample(rng: np.random.Generator, params: WorldParams) -> dict[str, Any]:
    colours = rng.choice(len(ATTRIBUTES["colour"]), 2, replace=False)
    shapes = rng.choice(len(ATTRIBUTES["shape"]), 2, replace=False)
    objects = [
        {
            "colour": ATTRIBUTES["colour"][colours[k]],
            "shape": ATTRIBUTES["shape"][shapes[k]],
            "direction": _choice(rng, ATTRIBUTES["direction"]),
        }
        for k in range(2)
    ]
    drawn = []
    half = SIZE / 2
    for k, obj in enumerate(objects):
        r = rng.uniform(12.0, 15.0) / 2
        x, y = _trajectory(rng, obj["direction"], r, (k * half, (k + 1) * half), rng.uniform(24.0, 32.0))
        drawn.append({"shape": obj["shape"], "colour": obj["colour"], "r": r, "x": x, "y": y})
    frames = _render(rng, drawn)
    pitch = _choice(rng, JOINT_PITCHES)
    named = JOINT_PITCHES.index(pitch)
    timbre = _choice(rng, ATTRIBUTES["timbre"])
    audio = _tone(rng, pitch, timbre, PULSE_RATE[_choice(rng, ATTRIBUTES["direction"])])
    labels = {**objects[named], "pitch": pitch, "timbre": timbre, "named": named, "objects": objects}
    caption = _caption(rng, _JOINT_TEMPLATES, objects[named])
    return {"frames": frames, "audio": audio, "caption": caption, "labels": labels}


def _xor_sample(rng: np.random.Generator, params: WorldParams) -> dict[str, Any]:
    a, b = (int(bit) for bit in rng.integers(0, 2, 2))
    c = a ^ b if rng.uniform() < params.xor_p else a
    bits = {"a": a, "b": b, "c": c}
    vectors = {m: (np.float32(2 * bits[m] - 1) + np.float32(XOR_NOISE) * rng.standard_normal(XOR_DIM, np.float32))
               for m in XOR_MODALITIES}
    return {"vectors": vectors, "labels": bits}


_WORLD_MAKERS: dict[str, Callable[[np.random.Generator, WorldParams], dict[str, Any]]] = {
    "simple": _simple_sample,
    "joint": _joint_sample,
    "xor": _xor_sample,
}


def _check_world(world: str, params: WorldParams) -> None:
    if world not in _WORLD_MAKERS:
        raise ValueError(f"unknown world {world!r} (known: {', '.join(WORLDS)})")
    if not 0.0 <= params.xor_p <= 1.0:
        raise ValueError(f"xor_p must be in [0, 1], got {params.xor_p}")


def _check_split_args(world: str, counts: dict[str, int], per_shard: int, params: WorldParams) -> None:
    """Reject an unknown world, bad world parameters or a split with no sample before anything is written."""
    _check_world(world, params)
    for name, value in {**counts, "per_shard": per_shard}.items():
        if value < 1:
            raise ValueError(f"need {name} >= 1, got {value}")


def generate_sample(seed: int, world: str = "simple", xor_p: float = 1.0) -> dict[str, Any]:
    """Generate one sample of ``world`` from ``seed`` (>= 0; deterministic).

    Returns, for the simple and joint worlds, ``{"frames": uint8 [N_FRAMES, SIZE, SIZE, 3] (16, 64, 64, 3),
    "audio": float32 [N_SAMPLES] (32000), "caption": str, "labels": dict}``; for the xor world (``xor_p``:
    probability that ``c = a XOR b``) ``{"vectors": {"a", "b", "c": float32 [XOR_DIM]}, "labels": dict}``
    (labels as described in the module docstring).
    """
    params = WorldParams(xor_p=xor_p)
    _check_world(world, params)
    return _WORLD_MAKERS[world](np.random.default_rng(seed), params)


# ----------------------------------------------------------------------------------------------------
# Encoding


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """Encode uint8 RGB frames ``[T, H, W, 3]`` (H, W even) as H.264 yuv420p in an mp4, in memory.

    Single-threaded libx264 (``crf 20``, ``preset veryfast``) without its SIMD code: the same frames give the
    same bytes, in any process and on any x86-64 CPU.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.options = dict(_X264_OPTIONS)
        stream.codec_context.thread_count = 1
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    """Encode float audio ``[T]`` (mono) or ``[T, C]`` in [-1, 1] as 16-bit FLAC, in memory."""
    buffer = io.BytesIO()
    sf.write(buffer, audio, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """``numpy.save`` of ``array`` (no pickle), in memory."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _encoded_sample(job: tuple[str, int, str, WorldParams]) -> tuple[dict[str, Any], str | None]:
    """``(key, sample seed, world, params)`` -> (the sample's tar members as bytes, its caption or None)."""
    key, seed, world, params = job
    sample = generate_sample(seed, world, xor_p=params.xor_p)
    provenance = {"world": world, "source": "mmcl.synthetic", "license": "CC0-1.0"}
    if "vectors" in sample:
        meta = {"labels": sample["labels"], "xor_p": params.xor_p, **provenance}
        members = {"__key__": key, **{f"{m}.npy": encode_npy(v) for m, v in sample["vectors"].items()},
                   "json": json.dumps(meta).encode("utf-8")}
        return members, None
    meta = {"labels": sample["labels"], "duration": AUDIO_SECONDS, "fps": FPS, "sample_rate": SAMPLE_RATE,
            **provenance}
    members = {
        "__key__": key,
        "mp4": encode_mp4(sample["frames"], FPS),
        "flac": encode_flac(sample["audio"], SAMPLE_RATE),
        "txt": sample["caption"].encode("utf-8"),
        "json": json.dumps(meta).encode("utf-8"),
    }
    return members, sample["caption"]


# ----------------------------------------------------------------------------------------------------
# Shards


def sample_seeds(seed: int, split: str, n: int) -> list[int]:
    """The ``n`` per-sample seeds of ``split`` (``seed`` >= 0): independent streams for different splits."""
    sequence = np.random.SeedSequence(seed, spawn_key=tuple(split.encode("utf-8")))
    return [int(s) for s in sequence.generate_state(n, dtype=np.uint64)]


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``: ``{split}-{index:06d}.tar``."""
    return f"{split}-{index:0{_SHARD_DIGITS}d}.tar"


def shard_pattern(split: str, n_shards: int) -> str:
    """Brace pattern of the ``n_shards`` shards of ``split`` (``train-{000000..000003}.tar``)."""
    return f"{split}-{{{0:0{_SHARD_DIGITS}d}..{n_shards - 1:0{_SHARD_DIGITS}d}}}.tar"


def _generate(jobs: list[tuple[str, int, str, WorldParams]], workers: int) -> Iterator[tuple[dict[str, Any], str | None]]:
    """Encoded samples in job order, generated by ``workers`` processes (in-process when <= 1)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_encoded_sample, jobs)
        return
    chunk = max(1, min(16, len(jobs) // (4 * workers)))
    with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(_encoded_sample, jobs, chunksize=chunk)


def _write_split(
    out_dir: Path, split: str, n: int, seed: int, world: str, per_shard: int, workers: int, params: WorldParams
) -> tuple[list[Path], list[str]]:
    """Write the shards of one split; return their paths and the captions in sample order (none for a
    world without captions)."""
    _check_split_args(world, {"n": n}, per_shard, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(f"{split}-{i:07d}", s, world, params) for i, s in enumerate(sample_seeds(seed, split, n))]
    paths: list[Path] = []
    captions: list[str] = []
    with contextlib.closing(_generate(jobs, workers)) as samples:
        for first in range(0, n, per_shard):
            path = out_dir / shard_name(split, first // per_shard)
            partial = path.with_name(path.name + ".partial")
            with open(partial, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0) as writer:
                for _ in range(min(per_shard, n - first)):
                    members, caption = next(samples)
                    writer.write(members)
                    if caption is not None:
                        captions.append(caption)
            os.replace(partial, path)
            paths.append(path)
    return paths, captions


def write_split(
    out_dir: str | os.PathLike,
    split: str,
    n: int,
    seed: int,
    world: str = "simple",
    per_shard: int = 500,
    workers: int = 2,
    xor_p: float = 1.0,
) -> list[Path]:
    """Write ``n`` samples of ``world`` as shards ``out_dir/{split}-{000000..}.tar`` (``per_shard`` each).

    Sample ``i`` has key ``{split}-{i:07d}`` and the ``i``-th seed of :func:`sample_seeds`. Returns the
    shard paths in order. The bytes written do not depend on ``workers``. ``xor_p``: see :func:`synth`.
    """
    return _write_split(Path(out_dir), split, n, seed, world, per_shard, workers, WorldParams(xor_p=xor_p))[0]


def train_tokenizer(
    captions: list[str], path: str | os.PathLike, vocab_size: int = 256, required_chars: str = CAPTION_ALPHABET
) -> Path:
    """Train a sentencepiece unigram model on ``captions`` in-process and write it to ``path``.

    Ids: ``<pad>`` = :data:`PAD_ID` (0), ``<unk>`` = :data:`UNK_ID` (1), no bos / eos pieces.
    ``vocab_size`` is an upper bound: a small corpus yields fewer pieces. Every character of
    ``required_chars`` gets a piece even when ``captions`` lack it (default: all characters this world's
    captions use), so held-out captions never map to ``<unk>``.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        required_chars=required_chars,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        eos_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def world_attributes(world: str) -> dict[str, list[str]]:
    """The attribute names used by ``world`` (the joint world's pitch has only ``low`` and ``high``; the
    xor world's labels are the bits ``a``, ``b``, ``c``, named ``"0"`` and ``"1"``)."""
    if world == "joint":
        return {**ATTRIBUTES, "pitch": list(JOINT_PITCHES)}
    if world == "xor":
        return {m: ["0", "1"] for m in XOR_MODALITIES}
    return {attr: list(names) for attr, names in ATTRIBUTES.items()}


def synth(
    out_dir: str | os.PathLike,
    train: int,
    test: int,
    world: str = "simple",
    seed: int = 0,
    workers: int = 2,
    per_shard: int = 500,
    xor_p: float = 1.0,
) -> dict[str, Any]:
    """Write a whole dataset of ``world`` to ``out_dir``: train and test shards and their index files.

    Files: ``train-*.tar``, ``test-*.tar`` (see :func:`write_split`), ``sizes.json`` ({shard file name:
    sample count}), ``tokenizer.model`` (trained on the train captions; not for the xor world, which has
    no captions) and ``world.json`` ({"world", "seed", "attributes", "splits": {split: {"pattern", "n"}},
    "tokenizer": {...} or null}, plus "xor_p" for the xor world; patterns are brace-expandable shard specs
    relative to ``out_dir``). ``xor_p``: the xor world's probability that ``c = a XOR b``. Returns a
    JSON-serialisable summary: ``world.json``'s content plus ``"out_dir"``, ``"shards"`` ({split: [shard
    paths]}) and ``"seconds"``.
    """
    start = time.perf_counter()
    params = WorldParams(xor_p=xor_p)
    _check_split_args(world, {"train": train, "test": test}, per_shard, params)
    out = Path(out_dir)
    shards: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    splits: dict[str, dict[str, Any]] = {}
    tokenizer: dict[str, Any] | None = None
    for split, n in (("train", train), ("test", test)):
        paths, captions = _write_split(out, split, n, seed, world, per_shard, workers, params)
        if split == "train" and captions:
            train_tokenizer(captions, out / "tokenizer.model")
            tokenizer = {"file": "tokenizer.model", "type": "sentencepiece", "pad_id": PAD_ID, "unk_id": UNK_ID}
        shards[split] = [str(path) for path in paths]
        splits[split] = {"pattern": shard_pattern(split, len(paths)), "n": n}
        for i, path in enumerate(paths):
            sizes[path.name] = min(per_shard, n - i * per_shard)
    info: dict[str, Any] = {
        "world": world,
        "seed": seed,
        "attributes": world_attributes(world),
        "splits": splits,
        "tokenizer": tokenizer,
    }
    if world == "xor":
        info["xor_p"] = xor_p
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    (out / "world.json").write_text(json.dumps(info, indent=1) + "\n")
    return {**info, "out_dir": str(out), "shards": shards, "seconds": time.perf_counter() - start}
