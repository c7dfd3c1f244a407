"""``mmcl doctor``: what to know before a long run. The library versions, whether each media decoder
loads and decodes a clip made here, the DeepSpeed ops this machine can build, the devices; and for a
training config, whether the files it names exist and its shards resolve. Every problem is one line.

The checks run the libraries themselves (a decoder "loads" when it decodes a real H.264 clip and a FLAC
file written on the spot), never their metadata alone.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import os
import platform
import shutil
import subprocess
import sys
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mmcl

#: Fields of a model config that name a local file or directory (tokenizers, checkpoints, model folders).
PATH_FIELDS = ("tokenizer", "path", "checkpoint")


@dataclass
class Check:
    """One line of the report; ``problem`` (one line) when it blocks a run."""

    name: str
    detail: str
    problem: str = ""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _test_clip() -> bytes:
    """A 1 s, 8-frame 64 x 64 H.264 mp4 (PyAV, else the ffmpeg binary)."""
    try:
        import av
        import numpy as np

        buf = io.BytesIO()
        with av.open(buf, "w", format="mp4") as out:
            stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=8)
            stream.width = stream.height = 64
            stream.pix_fmt = "yuv420p"
            for i in range(8):
                frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 30 * i, np.uint8), format="rgb24")
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
        return buf.getvalue()
    except Exception:
        cmd = ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=8:duration=1",
               "-pix_fmt", "yuv420p", "-f", "mp4", "-movflags", "frag_keyframe+empty_moov", "pipe:1"]
        return subprocess.run(cmd, capture_output=True, check=True, timeout=60).stdout


def _test_audio() -> tuple[bytes, str]:
    """0.5 s of a 440 Hz tone at 16 kHz: FLAC (soundfile), else WAV (the standard library)."""
    import numpy as np

    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)).astype(np.float32)
    try:
        import soundfile

        buf = io.BytesIO()
        soundfile.write(buf, tone, 16000, format="FLAC")
        return buf.getvalue(), "flac"
    except Exception:
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes((tone * 32767).astype(np.int16).tobytes())
        return buf.getvalue(), "wav"


def _try(fn: Callable[[], str]) -> tuple[bool, str]:
    try:
        return True, fn()
    except Exception as e:
        return False, _first_line(e)


def _torch_check() -> list[Check]:
    import torch

    cuda = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    build = f"CUDA build {cuda}" + (f", cuDNN {cudnn}" if cudnn else "") if cuda else "CPU build"
    checks = [Check("torch", f"{torch.__version__} ({build}); torchaudio {_version('torchaudio') or 'missing'}")]
    if torch.cuda.is_available():
        names = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            names.append(f"cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB)")
        checks.append(Check("devices", "; ".join(names)))
    else:
        why = "no CUDA device visible" if cuda else "torch built without CUDA"
        checks.append(Check("devices", f"cpu only ({os.cpu_count()} cores; {why})"))
    return checks


def _decoder_checks() -> list[Check]:
    checks: list[Check] = []
    try:
        clip, no_clip = _test_clip(), ""
    except Exception as e:
        clip, no_clip = b"", f"no test clip ({_first_line(e)})"
    audio, audio_fmt = _test_audio()

    def torchcodec_video() -> str:
        from torchcodec.decoders import VideoDecoder

        frames = VideoDecoder(clip)
        return f"{len(frames)} frames of {tuple(frames[0].shape)}"

    def torchcodec_audio() -> str:
        from torchcodec.decoders import AudioDecoder

        samples = AudioDecoder(audio).get_all_samples()
        return f"{samples.data.shape[-1]} samples at {samples.sample_rate} Hz"

    def pyav_video() -> str:
        import av

        with av.open(io.BytesIO(clip)) as container:
            n = sum(1 for _ in container.decode(video=0))
        return f"{n} frames"

    def soundfile_audio() -> str:
        import soundfile

        data, sr = soundfile.read(io.BytesIO(audio))
        return f"{len(data)} samples at {sr} Hz"

    def ffmpeg_libs() -> str:
        from torchcodec._core import get_ffmpeg_library_versions

        return get_ffmpeg_library_versions()["ffmpeg_version"]

    tc_version = _version("torchcodec")
    video_ok = audio_ok = False
    if tc_version:
        libs_ok, libs = _try(ffmpeg_libs)
        video_ok, video = _try(torchcodec_video) if clip else (False, no_clip)
        audio_ok, audio_msg = _try(torchcodec_audio)
        checks.append(Check("torchcodec", f"{tc_version}, FFmpeg libs {libs if libs_ok else f'not loaded ({libs})'}; "
                                          f"video: {'decodes ' if video_ok else ''}{video}; "
                                          f"{audio_fmt}: {'decodes ' if audio_ok else ''}{audio_msg}"))
    else:
        checks.append(Check("torchcodec", "not installed (pip install -e '.[media]'); PyAV / soundfile decode instead"))
    av_version = _version("av")
    pyav_ok = False
    if av_version:
        pyav_ok, pyav = _try(pyav_video) if clip else (False, no_clip)
        libav = _try(lambda: ".".join(map(str, importlib.import_module("av").library_versions["libavcodec"])))[1]
        checks.append(Check("PyAV", f"{av_version} (libavcodec {libav}); video: {'decodes ' if pyav_ok else ''}{pyav}"))
    else:
        checks.append(Check("PyAV", "not installed"))
    sf_version = _version("soundfile")
    sf_ok = False
    if sf_version:
        sf_ok, sf = _try(soundfile_audio)
        libsndfile = _try(lambda: importlib.import_module("soundfile").__libsndfile_version__)[1]
        checks.append(Check("soundfile", f"{sf_version} (libsndfile {libsndfile}); "
                                         f"{audio_fmt}: {'decodes ' if sf_ok else ''}{sf}"))
    else:
        checks.append(Check("soundfile", "not installed"))
    if not (video_ok or pyav_ok):
        checks.append(Check("video decoding", "no decoder works", "no video decoder works (torchcodec needs the "
                                                                  "system FFmpeg libraries; PyAV needs pip install av)"))
    if not (audio_ok or sf_ok):
        checks.append(Check("audio decoding", "no decoder works", "no audio decoder works (torchcodec or soundfile)"))
    return checks


def _ffmpeg_check() -> Check:
    exe = shutil.which("ffmpeg")
    if exe is None:
        return Check("ffmpeg", "not on PATH", "ffmpeg: not on PATH (mmcl shards build runs it; apt-get install ffmpeg)")
    ok, out = _try(lambda: subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30)
                   .stdout.splitlines()[0].split(" Copyright")[0])
    return Check("ffmpeg", f"{exe}: {out}", "" if ok else f"ffmpeg: {exe} does not run ({out})")


def _deepspeed_check() -> Check:
    version = _version("deepspeed")
    if not version:
        return Check("DeepSpeed", "not installed (train.deepspeed configs cannot run)")

    def ops() -> str:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.env_report import probe_is_compatible
        from deepspeed.ops.op_builder.all_ops import ALL_OPS

        usable = [name for name, builder in ALL_OPS.items() if probe_is_compatible(builder, False)]
        others = sorted(set(ALL_OPS) - set(usable))
        return (f"accelerator {get_accelerator()._name}; ops that can be built: {', '.join(sorted(usable)) or 'none'}"
                + (f"; not here: {', '.join(others)}" if others else ""))

    ok, detail = _try(ops)
    return Check("DeepSpeed", f"{version}; {detail}" if ok else f"{version}; ops not probed ({detail})")


def environment_checks() -> list[Check]:
    """The machine: Python, torch and the devices, media decoders, ffmpeg, DeepSpeed, other libraries."""
    checks = [Check("python", f"{platform.python_version()} ({sys.executable}); mmcl {mmcl.__version__} "
                              f"({Path(mmcl.__file__).parent}); {platform.platform()}")]
    checks += _torch_check()
    checks += _decoder_checks()
    checks.append(_ffmpeg_check())
    checks.append(_deepspeed_check())
    libs = ["transformers", "timm", "accelerate", "webdataset", "sentencepiece", "huggingface_hub", "safetensors"]
    checks.append(Check("libraries", ", ".join(f"{lib} {_version(lib) or 'missing'}" for lib in libs)))
    return checks


def _path_fields(node: Any, where: str) -> list[tuple[str, str]]:
    """``(dotted field, value)`` of every non-empty :data:`PATH_FIELDS` string under ``node``."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in PATH_FIELDS and isinstance(v, str) and v:
                found.append((f"{where}.{k}", v))
            else:
                found += _path_fields(v, f"{where}.{k}")
    return found


