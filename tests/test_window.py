"""``data.clip``: one time window per sample shared by video and audio, only the window decoded.

The media are made here (:mod:`mmcl.data.timecode`): every frame shows its presentation time as a code and
the audio is a tone whose frequency steps every 0.25 s, so what a decoder returns can be placed on the
timeline independently of the decoder: the frames by reading their codes, the audio by cross-correlating it
with the exact tone.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from mmcl.data.context import SampleContext
from mmcl.data.shards import SampleDecoder, ShardStream, build_loader
from mmcl.data.timecode import audio_lag, encode_timecoded, frame_times, read_frame_time
from mmcl.data.window import WindowConfig, draw_window, probe_duration
from mmcl.errors import ConfigError
from mmcl.eval.suite import encode_dataset
from mmcl.model import MultimodalModel
from mmcl.modalities import build_processor
from mmcl.modalities import audio as audio_mod

ROOT = Path(__file__).resolve().parent.parent
FPS = 10.0
SR = 16000
FRAMES = 8
#: Keys of the random windows each source is checked with.
KEYS = [f"k{i}" for i in range(3)]
SOURCES = {  # name -> (seconds, encode_timecoded options)
    "10s": (10.0, {}),
    "10s_vfr": (10.0, {"variable": True}),
    "10s_audio_late": (10.0, {"audio_start": 0.5}),
    "60s": (60.0, {}),
    "60s_vfr": (60.0, {"variable": True}),
}


@pytest.fixture(scope="module")
def media() -> dict[str, bytes]:
    return {name: encode_timecoded(seconds, FPS, **kw) for name, (seconds, kw) in SOURCES.items()}


def _video(decoder: str = "torchcodec") -> Any:
    return build_processor("video", {"frames": FRAMES, "size": 64, "decoder": decoder})


def _max_gap(name: str) -> float:
    """The longest frame period of a source: how late the frame played at a time may have started."""
    seconds, kw = SOURCES[name]
    times = frame_times(seconds, FPS, kw.get("variable", False))
    return float(np.diff(times).max())


@pytest.mark.parametrize("decoder", ["torchcodec", "pyav"])
@pytest.mark.parametrize("name", list(SOURCES))
def test_frames_and_audio_come_from_the_same_span(media: dict[str, bytes], name: str, decoder: str) -> None:
    data = media[name]
    video = _video(decoder)
    decode_audio = audio_mod._decode_torchcodec_window if decoder == "torchcodec" else audio_mod._decode_pyav_window
    gap = _max_gap(name)
    for key in KEYS:
        ctx = SampleContext(key, epoch=3, seed=7, train=True)
        window = draw_window(WindowConfig(seconds=2.0), probe_duration(data), ctx)
        frames = video.decode({"__key__": key, "mp4": data}, SampleContext(key, 3, 7, True, window))
        assert frames.shape == (FRAMES, 3, 64, 64)
        shown = np.array([read_frame_time(f) for f in frames])
        wanted = np.array(window.times(FRAMES))
        # each frame is the one played at its time: it started at most one frame period before (codes
        # are in centiseconds, hence the 6 ms)
        late = wanted - shown
        assert late.min() >= -0.006 and late.max() < gap + 0.006, (key, window, shown, wanted)
        wav = decode_audio(data, SR, window)
        assert wav.shape == (int(2.0 * SR),)
        lag = audio_lag(wav.numpy(), window.start, SR)
        assert abs(lag) < 1.0 / FPS, (key, window, lag)  # the audio span is that window to within a frame
        assert abs(lag) < 0.003  # and in fact to a few milliseconds


def test_late_audio_is_placed_by_presentation_time(media: dict[str, bytes]) -> None:
    """An mp4 whose audio starts 0.5 s after its video: the window at 0 has silence until the track starts,
    and the tone where it plays is the tone of those moments."""
    data = media["10s_audio_late"]
    window = draw_window(WindowConfig(seconds=2.0, eval_clips=5), probe_duration(data), SampleContext("x"), 0)
    assert window.start == 0.0
    for decode in (audio_mod._decode_torchcodec_window, audio_mod._decode_pyav_window):
        wav = decode(data, SR, window).numpy()
        assert np.abs(wav[: int(0.45 * SR)]).max() < 1e-3
        assert np.abs(wav[int(0.55 * SR):]).max() > 0.3
        assert abs(audio_lag(wav, window.start, SR)) < 0.003


def test_windows_are_a_function_of_seed_epoch_key() -> None:
    cfg = WindowConfig(seconds=2.0)
    draw = lambda key, epoch, seed=0: draw_window(cfg, 60.0, SampleContext(key, epoch, seed, True)).start  # noqa: E731
    assert draw("a", 1) == draw("a", 1)
    starts = {draw("a", e) for e in range(5)} | {draw("b", 1), draw("a", 1, seed=1)}
    assert len(starts) == 7 and all(0 <= s <= 58 for s in starts)
    evals = [draw_window(WindowConfig(eval_clips=3), 10.0, SampleContext("a", e, s, False), v).start
             for v in range(3) for e, s in ((0, 0), (4, 9))]
    # evaluation: the same windows whatever the epoch and seed, evenly spaced (centres at 1/6, 3/6, 5/6)
    assert evals == pytest.approx([2 / 3, 2 / 3, 4.0, 4.0, 22 / 3, 22 / 3], abs=1e-6)


def test_audio_seconds_must_be_the_window() -> None:
    with pytest.raises(ConfigError, match=r"data\.clip\.seconds: 2 differs from model\.modalities\.audio\.seconds 3"):
        SampleDecoder({"audio": build_processor("audio", {"seconds": 3.0})}, clip=WindowConfig(seconds=2.0))


#: 8 frames 1 / 4.8 s apart: a 1.67 s span, not the 2 s window's uniform 0.25 s spacing (and off the
#: source's 0.1 s frame boundaries, where "the frame played at t" would hang on rounding).
FPS_SAMPLED = 4.8


def _check_dense_frames(frames: torch.Tensor, centre: float, name: str) -> None:
    """The decoded frames are the ones played at ``FRAMES`` times ``1 / FPS_SAMPLED`` apart centred on
    ``centre``: each started less than a frame period before its time (constant rate: it is exactly the
    source frame at or before it)."""
    seconds, kw = SOURCES[name]
    wanted = centre + (np.arange(FRAMES) - (FRAMES - 1) / 2) / FPS_SAMPLED
    shown = np.array([read_frame_time(f) for f in frames])
    late = wanted - shown
    assert late.min() >= -0.006 and late.max() < _max_gap(name) + 0.006, (centre, shown, wanted)
    if not kw.get("variable"):
        assert shown == pytest.approx(np.floor(wanted * FPS) / FPS, abs=0.006), (centre, shown, wanted)


@pytest.mark.parametrize("decoder", ["torchcodec", "pyav"])
@pytest.mark.parametrize("name", ["10s", "10s_vfr", "60s"])
def test_fps_samples_a_dense_span_centred_in_the_window(media: dict[str, bytes], name: str, decoder: str) -> None:
    """``fps``: the frames are those played ``1 / fps`` apart, their span centred in the window (random
    training windows and every ``eval_clips`` view) or, without ``data.clip``, in the whole clip."""
    data = media[name]
    video = build_processor("video", {"frames": FRAMES, "fps": FPS_SAMPLED, "size": 64, "decoder": decoder})
    duration = probe_duration(data)
    windows = [draw_window(WindowConfig(seconds=2.0), duration, SampleContext(k, 1, 7, True)) for k in KEYS]
    windows += [draw_window(WindowConfig(seconds=2.0, eval_clips=3), duration, SampleContext("e"), v)
                for v in range(3)]
    for window in windows:
        frames = video.decode({"__key__": "k", "mp4": data}, SampleContext("k", 1, 7, True, window))
        _check_dense_frames(frames, window.start + 1.0, name)
    frames = video.decode({"__key__": "k", "mp4": data})  # no data.clip: the clip's centred span
    _check_dense_frames(frames, duration / 2, name)


@pytest.mark.parametrize("decoder", ["torchcodec", "pyav"])
def test_fps_past_the_end_of_a_short_source_repeats_its_last_frame(decoder: str) -> None:
    """A 1 s source, 4 frames at 2.4 fps (a 1.67 s span): in the padded 2 s window the times are 0.375 +
    i / 2.4, in the whole clip (shorter than the span: from its start) 0.208 + i / 2.4; past 0.9 s the last
    frame repeats."""
    data = encode_timecoded(1.0, FPS)
    video = build_processor("video", {"frames": 4, "fps": 2.4, "size": 64, "decoder": decoder})
    window = draw_window(WindowConfig(seconds=2.0), probe_duration(data), SampleContext("s", 0, 0, True))
    assert window.start == 0.0 and window.short
    shown = [read_frame_time(f) for f in video.decode({"__key__": "s", "mp4": data},
                                                      SampleContext("s", 0, 0, True, window))]
    assert shown == pytest.approx([0.3, 0.7, 0.9, 0.9])
    shown = [read_frame_time(f) for f in video.decode({"__key__": "s", "mp4": data})]
    assert shown == pytest.approx([0.2, 0.6, 0.9, 0.9])


@pytest.mark.parametrize("name", [*SOURCES, "10s_b_frames", "20s_one_keyframe", "20s_vfr_one_keyframe", "1s"])
def test_both_decoders_return_the_same_frames(media: dict[str, bytes], name: str) -> None:
    """PyAV's window decode drops the frames no sampled time needs (``skip_frame NONREF`` on the way from the
    keyframe), torchcodec's decodes them all: frame for frame the same pixels, for random and eval windows,
    ``fps`` spans and whole clips, on long groups of pictures and sources shorter than the window. So
    ``auto`` (the default: PyAV for windows, torchcodec for whole clips) changes no input."""
    extra = {"10s_b_frames": (10.0, {"bframes": 3}), "20s_one_keyframe": (20.0, {"gop": 200, "bframes": 3}),
             "20s_vfr_one_keyframe": (20.0, {"gop": 200, "bframes": 3, "variable": True}),
             "1s": (1.0, {"bframes": 3})}
    data = media[name] if name in media else encode_timecoded(extra[name][0], FPS, **extra[name][1])
    duration = probe_duration(data)
    windows = [draw_window(WindowConfig(seconds=2.0), duration, SampleContext(k, 2, 11, True)) for k in KEYS]
    windows += [draw_window(WindowConfig(seconds=2.0, eval_clips=3), duration, SampleContext("e"), v)
                for v in range(3)]
    assert build_processor("video", {}).cfg.decoder == "auto"
    for fps in (None, FPS_SAMPLED):
        # size 64: the sources' own, so the frames are compared as decoded (no resize)
        decoders = {d: build_processor("video", {"frames": FRAMES, "fps": fps, "size": 64, "decoder": d})
                    for d in ("torchcodec", "pyav", "auto")}
        for window in [*windows, None]:
            ctx = SampleContext("k", 2, 11, True, window)
            out = {d: video.decode({"__key__": "k", "mp4": data}, ctx) for d, video in decoders.items()}
            assert torch.equal(out["torchcodec"], out["pyav"]), (name, fps, window)
            assert torch.equal(out["auto"], out["pyav"]), (name, fps, window)


#: Other codecs and containers, made by ffmpeg: (file name, its encoder options); 12 s at 25 fps, 160x120,
#: one keyframe in 300 frames.
OTHER_CODECS = {
    "vp9.webm": ["-c:v", "libvpx-vp9", "-b:v", "200k", "-deadline", "realtime", "-cpu-used", "8"],
    "mpeg4_b_frames.avi": ["-c:v", "mpeg4", "-bf", "2"],
    "h264_open_gop.mkv": ["-c:v", "libx264", "-bf", "3", "-x264-params", "open-gop=1"],
}


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg makes the test media")
@pytest.mark.parametrize("name", list(OTHER_CODECS))
def test_pyav_windows_equal_a_full_decode_in_other_containers(tmp_path: Path, name: str) -> None:
    """PyAV's window decode (the default for windows), which skips the frames no sampled time needs, keeps at
    each sampled time the frame a full decode shows there (the one of the greatest display time at or before
    it), on VP9 / webm, MPEG-4 with B-frames / avi and open-GOP H.264 / mkv, for random windows and ``fps``
    spans."""
    import av

    path = tmp_path / name
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=12",
                    *OTHER_CODECS[name], "-g", "300", str(path)], check=True)
    data = path.read_bytes()
    with av.open(io.BytesIO(data)) as container:
        shown = sorted(((f.time, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)),
                       key=lambda x: x[0])
    times = [t for t, _ in shown]
    duration = probe_duration(data)
    for fps in (None, FPS_SAMPLED):
        video = build_processor("video", {"frames": FRAMES, "fps": fps, "size": 120, "decoder": "auto"})
        for key in [f"k{i}" for i in range(8)]:
            window = draw_window(WindowConfig(seconds=2.0), duration, SampleContext(key, 0, 3, True))
            sample = {"__key__": key, name.rsplit(".", 1)[1]: data}
            frames = video.decode(sample, SampleContext(key, 0, 3, True, window))
            for frame, t in zip(frames, window.times(FRAMES, fps)):
                want = shown[max(0, bisect.bisect_right(times, t) - 1)][1]
                # size 120 = the height: a centre crop of the width, no resampling
                assert np.array_equal(frame.permute(1, 2, 0).numpy(), want[:, 20:140]), (name, fps, key, t)


def test_a_clip_shorter_than_the_fps_span_is_counted(tmp_path: Path) -> None:
    """Without ``data.clip``, a clip shorter than ``frames / fps`` repeats its last frame and is counted under
    ``short_source``, once in each epoch that reads it, from the RAM cache too."""
    shard = _write_shard(tmp_path / "s-000000.tar", {"short": encode_timecoded(1.0, FPS),
                                                     "long": encode_timecoded(3.0, FPS)})
    (tmp_path / "sizes.json").write_text(json.dumps({"s-000000.tar": 2}))
    processors = {"video": build_processor("video", {"frames": 4, "fps": 2.4, "size": 64})}
    for cache in (False, True):
        stream = ShardStream([shard], processors, 2, train=True, shuffle_buffer=0, cache=cache, split_by_node=False)
        for epoch in range(3):
            stream.set_epoch(epoch)
            batches = list(stream)
            assert sorted(k for b in batches for k in b["keys"]) == ["long", "short"]
            assert sum(b["adjusted"].get("short_source", 0) for b in batches) == 1, (cache, epoch)


def test_fps_span_must_fit_the_window() -> None:
    with pytest.raises(ConfigError, match=r"^data\.clip\.seconds: 2 is shorter than model\.modalities\.video\.frames "
                                          r"/ fps = 8 / 2 = 4 s \(the sampled frames must fit in the window\)$"):
        SampleDecoder({"video": build_processor("video", {"frames": 8, "fps": 2.0})}, clip=WindowConfig(seconds=2.0))
    SampleDecoder({"video": build_processor("video", {"frames": 8, "fps": 4.0})}, clip=WindowConfig(seconds=2.0))
    with pytest.raises(ConfigError, match=r"^model\.modalities\.video\.fps: must be > 0 \(or null: frames spread "
                                          r"over the window\), got 0\.0$"):
        build_processor("video", {"fps": 0.0})


def test_fps_is_saved_with_the_model(tmp_path: Path) -> None:
    from mmcl.config import ModelConfig, from_dict

    tower = {"width": 32, "depth": 1, "heads": 2, "patch": 16}
    spec = {"embed_dim": 16, "modalities": {"video": {"frames": FRAMES, "fps": FPS_SAMPLED, "size": 32, "tower": tower},
                                            "audio": {"n_mels": 32, "seconds": 2.0, "tower": tower}}}
    MultimodalModel(from_dict(ModelConfig, spec, "model")).save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model"]["modalities"]["video"]["fps"] == FPS_SAMPLED
    assert MultimodalModel.from_pretrained(tmp_path / "m").processors["video"].cfg.fps == FPS_SAMPLED
    assert _tiny_av_model().processors["video"].cfg.fps is None  # the default: spread over the window


def _write_shard(path: Path, samples: dict[str, bytes], durations: dict[str, float] | None = None) -> str:
    with wds.TarWriter(str(path)) as sink:
        for key, mp4 in samples.items():
            sample = {"__key__": key, "mp4": mp4}
            if durations and key in durations:
                sample["json"] = json.dumps({"duration": durations[key]}).encode()
            sink.write(sample)
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two shards of 10 s time-coded clips (a duration in the metadata for half of them, probed for the
    others) and one 1 s clip, shorter than the window."""
    out = tmp_path_factory.mktemp("window_shards")
    clips = {f"c{i}": encode_timecoded(10.0, FPS, gop=5 + i) for i in range(6)}
    clips["short"] = encode_timecoded(1.0, FPS)
    keys = list(clips)
    a = _write_shard(out / "w-000000.tar", {k: clips[k] for k in keys[:4]}, {"c0": 10.0, "c2": 10.0})
    b = _write_shard(out / "w-000001.tar", {k: clips[k] for k in keys[4:]}, {"c5": 10.0})
    (out / "sizes.json").write_text(json.dumps({"w-000000.tar": 4, "w-000001.tar": 3}))
    return a, b


