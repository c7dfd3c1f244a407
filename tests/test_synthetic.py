"""The procedural world: real shards written by ``synth``, read back with webdataset and decoded with torchcodec."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import pytest
import sentencepiece as spm
import webdataset as wds
from torchcodec.decoders import AudioDecoder, VideoDecoder

from mmcl.data.synthetic import (
    ATTRIBUTES,
    AUDIO_SECONDS,
    COLOUR_RGB,
    FPS,
    N_FRAMES,
    PAD_ID,
    PITCH_HZ,
    PULSE_RATE,
    SAMPLE_RATE,
    SIZE,
    UNK_ID,
    encode_mp4,
    generate_sample,
    sample_seeds,
    synth,
    train_tokenizer,
    write_split,
)

TRAIN, TEST, PER_SHARD = 16, 8, 6


@pytest.fixture(scope="module")
def simple_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("simple")
    synth(out, train=TRAIN, test=TEST, world="simple", seed=0, workers=2, per_shard=PER_SHARD)
    return out


@pytest.fixture(scope="module")
def joint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("joint")
    synth(out, train=12, test=4, world="joint", seed=3, workers=2, per_shard=8)
    return out


def _read_split(out_dir: Path, split: str) -> list[dict[str, Any]]:
    """All samples of ``split`` via the brace pattern of world.json, in shard order, with ``__url__``."""
    pattern = json.loads((out_dir / "world.json").read_text())["splits"][split]["pattern"]
    return list(wds.WebDataset(str(out_dir / pattern), shardshuffle=False))


def _frames(sample: dict[str, Any]) -> np.ndarray:
    """Decoded video -> float ``[T, H, W, 3]``."""
    decoder = VideoDecoder(sample["mp4"])
    return decoder[:].permute(0, 2, 3, 1).numpy().astype(np.float32)


def _audio(sample: dict[str, Any]) -> np.ndarray:
    """Decoded audio -> float ``[T]`` (checks 16 kHz mono)."""
    decoded = AudioDecoder(sample["flac"]).get_all_samples()
    assert decoded.sample_rate == SAMPLE_RATE and decoded.data.shape[0] == 1
    return decoded.data[0].numpy()


def _track(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centroids ``([T], [T])`` (x, y) of the saturated pixels of each frame, and their median colour [3]."""
    mask = frames.max(-1) - frames.min(-1) > 90  # the background is grey, every shape colour saturated
    assert mask.sum(axis=(1, 2)).min() > 20, "an object is missing from a frame"
    ys, xs = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
    count = mask.sum(axis=(1, 2))
    cx = (mask * xs).sum(axis=(1, 2)) / count
    cy = (mask * ys).sum(axis=(1, 2)) / count
    return cx, cy, np.median(frames[mask], axis=0)


def _check_motion(cx: np.ndarray, cy: np.ndarray, direction: str, min_travel: float) -> None:
    dx = cx[-3:].mean() - cx[:3].mean()
    dy = cy[-3:].mean() - cy[:3].mean()
    along, across = {"left": (-dx, dy), "right": (dx, dy), "up": (-dy, dx), "down": (dy, dx)}[direction]
    assert along > min_travel and abs(across) < 2.0, (direction, dx, dy)


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOUR_RGB, key=lambda name: float(np.sum((np.asarray(COLOUR_RGB[name]) - rgb) ** 2)))


def _dominant_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.argmax(spectrum) * SAMPLE_RATE / len(audio))


