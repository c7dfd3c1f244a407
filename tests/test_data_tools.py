"""data_tools on real media the tests make with ffmpeg: several containers and codecs, 8-48 kHz, mono /
stereo / 5.1, 0.2 s to 60 s, images, text-only rows, a corrupt file of each kind and every kind of bad row.
Every input is either in the shards or in the report with its reason; the shards stream through the
training loader and decode to the model's shapes; validate, inspect, resume, pipe: output and the CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
import tarfile
import wave
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import soundfile
import webdataset as wds
import yaml

from data_tools.build import ShardOptions, build_shards, load_inputs, parse_size
from data_tools.check import inspect_shards, validate_shards
from data_tools.media import EncodeOptions
from data_tools.sources import BuildError
from mmcl.cli import main as cli_main
from mmcl.data.shards import build_loader
from mmcl.data.synthetic import train_tokenizer
from mmcl.modalities import Processor, build_processor

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                reason="ffmpeg and ffprobe are needed to make and normalise test media")

TINY = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"
#: Small outputs keep the tests fast: 4 fps, 32 px, windows of at most 10 s, 1 s still images.
OPTIONS = EncodeOptions(fps=4, size=32, window=10.0, image_seconds=1.0)
#: Reasons ffmpeg may give for a file of garbage bytes (which one depends on what it mistakes it for).
CORRUPT = {"unreadable_media", "decode_error", "missing_stream", "zero_duration"}


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y", *args], check=True)


def picture(seconds: float, size: str = "32x24", rate: int = 10) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]


def tone(seconds: float, rate: int) -> list[str]:
    return ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={rate}:duration={seconds}"]


def make_media(d: Path) -> None:
    """The good media (names say what they hold) and the corrupt ones."""
    d.mkdir(parents=True, exist_ok=True)
    ffmpeg(*picture(1), *tone(1, 44100), "-ac", "2", "-c:v", "libx264", "-c:a", "aac",
           str(d / "h264_aac_44k_stereo.mp4"))
    ffmpeg(*picture(1), *tone(1, 48000), "-c:v", "libvpx", "-c:a", "libopus", str(d / "vp8_opus_48k.webm"))
    ffmpeg(*picture(1), "-c:v", "libx264", str(d / "h264_silent.mkv"))
    ffmpeg(*picture(1), *tone(1, 22050), "-c:v", "mpeg4", "-c:a", "libmp3lame", str(d / "mpeg4_mp3_22k.avi"))
    ffmpeg(*picture(1), *tone(1, 48000), "-ac", "6", "-c:v", "mjpeg", "-c:a", "pcm_s16le",
           str(d / "mjpeg_pcm_48k_51.mov"))
    ffmpeg(*picture(1), *tone(1, 32000), "-c:v", "libtheora", "-c:a", "libvorbis", str(d / "theora_vorbis_32k.ogv"))
    ffmpeg(*picture(1), "-c:v", "libtheora", str(d / "theora_only.ogv"))
    ffmpeg(*picture(60, "32x24", 5), *tone(60, 8000), "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac",
           str(d / "long_60s.mp4"))
    ffmpeg(*picture(0.2, "32x24", 25), "-c:v", "libx264", str(d / "short_0.2s.mp4"))
    ffmpeg(*tone(0.2, 8000), str(d / "mono_8k_0.2s.wav"))
    ffmpeg(*tone(1, 48000), "-ac", "2", str(d / "stereo_48k.flac"))
    ffmpeg(*tone(1, 32000), "-c:a", "libvorbis", str(d / "vorbis_32k.ogg"))
    ffmpeg(*tone(1, 44100), "-c:a", "libmp3lame", str(d / "mp3_44k.mp3"))
    ffmpeg(*tone(1, 24000), "-c:a", "aac", str(d / "aac_24k.m4a"))
    ffmpeg(*tone(1, 16000), "-ac", "6", str(d / "surround_16k_51.wav"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=40x30", "-frames:v", "1", str(d / "picture.png"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=30x40", "-frames:v", "1", str(d / "picture.jpg"))
    with wave.open(str(d / "zero_samples.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    rng = np.random.default_rng(0)
    for ext in ("mp4", "webm", "mkv", "avi", "mov", "ogv", "wav", "flac", "ogg", "mp3", "m4a", "png", "jpg"):
        (d / f"garbage.{ext}").write_bytes(rng.bytes(3000))
    good = (d / "h264_aac_44k_stereo.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(good[: len(good) // 2])  # the moov atom is at the end: unreadable
    webm = (d / "vp8_opus_48k.webm").read_bytes()
    (d / "truncated.webm").write_bytes(webm[: len(webm) // 2])  # decodes half, then errors
    flac = (d / "stereo_48k.flac").read_bytes()
    (d / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    (d / "empty.mkv").write_bytes(b"")


#: (manifest row, expected outcome): a reason (or a set of acceptable ones), or the sample members
#: and the number of windows of an accepted row.
ROWS: list[tuple[dict[str, Any], Any]] = [
    ({"key": "mp4", "video": "h264_aac_44k_stereo.mp4", "text": "a test card with a tone", "label": "card",
      "license": "CC-BY-4.0", "speaker": "nobody"}, ({"mp4", "flac", "txt", "json"}, 1)),
    ({"key": "webm", "video": "vp8_opus_48k.webm", "text": "webm"}, ({"mp4", "flac", "txt", "json"}, 1)),
    ({"key": "mkv_silent", "video": "h264_silent.mkv", "text": "no sound"}, ({"mp4", "txt", "json"}, 1)),
    ({"key": "avi", "video": "mpeg4_mp3_22k.avi"}, ({"mp4", "flac", "json"}, 1)),
    ({"key": "mov51", "video": "mjpeg_pcm_48k_51.mov"}, ({"mp4", "flac", "json"}, 1)),
    ({"key": "ogv", "video": "theora_vorbis_32k.ogv"}, ({"mp4", "flac", "json"}, 1)),
    ({"key": "short", "video": "short_0.2s.mp4", "text": "a blink"}, ({"mp4", "txt", "json"}, 1)),
    ({"key": "long", "video": "long_60s.mp4", "captions": [
        {"start": 1, "end": 3, "text": "first"}, {"start": 2, "end": 4, "text": "overlapping"},
        {"start": 31, "end": 35, "text": "middle"}, {"start": 58, "end": 70, "text": "last"}],
      "text": "a long test card"}, ({"mp4", "flac", "txt", "json"}, 6)),
    ({"key": "segment", "video": "long_60s.mp4", "start": 10, "end": 25, "text": "a segment"},
     ({"mp4", "flac", "txt", "json"}, 2)),
    ({"key": "wav8k", "audio": "mono_8k_0.2s.wav", "text": "beep"}, ({"flac", "txt", "json"}, 1)),
    ({"key": "flac", "audio": "stereo_48k.flac"}, ({"flac", "json"}, 1)),
    ({"key": "ogg", "audio": "vorbis_32k.ogg"}, ({"flac", "json"}, 1)),
    ({"key": "mp3", "audio": "mp3_44k.mp3"}, ({"flac", "json"}, 1)),
    ({"key": "m4a", "audio": "aac_24k.m4a"}, ({"flac", "json"}, 1)),
    ({"key": "wav51", "audio": "surround_16k_51.wav"}, ({"flac", "json"}, 1)),
    ({"key": "png", "image": "picture.png", "text": "a still"}, ({"mp4", "txt", "json"}, 1)),
    ({"key": "jpg_with_audio", "image": "picture.jpg", "audio": "mono_8k_0.2s.wav"}, ({"mp4", "flac", "json"}, 1)),
    ({"key": "video_and_audio", "video": "h264_silent.mkv", "audio": "vorbis_32k.ogg"}, ({"mp4", "flac", "json"}, 1)),
    ({"key": "text_only", "text": "just words", "label": "words"}, ({"txt", "json"}, 1)),
    *[({"key": f"garbage_{ext}", kind: f"garbage.{ext}"}, CORRUPT)
      for kind, exts in (("video", ("mp4", "webm", "mkv", "avi", "mov", "ogv")),
                         ("audio", ("wav", "flac", "ogg", "mp3", "m4a")), ("image", ("png", "jpg")))
      for ext in exts],
    ({"key": "truncated_mp4", "video": "truncated.mp4"}, "unreadable_media"),
    ({"key": "truncated_webm", "video": "truncated.webm"}, "decode_error"),
    ({"key": "truncated_flac", "audio": "truncated.flac"}, "decode_error"),
    ({"key": "empty_mkv", "video": "empty.mkv"}, "unreadable_media"),
    ({"key": "zero_wav", "audio": "zero_samples.wav"}, "zero_duration"),
    ({"key": "audio_as_video", "video": "aac_24k.m4a"}, "missing_stream"),
    ({"key": "video_as_audio", "audio": "theora_only.ogv"}, "missing_stream"),
    ({"key": "missing", "video": "not_there.mp4"}, "missing_file"),
    ({"key": "mp4", "video": "h264_silent.mkv"}, "duplicate_key"),
    ({"key": "empty_caption", "video": "h264_silent.mkv", "text": "  \n "}, "caption_empty"),
    ({"key": "huge_caption", "text": "word " * 1000}, "caption_too_long"),
    ({"key": "nothing", "label": "no media"}, "no_media"),
    ({"key": "outside", "video": "short_0.2s.mp4", "start": 5, "end": 6}, "segment_out_of_range"),
    ({"key": "bad_times", "video": "short_0.2s.mp4", "start": "soon"}, "bad_manifest_row"),
]
#: Raw manifest lines that JSON cannot express: a caption that is not UTF-8, a line that is not JSON.
RAW_LINES: list[tuple[bytes, str]] = [
    (b'{"key": "latin1_caption", "video": "h264_silent.mkv", "text": "caf\xe9 au lait"}', "caption_not_utf8"),
    (b'{"key": "broken", "video": ', "bad_manifest_row"),
]


def _write_manifest(path: Path) -> dict[str, Any]:
    """The JSONL manifest of ROWS and RAW_LINES; returns ``{row index: expectation}``."""
    lines, expected = [], {}
    for row, outcome in ROWS:
        expected[len(lines)] = (row.get("key"), outcome)
        lines.append(json.dumps(row).encode())
    for raw, reason in RAW_LINES:
        expected[len(lines)] = (None, reason)
        lines.append(raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


def _read(spec: str) -> list[dict[str, Any]]:
    return list(wds.WebDataset(spec, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("media")
    make_media(d)
    return d


@pytest.fixture(scope="module")
def built(media: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The manifest built with 2 workers into several shards: {"expected", "report", "out", "spec", "samples"}."""
    expected = _write_manifest(media / "manifest.jsonl")
    out = tmp_path_factory.mktemp("shards")
    items = load_inputs(manifest=str(media / "manifest.jsonl"))
    report = build_shards(items, str(out), workers=2, options=OPTIONS, shard=ShardOptions(shard_size=60_000),
                          progress=False)
    spec = str(out / report["pattern"])
    return {"expected": expected, "report": report, "out": out, "spec": spec, "samples": _read(spec)}