def _processors() -> dict[str, Any]:
    return {"video": _video(), "audio": build_processor("audio", {"seconds": 2.0, "n_mels": 32})}


def _epoch(stream: ShardStream, epoch: int) -> dict[str, tuple[list[float], dict[str, torch.Tensor]]]:
    stream.set_epoch(epoch)
    out = {}
    for batch in stream:
        for i, key in enumerate(batch["keys"]):
            out[key] = (batch["windows"][i], {m: x[i] for m, x in batch["inputs"].items()})
    return out


def test_loader_windows_cache_and_short_sources(shards: tuple[str, str]) -> None:
    """Training windows move every epoch, also from the RAM cache (which keeps raw samples and decodes each
    epoch's window: the same tensors as without the cache); the video's frames are the window's; a source
    shorter than the window is padded and counted."""
    clip = WindowConfig(seconds=2.0)
    kwargs = dict(train=True, shuffle_buffer=0, seed=5, clip=clip, split_by_node=False)
    plain = ShardStream(list(shards), _processors(), 3, **kwargs)
    cached = ShardStream(list(shards), _processors(), 3, cache=True, **kwargs)
    seen = []
    for epoch in range(3):
        want, got = _epoch(plain, epoch), _epoch(cached, epoch)
        assert sorted(want) == sorted(got) == sorted([f"c{i}" for i in range(6)] + ["short"])
        for key in want:
            assert want[key][0] == got[key][0]
            for m in want[key][1]:
                assert torch.equal(want[key][1][m], got[key][1][m]), (epoch, key, m)
        seen.append({k: tuple(v[0]) for k, v in want.items()})
        assert cached._skipped == plain._skipped == {}
    assert cached._cache_complete and all(isinstance(v, dict) and "mp4" in v for v in cached._cache.values())
    for key in seen[0]:
        if key != "short":
            assert len({s[key] for s in seen}) == 3  # a new window every epoch
            start, end = seen[0][key]
            assert 0 <= start <= 8.0 and end == pytest.approx(start + 2.0)
    assert all(s["short"] == (0.0, 2.0) for s in seen)

    # the frames are the window's (read back from the decoded, standardised-then-undone uint8 frames)
    video = _video()
    for key, (start, _) in seen[1].items():
        if key == "short":
            continue
        sample = next(s for url in shards for s in wds.WebDataset(url, shardshuffle=False) if s["__key__"] == key)
        decoded, _ = SampleDecoder({"video": video}, clip=clip).decode(sample, SampleContext(key, 1, 5, True))
        shown = [read_frame_time(f) for f in decoded["video"]]
        assert decoded["__window__"].start == start
        assert np.all(np.array(decoded["__window__"].times(FRAMES)) - np.array(shown) < 0.1 + 0.006)

    loader = build_loader(shards[0] + "::" + shards[1], _processors(), 4, train=False, clip=clip)
    list(loader)
    assert loader.adjusted == {"short_source": 1}
    short = next(s for s in wds.WebDataset(shards[1], shardshuffle=False) if s["__key__"] == "short")
    decoded, _ = SampleDecoder({"video": video}, clip=clip).decode(short, SampleContext("short"))
    shown = [read_frame_time(f) for f in decoded["video"]]
    assert shown == pytest.approx([0.1, 0.3, 0.6, 0.8] + [0.9] * 4)  # the last frame repeats