def suite_reads_test(cfg: Any) -> bool:
    """Whether ``cfg.eval.suite`` has a task on the held-out split (``data: test``)."""
    from mmcl.eval.suite import load_suite

    return bool(cfg.eval.suite) and any(task.data == "test" for task in load_suite(cfg.eval.suite).tasks)


def config_checks(config: str, overrides: list[str] | None = None) -> list[Check]:
    """A training config: it loads, the files its model names exist (relative to the working directory,
    as a run reads them), its shards resolve, its eval suite and DeepSpeed file are there."""
    from mmcl.config import load_config, to_dict
    from mmcl.data.shards import dataset_size, expand_shards
    from mmcl.errors import MmclError

    try:
        cfg = load_config(config, overrides)
    except MmclError as e:
        return [Check("config", config, f"config {config}: {e}")]
    checks = [Check("config", f"{config} loads ({len(cfg.model.modalities)} modalities: "
                              f"{', '.join(cfg.model.modalities)}; objective {cfg.objective.name})")]
    for field, value in _path_fields(to_dict(cfg.model), "model"):
        p = Path(value).expanduser()
        checks.append(Check(field, f"{value} exists" if p.exists() else f"{value} missing",
                            "" if p.exists() else f"{field}: not found: {value}"))
    for field, spec in (("data.train", cfg.data.train), ("data.test", cfg.data.test)):
        if not spec and field == "data.test":
            continue
        try:
            urls = expand_shards(spec)
        except MmclError as e:
            checks.append(Check(field, spec, f"{field}: {e}"))
            continue
        size = dataset_size(urls)
        samples = f"{size:,} samples (sizes.json)" if size is not None else "sample count unknown (no sizes.json)"
        checks.append(Check(field, f"{spec}: {len(urls)} shard(s), {samples}"))
    if cfg.eval.suite:
        try:
            needs_test = suite_reads_test(cfg)
            checks.append(Check("eval.suite", f"{cfg.eval.suite} loads"))
            if needs_test and not cfg.data.test:
                checks.append(Check("eval.suite", "no held-out data",
                                    f"eval.suite: {cfg.eval.suite} evaluates data.test, which is empty "
                                    f"(mmcl train --eval-data SPEC, or --set eval.suite='')"))
        except MmclError as e:
            checks.append(Check("eval.suite", cfg.eval.suite, f"eval.suite: {e}"))
    if cfg.train.deepspeed:
        p = Path(cfg.train.deepspeed)
        if not p.is_file():
            checks.append(Check("train.deepspeed", cfg.train.deepspeed,
                                f"train.deepspeed: not found: {cfg.train.deepspeed}"))
        elif not _version("deepspeed"):
            checks.append(Check("train.deepspeed", cfg.train.deepspeed, "train.deepspeed: DeepSpeed is not installed"))
        else:
            checks.append(Check("train.deepspeed", f"{cfg.train.deepspeed} exists"))
    return checks


def run_doctor(config: str | None = None, overrides: list[str] | None = None) -> list[Check]:
    """Every check of the machine, then (given ``config``) of the config."""
    checks = environment_checks()
    if config is not None:
        checks += config_checks(config, overrides)
    return checks


def format_checks(checks: list[Check]) -> str:
    """``name  detail`` lines, a ``!`` before each check that is a problem."""
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{'!' if c.problem else ' '} {c.name:<{width}}  {c.detail}" for c in checks)