@pytest.fixture(scope="module")
def modalities(built: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Processor]:
    """The tiny model's training modalities with a tokenizer trained on the built captions."""
    captions = [s["txt"].decode() for s in built["samples"] if "txt" in s]
    tokenizer = train_tokenizer(captions, tmp_path_factory.mktemp("tok") / "tokenizer.model")
    specs = yaml.safe_load(TINY.read_text())["modalities"]
    specs["text"]["tokenizer"] = str(tokenizer)
    return {name: build_processor(name, spec) for name, spec in specs.items()}


def test_every_input_is_in_the_shards_or_reported(built: dict[str, Any]) -> None:
    report, samples, expected = built["report"], built["samples"], built["expected"]
    n_inputs = len(ROWS) + len(RAW_LINES)
    rejected = {r["input"]: r for r in report["rejections"]}
    assert report["inputs"] == n_inputs
    assert report["accepted"] + report["rejected"] == n_inputs
    assert len(rejected) == report["rejected"] == sum(report["by_reason"].values())

    by_input: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        by_input.setdefault(json.loads(s["json"])["input"], []).append(s)
    # good samples in the shards = inputs - reported: each input in exactly one of the two
    assert set(by_input) | set(rejected) == set(range(n_inputs))
    assert not set(by_input) & set(rejected)
    assert len(by_input) == n_inputs - report["rejected"]
    assert len(samples) == report["samples"] == sum(report["shards"].values())
    assert len(report["shards"]) > 1
    assert json.loads((built["out"] / "sizes.json").read_text()) == report["shards"]

    for index, (key, outcome) in expected.items():
        if isinstance(outcome, tuple):
            members, windows = outcome
            got = by_input.get(index)
            assert got is not None, f"{key} rejected: {rejected.get(index)}"
            assert len(got) == windows, key
            assert all(set(k for k in s if not k.startswith("__")) == members for s in got), key
            keys = [s["__key__"] for s in got]
            assert keys == ([key] if windows == 1 else [f"{key}@{j:04d}" for j in range(windows)])
        else:
            assert index in rejected, f"{key} should be rejected ({outcome})"
            reason = rejected[index]["reason"]
            assert reason in outcome if isinstance(outcome, set) else reason == outcome, (key, rejected[index])
            assert rejected[index]["detail"] and "\n" not in rejected[index]["detail"]
            assert rejected[index]["source"] == f"manifest.jsonl:{index + 1}"