def test_eval_windows_are_identical_across_runs(shards: tuple[str, str]) -> None:
    clip = WindowConfig(seconds=2.0, eval_clips=2)
    spec = shards[0] + "::" + shards[1]
    runs = []
    for _ in range(2):
        for view in range(2):
            loader = build_loader(spec, _processors(), 4, train=False, clip=clip, view=view)
            loader.set_epoch(3)
            runs.append([(k, tuple(w)) for b in loader for k, w in zip(b["keys"], b["windows"])])
    assert runs[0] == runs[2] and runs[1] == runs[3] and runs[0] != runs[1]
    assert dict(runs[0])["c0"] == (2.5 - 1.0, 2.5 + 1.0) and dict(runs[1])["c0"] == (7.5 - 1.0, 7.5 + 1.0)


def _tiny_av_model() -> MultimodalModel:
    from mmcl.config import ModelConfig, from_dict

    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"embed_dim": 16, "modalities": {
        "video": {"frames": FRAMES, "size": 32, "tower": {"width": 32, "depth": 1, "heads": 2, "patch": 16}},
        "audio": {"n_mels": 32, "seconds": 2.0, "tower": {"width": 32, "depth": 1, "heads": 2, "patch": 16}},
    }}, "model")
    return MultimodalModel(cfg).eval()