def _pulse_hz(audio: np.ndarray) -> float:
    """Rate of the amplitude pulses: peak of the spectrum of the 100 Hz energy envelope, within 1-6 Hz."""
    envelope = np.abs(audio).reshape(-1, SAMPLE_RATE // 100).mean(axis=1)
    spectrum = np.abs(np.fft.rfft(envelope - envelope.mean()))
    freqs = np.fft.rfftfreq(len(envelope), d=0.01)
    band = (freqs >= 1.0) & (freqs <= 6.0)
    return float(freqs[band][np.argmax(spectrum[band])])


def _named(caption: str, names: list[str]) -> list[str]:
    return [name for name in names if re.search(rf"\b{name}", caption)]


def test_generate_sample_contract() -> None:
    for world in ("simple", "joint"):
        sample = generate_sample(7, world)
        assert sample["frames"].dtype == np.uint8 and sample["frames"].shape == (N_FRAMES, SIZE, SIZE, 3)
        assert sample["audio"].dtype == np.float32 and sample["audio"].shape == (int(SAMPLE_RATE * AUDIO_SECONDS),)
        assert 0.5 < np.abs(sample["audio"]).max() < 1.0
        again = generate_sample(7, world)
        assert np.array_equal(sample["frames"], again["frames"]) and np.array_equal(sample["audio"], again["audio"])
        assert sample["caption"] == again["caption"] and sample["labels"] == again["labels"]
    with pytest.raises(ValueError, match="unknown world"):
        generate_sample(0, "nope")


def test_shapes_have_distinct_silhouettes() -> None:
    """Bounding-box fill and top/bottom width tell the four shapes apart on the raw frames."""
    seen = set()
    for seed in range(24):
        sample = generate_sample(seed)
        frame = sample["frames"][0].astype(np.int16)
        ys, xs = np.nonzero(frame.max(-1) - frame.min(-1) > 90)
        height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert 15 <= max(height, width) <= 25
        fill = len(ys) / (height * width)
        top, bottom = (np.sum(ys == ys.min() + int(q * height)) for q in (0.15, 0.85))
        shape = sample["labels"]["shape"]
        seen.add(shape)
        if shape == "square":
            assert fill > 0.95
        elif shape == "circle":
            assert 0.7 < fill < 0.86
        elif shape == "cross":
            assert 0.45 < fill < 0.65 and abs(int(top) - int(bottom)) <= 2
        else:
            assert 0.4 < fill < 0.6 and bottom > 3 * top
    assert seen == set(ATTRIBUTES["shape"])


def test_video_shows_the_labelled_colour_moving_the_labelled_direction(simple_dir: Path) -> None:
    samples = _read_split(simple_dir, "train") + _read_split(simple_dir, "test")
    seen = set()
    for sample in samples:
        labels = json.loads(sample["json"])["labels"]
        frames = _frames(sample)
        assert frames.shape == (N_FRAMES, SIZE, SIZE, 3)
        cx, cy, rgb = _track(frames)
        _check_motion(cx, cy, labels["direction"], min_travel=20.0)
        assert _nearest_colour(rgb) == labels["colour"]
        seen.add(labels["direction"])
    assert seen == set(ATTRIBUTES["direction"])


def test_audio_pitch_is_the_dominant_frequency_and_pulses_follow_direction(simple_dir: Path) -> None:
    for sample in _read_split(simple_dir, "train"):
        labels = json.loads(sample["json"])["labels"]
        audio = _audio(sample)
        assert audio.shape == (int(SAMPLE_RATE * AUDIO_SECONDS),) and np.abs(audio).max() < 1.0
        assert _dominant_hz(audio) == pytest.approx(PITCH_HZ[labels["pitch"]], rel=0.04)
        assert _pulse_hz(audio) == pytest.approx(PULSE_RATE[labels["direction"]], abs=0.26)


def test_json_metadata(simple_dir: Path) -> None:
    for sample in _read_split(simple_dir, "test"):
        meta = json.loads(sample["json"])
        assert {k: v for k, v in meta.items() if k != "labels"} == {
            "duration": AUDIO_SECONDS,
            "fps": FPS,
            "sample_rate": SAMPLE_RATE,
            "world": "simple",
            "source": "mmcl.synthetic",
            "license": "CC0-1.0",
        }
        assert set(meta["labels"]) == set(ATTRIBUTES)
        assert all(meta["labels"][attr] in names for attr, names in ATTRIBUTES.items())


def test_same_seed_gives_identical_files_whatever_the_workers(simple_dir: Path, tmp_path: Path) -> None:
    synth(tmp_path / "one", train=TRAIN, test=TEST, world="simple", seed=0, workers=1, per_shard=PER_SHARD)
    names = sorted(p.name for p in simple_dir.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one").iterdir())
    for name in names:
        assert (simple_dir / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    synth(tmp_path / "other", train=2, test=1, world="simple", seed=1, workers=1)
    assert (tmp_path / "other" / "train-000000.tar").read_bytes()[:4096] != (
        simple_dir / "train-000000.tar"
    ).read_bytes()[:4096]


def test_encode_mp4_is_a_function_of_the_frames() -> None:
    """Repeated encodes of the same frames give the same bytes, also at widths that are not a multiple of
    128 px (where x264's AVX-512 macroblock-tree code read past the row)."""
    for seed in range(3):
        frames = generate_sample(seed)["frames"]
        for width in (SIZE, 96):
            wide = np.ascontiguousarray(np.concatenate([frames, frames], axis=2)[:, :, :width])
            assert len({encode_mp4(wide, FPS) for _ in range(4)}) == 1, (seed, width)


def test_train_and_test_are_disjoint(simple_dir: Path) -> None:
    assert not set(sample_seeds(0, "train", 1000)) & set(sample_seeds(0, "test", 1000))
    train, test = _read_split(simple_dir, "train"), _read_split(simple_dir, "test")
    assert [s["__key__"] for s in train] == [f"train-{i:07d}" for i in range(TRAIN)]
    assert [s["__key__"] for s in test] == [f"test-{i:07d}" for i in range(TEST)]
    for member in ("mp4", "flac"):
        digests = [{hashlib.sha256(s[member]).hexdigest() for s in split} for split in (train, test)]
        assert len(digests[0]) == TRAIN and len(digests[1]) == TEST and not digests[0] & digests[1]


def test_sizes_and_world_json_match_the_shards(simple_dir: Path) -> None:
    sizes = json.loads((simple_dir / "sizes.json").read_text())
    assert set(sizes) == {p.name for p in simple_dir.glob("*.tar")}
    assert not list(simple_dir.glob("*.partial"))
    counts: dict[str, int] = {}
    world = json.loads((simple_dir / "world.json").read_text())
    assert world["world"] == "simple" and world["seed"] == 0 and world["attributes"] == ATTRIBUTES
    for split, n in (("train", TRAIN), ("test", TEST)):
        assert world["splits"][split]["n"] == n
        shards = list(braceexpand.braceexpand(world["splits"][split]["pattern"]))
        assert shards == sorted(name for name in sizes if name.startswith(f"{split}-"))
        for sample in _read_split(simple_dir, split):
            name = Path(sample["__url__"]).name
            counts[name] = counts.get(name, 0) + 1
    assert counts == sizes
    assert sum(v for k, v in sizes.items() if k.startswith("train-")) == TRAIN


def test_captions_name_the_labels_and_tokenize_without_unk(simple_dir: Path) -> None:
    tokenizer = spm.SentencePieceProcessor(model_file=str(simple_dir / "tokenizer.model"))
    assert tokenizer.id_to_piece(PAD_ID) == "<pad>" and tokenizer.unk_id() == UNK_ID
    assert tokenizer.bos_id() == -1 and tokenizer.eos_id() == -1 and tokenizer.get_piece_size() <= 256
    for sample in _read_split(simple_dir, "train") + _read_split(simple_dir, "test"):
        caption = sample["txt"].decode("utf-8")
        labels = json.loads(sample["json"])["labels"]
        for attr, names in ATTRIBUTES.items():
            assert _named(caption, names) == [labels[attr]], (caption, attr)
        ids = tokenizer.encode(caption)
        assert UNK_ID not in ids and PAD_ID not in ids
        assert tokenizer.decode(ids) == caption


def test_tokenizer_from_a_tiny_corpus_still_has_no_unk(tmp_path: Path) -> None:
    path = train_tokenizer(["a red circle moves up while a low flute note plays"], tmp_path / "t.model")
    tokenizer = spm.SentencePieceProcessor(model_file=str(path))
    for world in ("simple", "joint"):
        for seed in range(30):
            assert UNK_ID not in tokenizer.encode(generate_sample(seed, world)["caption"])


def test_captions_are_varied() -> None:
    skeletons = set()
    for seed in range(150):
        caption = generate_sample(seed)["caption"]
        for names in ATTRIBUTES.values():
            caption = re.sub(rf"\b({'|'.join(names)})\w*", "X", caption)
        skeletons.add(re.sub(r"\b(an?|to the) X", "X", caption))
    assert len(skeletons) >= 20


def test_joint_world_caption_names_exactly_the_object_the_pitch_selects(joint_dir: Path) -> None:
    world = json.loads((joint_dir / "world.json").read_text())
    assert world["world"] == "joint" and world["attributes"]["pitch"] == ["low", "high"]
    tokenizer = spm.SentencePieceProcessor(model_file=str(joint_dir / "tokenizer.model"))
    named_seen = set()
    for sample in _read_split(joint_dir, "train") + _read_split(joint_dir, "test"):
        meta = json.loads(sample["json"])
        labels, caption = meta["labels"], sample["txt"].decode("utf-8")
        assert meta["world"] == "joint"
        objects, named = labels["objects"], labels["named"]
        assert named == ["low", "high"].index(labels["pitch"])
        assert objects[0]["colour"] != objects[1]["colour"] and objects[0]["shape"] != objects[1]["shape"]
        assert {k: labels[k] for k in ("colour", "shape", "direction")} == objects[named]
        for attr in ("colour", "shape", "direction"):
            assert _named(caption, ATTRIBUTES[attr]) == [objects[named][attr]], caption
        assert not _named(caption, ATTRIBUTES["pitch"] + ATTRIBUTES["timbre"])
        assert UNK_ID not in tokenizer.encode(caption)
        frames = _frames(sample)
        for k, obj in enumerate(objects):  # object 0 in the left half, object 1 in the right half
            cx, cy, rgb = _track(frames[:, :, k * SIZE // 2 : (k + 1) * SIZE // 2])
            _check_motion(cx, cy, obj["direction"], min_travel=10.0)
            assert _nearest_colour(rgb) == obj["colour"]
        assert _dominant_hz(_audio(sample)) == pytest.approx(PITCH_HZ[labels["pitch"]], rel=0.04)
        named_seen.add(named)
    assert named_seen == {0, 1}


def test_synth_summary_and_argument_errors(tmp_path: Path) -> None:
    summary = json.loads(json.dumps(synth(tmp_path / "s", train=2, test=1, workers=1)))
    world = json.loads((tmp_path / "s" / "world.json").read_text())
    assert {k: summary[k] for k in world} == world
    assert [Path(p).name for p in summary["shards"]["train"]] == ["train-000000.tar"]
    assert summary["seconds"] > 0
    with pytest.raises(ValueError, match="unknown world"):
        synth(tmp_path / "bad", train=2, test=1, world="nope")
    with pytest.raises(ValueError, match="test >= 1"):
        synth(tmp_path / "empty", train=2, test=0)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "empty").exists()
    with pytest.raises(ValueError, match="per_shard >= 1"):
        write_split(tmp_path / "w", "train", 3, seed=0, per_shard=0)