def test_samples_are_normalised_and_keep_their_source(built: dict[str, Any], media: Path) -> None:
    samples = {s["__key__"]: s for s in built["samples"]}
    meta = json.loads(samples["mp4"]["json"])
    assert meta["source"] == str(media / "h264_aac_44k_stereo.mp4")
    assert meta["license"] == "CC-BY-4.0" and meta["labels"] == {"label": "card"}
    assert meta["extra"] == {"speaker": "nobody"}
    assert (meta["fps"], meta["sample_rate"], meta["channels"], meta["width"]) == (10, 44100, 2, 32)
    assert meta["duration"] == pytest.approx(1.0, abs=0.05)
    assert samples["mp4"]["txt"] == b"a test card with a tone"
    for key, rate, channels in (("wav8k", 8000, 1), ("mov51", 48000, 6), ("avi", 22050, 1), ("m4a", 24000, 1)):
        m = json.loads(samples[key]["json"])
        assert (m["sample_rate"], m["channels"]) == (rate, channels), key
    for key in ("mp4", "webm", "avi", "mov51", "ogv", "wav8k", "flac", "ogg", "mp3", "m4a", "wav51"):
        info = soundfile.info(io.BytesIO(samples[key]["flac"]))
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC"), key
    for key, shape in (("mp4", (32, 42)), ("png", (32, 42)), ("jpg_with_audio", (42, 32))):
        with av.open(io.BytesIO(samples[key]["mp4"])) as c:
            v = c.streams.video[0]
            assert (v.codec_context.name, v.height, v.width) == ("h264", *shape), key
            assert not c.streams.audio
            assert float(v.average_rate) == pytest.approx(4.0)
    assert json.loads(samples["png"]["json"])["duration"] == pytest.approx(1.0)
    # an image with an audio file lasts as long as the audio
    assert json.loads(samples["jpg_with_audio"]["json"])["duration"] == pytest.approx(0.2, abs=0.01)
    assert json.loads(samples["text_only"]["json"])["labels"] == {"label": "words"}