def test_eval_clips_average_the_embeddings_of_k_windows(shards: tuple[str, str]) -> None:
    model = _tiny_av_model()
    spec = shards[0] + "::" + shards[1]
    k = 3
    clip = WindowConfig(seconds=2.0, eval_clips=k)
    got = encode_dataset(model, spec, ["video", "audio"], 4, clip=clip, progress=False)
    # by hand: each sample's K windows decoded one by one, encoded, averaged, normalised
    samples = [s for url in shards for s in wds.WebDataset(url, shardshuffle=False)]
    assert got["keys"] == [s["__key__"] for s in samples]
    for m in ("video", "audio"):
        rows = []
        for s in samples:
            views = []
            for view in range(k):
                decoder = SampleDecoder({m: model.processors[m]}, clip=clip, view=view)
                ctx = SampleContext(s["__key__"])
                decoded, present = decoder.decode(s, ctx)
                x = decoder.transform(decoded, present, False, ctx)[m][None]
                with torch.no_grad():
                    views.append(model.encode({m: x})[m][0])
            rows.append(F.normalize(torch.stack(views).mean(0), dim=-1))
        torch.testing.assert_close(got["emb"][m], torch.stack(rows), rtol=1e-4, atol=1e-5)
    single = encode_dataset(model, spec, ["video"], 4, clip=WindowConfig(seconds=2.0), progress=False)
    assert not torch.allclose(single["emb"]["video"], got["emb"]["video"], atol=1e-3)