def test_long_media_is_cut_into_windows_with_their_captions(built: dict[str, Any]) -> None:
    samples = {s["__key__"]: s for s in built["samples"]}
    windows = [samples[f"long@{j:04d}"] for j in range(6)]
    metas = [json.loads(s["json"]) for s in windows]
    assert [(m["start"], m["end"]) for m in metas] == [(10.0 * j, 10.0 * (j + 1)) for j in range(6)]
    assert all(m["source_duration"] == pytest.approx(60.0) and m["windows"] == 6 for m in metas)
    # timed captions go to the window holding their midpoint (one clamped into the media), else the row's
    assert [s["txt"].decode() for s in windows] == [
        "first overlapping", "a long test card", "a long test card", "middle", "a long test card", "last"]
    assert [c["text"] for c in metas[0]["captions"]] == ["first", "overlapping"]
    seg = [json.loads(samples[f"segment@{j:04d}"]["json"]) for j in range(2)]
    assert [(m["start"], m["end"]) for m in seg] == [(10.0, 17.5), (17.5, 25.0)]
    for s in windows + [samples["segment@0000"]]:
        m = json.loads(s["json"])
        n = soundfile.info(io.BytesIO(s["flac"])).frames
        assert n == pytest.approx(16000 * m["duration"], rel=0.02)


def test_shards_stream_through_the_training_loader(built: dict[str, Any], modalities: dict[str, Processor]) -> None:
    loader = build_loader(built["spec"], modalities, 8, train=False, on_missing="mask", with_meta=True)
    assert loader.size == built["report"]["samples"]
    keys, members = [], {s["__key__"]: s for s in built["samples"]}
    v, t = (modalities[m].cfg for m in ("video", "text"))
    a = modalities["audio"]
    for batch in loader:
        n = len(batch["keys"])
        keys += batch["keys"]
        assert batch["inputs"]["video"].shape == (n, v.frames, 3, v.size, v.size)
        assert batch["inputs"]["audio"].shape == (n, 1, a.cfg.n_mels, a.n_frames)
        assert batch["inputs"]["text"].shape == (n, t.max_len)
        for i, key in enumerate(batch["keys"]):
            for mod, ext in (("video", "mp4"), ("audio", "flac"), ("text", "txt")):
                assert bool(batch["present"][mod][i]) == (ext in members[key]), (key, mod)
    assert sorted(keys) == sorted(members) and not loader.skipped


def test_validate_passes_good_shards_and_lists_bad_ones(built: dict[str, Any], tmp_path: Path, capsys) -> None:
    result = validate_shards(built["spec"], on_missing="mask")
    assert result["bad"] == [] and result["good"] == result["samples"] == built["report"]["samples"]
    # With on_missing skip (training's default) a sample lacking a modality is bad, named as the loader counts
    # it: after the first modality it lacks (the tiny model's order: video, audio, text).
    lacking = {s["__key__"]: next((f"missing_{m}" for m, ext in (("video", "mp4"), ("audio", "flac"), ("text", "txt"))
                                   if ext not in s), None) for s in built["samples"]}
    result = validate_shards(built["spec"])
    assert {b["key"]: b["reason"] for b in result["bad"]} == {k: r for k, r in lacking.items() if r}
    assert result["good"] == sum(r is None for r in lacking.values()) > 0

    first = built["out"] / "shard-000000.tar"
    good = _read(str(first))
    with tarfile.open(tmp_path / "bad-000000.tar", "w") as tar:
        def put(key: str, ext: str, data: bytes) -> None:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for s in good:
            for ext in ("mp4", "flac", "txt", "json"):
                if ext in s:
                    put(s["__key__"], ext, s[ext])
        put("noise", "mp4", np.random.default_rng(1).bytes(2000))
        put("latin1", "txt", b"caf\xe9")
        put("badjson", "txt", b"fine")
        put("badjson", "json", b"{oops")
    data = first.read_bytes()
    (tmp_path / "bad-000001.tar").write_bytes(data[: len(data) // 2])
    result = validate_shards(str(tmp_path / "bad-{000000..000001}.tar"), workers=2, on_missing="mask")
    reasons = {(b["key"], b["reason"]) for b in result["bad"]}
    assert {("noise", "bad_video"), ("latin1", "bad_text"), ("badjson", "bad_json"), (None, "corrupt_tar")} <= reasons
    # the truncated copy repeats the first keys of the shard: duplicates across shards are bad too
    assert {b["key"] for b in result["bad"] if b["reason"] == "duplicate_key"} <= {s["__key__"] for s in good}
    assert result["good"] == len(good)
    assert cli_main(["shards", "validate", str(tmp_path / "bad-{000000..000001}.tar"), "--on-missing", "mask"]) == 1
    assert "corrupt_tar" in capsys.readouterr().out


def test_inspect_counts_modalities_durations_and_samples(built: dict[str, Any], capsys) -> None:
    info = inspect_shards(built["spec"], n_samples=2)
    samples = built["samples"]
    assert info["samples"] == len(samples) and info["shards"] == len(built["report"]["shards"])
    assert info["sizes_json"] == {"listed": info["shards"], "mismatched": {}}
    assert info["modalities"]["video"] == sum("mp4" in s for s in samples)
    assert info["modalities"]["audio"] == sum("flac" in s for s in samples)
    assert info["modalities"]["text"] == sum("txt" in s for s in samples)
    assert info["durations"]["n"] == sum("mp4" in s or "flac" in s for s in samples)
    assert info["durations"]["min"] == pytest.approx(0.2, abs=0.01) and info["durations"]["max"] == pytest.approx(10)
    assert [e["key"] for e in info["examples"]] == [s["__key__"] for s in samples[:2]]
    assert info["licenses"] == {"CC-BY-4.0": 1} and not info["problems"]
    assert cli_main(["shards", "inspect", built["spec"]]) == 0
    out = capsys.readouterr().out
    assert f"{len(samples)} samples" in out and "modalities: video" in out


def _small_manifest(media: Path, path: Path) -> list:
    rows = [{"key": "a", "video": "h264_silent.mkv", "text": "one"}, {"key": "b", "audio": "mono_8k_0.2s.wav"},
            {"key": "bad", "video": "garbage.mp4"}, {"key": "c", "image": "picture.png"},
            {"key": "d", "text": "only words"}, {"key": "e", "audio": "aac_24k.m4a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_inputs(manifest=str(path), root=str(media))


def test_order_and_bytes_do_not_depend_on_workers_and_a_rerun_resumes(media: Path, tmp_path: Path) -> None:
    items = _small_manifest(media, tmp_path / "small.jsonl")
    shard = ShardOptions(shard_samples=1)
    one = build_shards(items, str(tmp_path / "one"), workers=1, options=OPTIONS, shard=shard, progress=False)
    two = build_shards(items, str(tmp_path / "two"), workers=2, options=OPTIONS, shard=shard, progress=False)
    names = sorted(one["shards"])
    assert names == sorted(two["shards"]) and len(names) == 5 and one["by_reason"] == {"unreadable_media": 1}
    assert [_read(str(tmp_path / "one" / n))[0]["__key__"] for n in names] == ["a", "b", "c", "d", "e"]
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes()

    # an interrupted build: the last two shards are gone; a re-run keeps the others and remakes those
    out = tmp_path / "two"
    kept = {n: (out / n).stat().st_mtime_ns for n in names[:3]}
    for n in names[3:]:
        (out / n).unlink()
    again = build_shards(items, str(out), workers=2, options=OPTIONS, shard=shard, progress=False)
    assert again["run"]["resumed_shards"] == 3 and again["run"]["inputs"] == 2
    assert {n: (out / n).stat().st_mtime_ns for n in names[:3]} == kept
    assert again["shards"] == one["shards"] and again["rejections"] == one["rejections"]
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (out / n).read_bytes()
    done = build_shards(items, str(out), workers=2, options=OPTIONS, shard=shard, progress=False)
    assert done["run"]["inputs"] == 0 and done["shards"] == one["shards"]

    other = EncodeOptions(fps=2, size=32, window=10.0, image_seconds=1.0)
    with pytest.raises(BuildError, match="--overwrite"):
        build_shards(items, str(out), workers=1, options=other, shard=shard, progress=False)
    redone = build_shards(items, str(out), workers=1, options=other, shard=shard, overwrite=True, progress=False)
    assert redone["run"]["resumed_shards"] == 0 and redone["samples"] == 5


def test_pipe_output_streams_every_file_through_the_command(media: Path, tmp_path: Path) -> None:
    items = _small_manifest(media, tmp_path / "small.jsonl")
    dest = tmp_path / "bucket"
    dest.mkdir()
    with pytest.raises(BuildError, match="--state"):
        build_shards(items, f"pipe:cat > {dest}/{{name}}", options=OPTIONS, progress=False)
    report = build_shards(items, f"pipe:cat > {dest}/{{name}}", workers=2, options=OPTIONS,
                          shard=ShardOptions(shard_samples=2), state=str(tmp_path / "state"), progress=False)
    assert sorted(p.name for p in dest.iterdir()) == sorted([*report["shards"], "sizes.json", "shard-report.json"])
    assert json.loads((dest / "sizes.json").read_text()) == report["shards"] == {
        "shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 1}
    assert (tmp_path / "state" / "shard-progress.jsonl").is_file()
    assert [s["__key__"] for s in _read(f"pipe:cat {dest}/{report['pattern']}")] == ["a", "b", "c", "d", "e"]


def test_folder_layout_with_sidecars(media: Path, tmp_path: Path) -> None:
    root = tmp_path / "collection"
    (root / "clips").mkdir(parents=True)
    (root / "sounds").mkdir()
    shutil.copy(media / "vp8_opus_48k.webm", root / "clips" / "street scene.webm")
    (root / "clips" / "street scene.txt").write_text("cars pass by\n")
    (root / "clips" / "street scene.json").write_text(json.dumps({"license": "CC0-1.0", "labels": {"place": "street"},
                                                                  "camera": "phone"}))
    shutil.copy(media / "mp3_44k.mp3", root / "sounds" / "bird.mp3")
    (root / "sounds" / "bird.txt").write_bytes("a bird sings — twice".encode())
    shutil.copy(media / "picture.jpg", root / "sounds" / "cover.jpg")
    shutil.copy(media / "mono_8k_0.2s.wav", root / "sounds" / "cover.wav")
    (root / "words.txt").write_text("a caption without media")
    (root / "notes.md").write_text("not media")
    (root / "latin1.txt").write_bytes(b"caf\xe9")
    (root / "orphan.json").write_text("{}")
    shutil.copy(media / "h264_silent.mkv", root / "twice.mkv")
    shutil.copy(media / "picture.png", root / "twice.png")
    shutil.copy(media / "truncated.mp4", root / "clips" / "broken.mp4")
    (root / "clips" / "bad meta.json").write_text("[1, 2]")
    shutil.copy(media / "h264_silent.mkv", root / "clips" / "bad meta.mkv")
    out = root / "shards"  # inside the folder: left out of the scan

    assert cli_main(["shards", "build", "--folder", str(root), "--out", str(out), "--workers", "2", "--fps", "4",
                     "--size", "32", "--no-progress"]) == 0
    report = json.loads((out / "shard-report.json").read_text())
    assert {r["key"]: r["reason"] for r in report["rejections"]} == {
        "notes_md": "unsupported_file", "latin1": "caption_not_utf8", "orphan": "no_media", "twice": "duplicate_key",
        "clips/broken": "unreadable_media", "clips/bad_meta": "metadata_invalid"}
    assert report["inputs"] == 10 and report["accepted"] == 4
    samples = {s["__key__"]: s for s in _read(str(out / report["pattern"]))}
    assert sorted(samples) == ["clips/street_scene", "sounds/bird", "sounds/cover", "words"]
    street = samples["clips/street_scene"]
    meta = json.loads(street["json"])
    assert street["txt"] == b"cars pass by" and set(street) >= {"mp4", "flac"}
    assert (meta["license"], meta["labels"], meta["extra"]) == ("CC0-1.0", {"place": "street"}, {"camera": "phone"})
    assert samples["sounds/bird"]["txt"].decode() == "a bird sings — twice" and "mp4" not in samples["sounds/bird"]
    assert {"mp4", "flac"} <= set(samples["sounds/cover"])
    assert {k for k in samples["words"] if not k.startswith("__")} == {"txt", "json"}


def test_csv_manifest_with_segments_and_bad_rows(media: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "clips.csv"
    manifest.write_bytes(
        b"video,audio,caption,start,end,label,licence,speaker\n"
        + f"{media}/long_60s.mp4,,opening,0,4,intro,CC-BY,ann\n".encode()
        + f"{media}/long_60s.mp4,,closing,56,60,outro,CC-BY,bob\n".encode()
        + b"," + str(media).encode() + b"/mp3_44k.mp3,caf\xe9,,,,,\n"
        + b"short_0.2s.mp4,,too,many,fields,here,x,y,z\n"
        + b",,text only,,,,,\n")
    items = load_inputs(manifest=str(manifest))
    report = build_shards(items, str(tmp_path / "out"), options=OPTIONS, progress=False)
    assert [(r["source"], r["reason"]) for r in report["rejections"]] == [
        ("clips.csv:4", "caption_not_utf8"), ("clips.csv:5", "bad_manifest_row")]
    samples = _read(str(tmp_path / "out" / report["pattern"]))
    assert [s["__key__"] for s in samples] == [f"{str(media)[1:]}/long_60s_s0".replace(".", "_"),
                                              f"{str(media)[1:]}/long_60s_s56000".replace(".", "_"), "row00000004"]
    metas = [json.loads(s["json"]) for s in samples]
    assert [(m.get("start"), m.get("end"), m["labels"]) for m in metas[:2]] == [
        (0.0, 4.0, {"label": "intro"}), (56.0, 60.0, {"label": "outro"})]
    assert metas[0]["license"] == "CC-BY" and metas[1]["extra"] == {"speaker": "bob"}
    assert samples[2]["txt"] == b"text only"


def test_passthrough_copies_the_video_stream(media: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"key": "x", "video": str(media / "h264_aac_44k_stereo.mp4")}) + "\n"
                        + json.dumps({"key": "y", "video": str(media / "theora_vorbis_32k.ogv")}) + "\n")
    opts = EncodeOptions(fps=4, size=32, passthrough=True)
    report = build_shards(load_inputs(manifest=str(manifest)), str(tmp_path / "out"), options=opts, progress=False)
    x, y = _read(str(tmp_path / "out" / report["pattern"]))
    assert json.loads(x["json"])["encoded"] == {"video": "copy"}
    assert json.loads(y["json"])["encoded"]["video"] == "h264"  # theora cannot be copied into mp4
    with av.open(io.BytesIO(x["mp4"])) as c:
        assert (c.streams.video[0].width, c.streams.video[0].frames) == (32, 10) and not c.streams.audio
    assert soundfile.info(io.BytesIO(x["flac"])).samplerate == 16000


def test_lenient_keeps_what_decodes_and_lists_the_errors(media: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"key": "cut", "video": str(media / "truncated.webm")}) + "\n")
    opts = EncodeOptions(fps=4, size=32, lenient=True)
    report = build_shards(load_inputs(manifest=str(manifest)), str(tmp_path / "out"), options=opts, progress=False)
    assert report["accepted"] == 1 and report["samples"] == 1 and not report["rejections"]
    assert [(w["key"], w["source"]) for w in report["warnings"]] == [("cut", "m.jsonl:1")]
    assert "File ended prematurely" in report["warnings"][0]["warning"]


def test_cli_errors(media: Path, tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "ok.jsonl"
    manifest.write_text(json.dumps({"text": "words"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "mmcl.cli", "shards", "build", "--folder", str(media)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "usage:" in r.stderr and "--out" in r.stderr
    for argv, message in (
            (["--manifest", str(tmp_path / "nope.jsonl")], f"manifest not found: {tmp_path / 'nope.jsonl'}"),
            (["--manifest", str(media / "picture.png")], "unknown format '.png'"),
            (["--folder", str(tmp_path / "nowhere")], "folder not found"),
            (["--manifest", str(manifest), "--size", "33"], "size must be an even number"),
            (["--manifest", str(manifest), "--max-loss", "1.5"], "max-loss must be in [0, 1], got 1.5"),
            (["--manifest", str(manifest), "--background", "not a colour"], "background must be a colour name"),
            (["--manifest", str(manifest), "--out", "pipe:cat"], "needs {name}")):
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "o")]
        assert cli_main(["shards", "build", *argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert cli_main(["shards", "inspect", str(tmp_path / "none-{0..1}.tar")]) == 2
    assert parse_size("64k") == 65536 and parse_size("1G") == 1 << 30
    with pytest.raises(ValueError):
        parse_size("lots")


# ----------------------------------------------------------------------------------------------------
# Valid real-world videos FFmpeg logs errors for when a window is seeked into, damaged media, alpha pictures

#: H.264 with open GOPs and B-frames (x264 ``open-gop``, as many camera and web files are); frame N shows luma
#: 16 + N, so a decoded frame tells the time it came from (N / 10 s).
TIMED = "color=c=black:s=96x64:r=10:d=14,format=yuv420p,geq=lum='16+N':cb=128:cr=128"
OPEN_GOP = ["-c:v", "libx264", "-preset", "veryfast", "-qp", "4", "-x264-params",
            "open-gop=1:keyint=30:min-keyint=30:scenecut=0:bframes=3:b-pyramid=normal"]


@pytest.fixture(scope="module")
def real_class_media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("real_class")
    ffmpeg("-f", "lavfi", "-i", TIMED, *tone(14, 16000), *OPEN_GOP, "-c:a", "aac", "-shortest", str(d / "open_gop.mp4"))
    # MPEG-4 Part 2 with B-frames in an AVI (Xvid style, as opencv's Megamind.avi)
    ffmpeg(*picture(12, "96x64", 25), "-c:v", "mpeg4", "-bf", "2", "-g", "50", "-vtag", "XVID", str(d / "xvid.avi"))
    # a stamp: left half transparent over red pixels, right half opaque blue
    ffmpeg("-f", "lavfi", "-i", "color=c=red:s=40x30,format=rgba,"
           "geq=r='255*lt(X,20)':g=0:b='255*gte(X,20)':a='255*gte(X,20)'", "-frames:v", "1", str(d / "stamp.png"))
    return d


def _build_rows(rows: list[dict[str, Any]], out: Path, opts: EncodeOptions) -> dict[str, Any]:
    manifest = out.with_suffix(".jsonl")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_shards(load_inputs(manifest=str(manifest)), str(out), options=opts, progress=False)


def _luma(mp4: bytes) -> list[float]:
    """Mean luma of each frame (the Y plane as stored); the first frame is presented at time 0 (the sample's
    own timeline starts at its window's start)."""
    with av.open(io.BytesIO(mp4)) as c:
        frames = list(c.decode(video=0))
    assert frames and abs(frames[0].time) < 1e-6
    return [float(f.to_ndarray(format="yuv420p")[: f.height].mean()) for f in frames]


def test_valid_videos_are_kept_with_their_decoder_warnings(real_class_media: Path, tmp_path: Path) -> None:
    """FFmpeg decodes these files whole without an error, yet logs errors when a build seeks into a window
    (an open GOP's leading B-frames, an AVI seek to a B-frame): they are kept, the errors counted as warnings,
    and every window holds its span's frames and audio, starting at the ``start`` its metadata records."""
    for name in ("open_gop.mp4", "xvid.avi"):
        full = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(real_class_media / name), "-f", "null",
                               "-"], capture_output=True, text=True, check=True)
        assert full.stderr == "", name
    rows = [{"key": "open_gop", "video": str(real_class_media / "open_gop.mp4")},
            {"key": "xvid", "video": str(real_class_media / "xvid.avi")}]
    opts = EncodeOptions(fps=10, size=64, window=5.0)
    strict = _build_rows(rows, tmp_path / "strict", dataclasses.replace(opts, strict=True))
    assert strict["by_reason"] == {"decode_error": 2}  # the rule before: any error line rejects
    report = _build_rows(rows, tmp_path / "kept", opts)
    assert report["accepted"] == 2 and report["rejected"] == 0
    assert {w["key"] for w in report["warnings"]} == {"open_gop", "xvid"} and report["warned"] == 2
    assert any("h264" in w["warning"] for w in report["warnings"] if w["key"] == "open_gop")

    samples = {s["__key__"]: s for s in _read(str(tmp_path / "kept" / report["pattern"]))}
    assert sorted(samples) == ["open_gop@0000", "open_gop@0001", "open_gop@0002",
                               "xvid@0000", "xvid@0001", "xvid@0002"]
    for j in range(3):
        s = samples[f"open_gop@{j:04d}"]
        meta = json.loads(s["json"])
        assert meta["start"] == pytest.approx(j * 14 / 3, abs=1e-5) and meta["duration"] == pytest.approx(14 / 3)
        luma = _luma(s["mp4"])
        assert abs(len(luma) - 10 * meta["duration"]) <= 1  # no frame of the window lost
        assert abs((luma[0] - 16) / 10 - meta["start"]) <= 0.1 + 1e-6  # it starts where its metadata says
        assert abs((luma[-1] - 16) / 10 - meta["end"]) <= 0.2 + 1e-6
        assert abs(soundfile.info(io.BytesIO(s["flac"])).frames - 16000 * meta["duration"]) <= 0.05 * 16000


def test_damaged_media_is_rejected_by_what_it_loses(media: Path, tmp_path: Path) -> None:
    rows = [{"key": "cut", "video": str(media / "truncated.webm")}]
    report = _build_rows(rows, tmp_path / "default", OPTIONS)
    (rejection,) = report["rejections"]
    assert rejection["reason"] == "decode_error" and "decoded, more than --max-loss 0.05" in rejection["detail"]
    kept = _build_rows(rows, tmp_path / "all", dataclasses.replace(OPTIONS, max_loss=1.0))
    assert kept["accepted"] == 1 and kept["warned"] == 1


@pytest.mark.parametrize("background, expected", [("white", (255, 255, 255)), ("black", (0, 0, 0))])
def test_pictures_with_alpha_are_laid_over_the_background(real_class_media: Path, tmp_path: Path,
                                                          background: str, expected: tuple[int, ...]) -> None:
    opts = dataclasses.replace(OPTIONS, background=background)
    report = _build_rows([{"key": "stamp", "image": str(real_class_media / "stamp.png")}], tmp_path / "o", opts)
    (sample,) = _read(str(tmp_path / "o" / report["pattern"]))
    with av.open(io.BytesIO(sample["mp4"])) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24").astype(int)
    w = frame.shape[1]
    transparent, opaque = frame[:, : w // 2 - 4], frame[:, w // 2 + 4:]
    assert np.abs(transparent - np.array(expected)).max() <= 12, transparent.mean(axis=(0, 1))  # not red
    assert np.abs(opaque - np.array([0, 0, 255])).max() <= 40, opaque.mean(axis=(0, 1))