RANK_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from mmcl.data.shards import ShardStream
from mmcl.data.window import WindowConfig
from mmcl.modalities import build_processor

dist.init_process_group("gloo")
assert dist.get_world_size() == 2
procs = {"video": build_processor("video", {"frames": 8, "size": 64}),
         "audio": build_processor("audio", {"seconds": 2.0, "n_mels": 32})}
stream = ShardStream(sys.argv[2:], procs, 2, train=True, shuffle_buffer=4, seed=11,
                     clip=WindowConfig(seconds=2.0))
out = {}
for epoch in (0, 1):
    stream.set_epoch(epoch)
    for batch in stream:
        out.update({f"{epoch}/{k}": w for k, w in zip(batch["keys"], batch["windows"])})
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_ranks_draw_the_windows_of_one_process(shards: tuple[str, str], tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    "29517", str(script), str(tmp_path), *shards], check=True, env=env, timeout=300,
                   capture_output=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] and ranks[1] and not set(ranks[0]) & set(ranks[1])  # each rank its own shard
    stream = ShardStream(list(shards), _processors(), 2, train=True, shuffle_buffer=4, seed=11,
                         clip=WindowConfig(seconds=2.0), split_by_node=False)
    one = {}
    for epoch in (0, 1):
        one.update({f"{epoch}/{k}": w for k, (w, _) in _epoch(stream, epoch).items()})
    assert {**ranks[0], **ranks[1]} == one


def test_training_logs_each_keys_window(shards: tuple[str, str], tmp_path: Path) -> None:
    """``train.log_keys`` with ``data.clip``: every step's windows in ``log.jsonl``, each the draw of its
    (seed, epoch, key); the short source is counted in ``results.json``."""
    from mmcl.config import load_config
    from mmcl.train.loop import train

    base = {"model": {"embed_dim": 16, "modalities": {
        "video": {"frames": FRAMES, "size": 32, "tower": {"width": 32, "depth": 1, "heads": 2, "patch": 16}},
        "audio": {"n_mels": 32, "seconds": 2.0, "tower": {"width": 32, "depth": 1, "heads": 2, "patch": 16}}}},
        "data": {"train": shards[0] + "::" + shards[1], "batch_size": 2, "shuffle_buffer": 0,
                 "clip": {"seconds": 2.0}},
        "train": {"epochs": 2, "seed": 3, "log_keys": True, "progress": False, "warmup_steps": 1, "threads": 1}}
    summary = train(load_config(base=base), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    records = [r for r in records if "keys" in r]
    seen = [(r["epoch"], k) for r in records for k in r["keys"]]
    assert len(seen) == len(set(seen)) and {e for e, _ in seen} == {0, 1}
    durations = {f"c{i}": 10.0 for i in range(6)} | {"short": 1.0}
    for r in records:
        for key, window in zip(r["keys"], r["windows"]):
            want = draw_window(WindowConfig(seconds=2.0), durations[key], SampleContext(key, r["epoch"], 3, True))
            assert window == pytest.approx([want.start, want.end], abs=1e-6)
    assert summary["data"]["adjusted"] == {"short_source": sum(k == "short" for _, k in seen)}
    # The saved model keeps the run's window: the benchmarks evaluate in it by default.
    from mmcl.model import load_model

    assert load_model(tmp_path / "final").data_clip == WindowConfig(seconds=2.0)


def test_frozen_feature_cache_keys_follow_the_window_and_augmentation(shards: tuple[str, str]) -> None:
    """What the trainer's feature cache may reuse (``cache_windows``): never a random training window nor an
    augmented input; a fixed window joins the key as its span; a modality without time is the sample's."""
    from mmcl.data.augment import AugmentConfig, VideoAugment

    def windows(train_mode: str, train: bool = True, augment: AugmentConfig | None = None) -> dict[str, dict]:
        stream = ShardStream(list(shards), _processors(), 7, train=train, shuffle_buffer=0, seed=5,
                             clip=WindowConfig(seconds=2.0, train=train_mode), split_by_node=False, augment=augment)
        out = {}
        for batch in stream:
            for i, key in enumerate(batch["keys"]):
                out[key] = {m: w[i] for m, w in batch["cache_windows"].items()}, batch["windows"][i]
        return out

    random_ = windows("random")
    assert random_["short"][0] == {"video": "0.000000+2", "audio": "0.000000+2"}  # shorter than the window: fixed
    assert all(w == {"video": None, "audio": None} for key, (w, _) in random_.items() if key != "short")
    for mode, train in (("center", True), ("random", False)):
        for key, (w, (start, _)) in windows(mode, train).items():
            assert w == {"video": f"{start:.6f}+2", "audio": f"{start:.6f}+2"}, (mode, train, key)
    augmented = windows("center", augment=AugmentConfig(video=VideoAugment()))
    assert all(w["video"] is None and w["audio"] is not None for w, _ in augmented.values())
