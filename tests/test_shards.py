"""The streaming shard pipeline on real shards: every bad sample skipped and counted exactly (across
loader workers too), missing modalities masked, spec errors, deterministic order, batch shapes, the cache,
and ``mmcl shards validate`` giving the training loader's verdict on every sample."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from data_tools.check import validate_shards
from mmcl.data.shards import DataError, Loader, build_loader, check_shard_split, expand_shards
from mmcl.modalities import Processor, build_processor

TINY = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"

#: Skip counts per epoch of the bad-sample shards below.
BAD_REASONS = {
    "bad_video": 2,  # random-bytes mp4, truncated mp4
    "bad_audio": 1,  # undecodable flac
    "missing_text": 1,
    "missing_video": 1,
    "bad_text": 1,  # not UTF-8
    "empty_text": 1,
    "duplicate_member": 1,
    "corrupt_tar": 1,  # the truncated shard, once
}


def _spec(data: Path, split: str) -> str:
    return str(data / json.loads((data / "world.json").read_text())["splits"][split]["pattern"])


def _samples(shard: Path) -> list[dict[str, Any]]:
    """The samples of a real shard as ``TarWriter`` input (members and ``__key__`` only)."""
    return [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
            for s in wds.WebDataset(str(shard), shardshuffle=False)]


def _keys(loader: Loader, epoch: int) -> list[str]:
    loader.set_epoch(epoch)
    return [key for batch in loader for key in batch["keys"]]


@pytest.fixture(scope="module")
def modalities(synthetic_data: Path) -> dict[str, Processor]:
    """The tiny model's modalities, reading the dataset's tokenizer."""
    specs = yaml.safe_load(TINY.read_text())["modalities"]
    specs["text"]["tokenizer"] = str(synthetic_data / "tokenizer.model")
    return {name: build_processor(name, spec) for name, spec in specs.items()}


@pytest.fixture(scope="module")
def bad_shards(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, set[str]]:
    """Two shards: one with a sample of each bad kind between good ones, one real shard cut in the
    middle of a member. Returns (spec, keys of the good samples)."""
    out = tmp_path_factory.mktemp("bad")
    pool = iter(_samples(synthetic_data / "train-000000.tar"))
    rng = np.random.default_rng(0)
    good: set[str] = set()

    def take(key: str) -> dict[str, Any]:
        return {**next(pool), "__key__": key}

    with wds.TarWriter(str(out / "mixed-000000.tar"), encoder=False) as writer:
        def put_good() -> None:
            sample = take(f"good-{len(good)}")
            good.add(sample["__key__"])
            writer.write(sample)

        put_good()
        s = take("bad-random-mp4")
        writer.write({**s, "mp4": rng.bytes(len(s["mp4"]))})
        put_good()
        s = take("bad-truncated-mp4")
        writer.write({**s, "mp4": s["mp4"][: len(s["mp4"]) // 2]})
        put_good()
        writer.write({**take("bad-flac"), "flac": rng.bytes(4000)})
        writer.write({k: v for k, v in take("bad-no-txt").items() if k != "txt"})
        put_good()
        writer.write({k: v for k, v in take("bad-no-mp4").items() if k != "mp4"})
        writer.write({**take("bad-utf8"), "txt": b"a red circle \xff\xfe moves"})
        put_good()
        writer.write({**take("bad-empty-txt"), "txt": b" \n "})
        s = take("bad-duplicate")
        writer.write(s)
        writer.write({"__key__": s["__key__"], "txt": b"a second caption"})
        put_good()

    real = synthetic_data / "train-000001.tar"
    with tarfile.open(real) as tar:
        members = tar.getmembers()
    cut = members[10]  # members go flac, json, mp4, txt: the mp4 of the third sample
    assert cut.name == "train-0000018.mp4"
    (out / "mixed-000001.tar").write_bytes(real.read_bytes()[: cut.offset_data + cut.size // 2])
    good |= {"train-0000016", "train-0000017"}  # the samples before the cut one
    return str(out / "mixed-{000000..000001}.tar"), good


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted_exactly(bad_shards: tuple[str, set[str]],
                                                     modalities: dict[str, Processor], workers: int) -> None:
    spec, good = bad_shards
    assert len(good) == 8
    loader = build_loader(spec, modalities, 3, train=True, workers=workers, shuffle_buffer=8, seed=1)
    for epoch in range(2):
        keys = _keys(loader, epoch)
        assert sorted(keys) == sorted(good)  # each good sample exactly once, no bad or partial one
        assert loader.skipped == Counter({r: n * (epoch + 1) for r, n in BAD_REASONS.items()})


@pytest.mark.parametrize("workers", [0, 2])
def test_cached_epochs_resume_into_the_uninterrupted_order(bad_shards: tuple[str, set[str]],
                                                          modalities: dict[str, Processor], workers: int) -> None:
    """``data.cache``: an epoch after the first is read from the cache in an order drawn from (seed, epoch)
    (per rank and worker) alone, so a fresh loader (a run resumed in epoch 2: empty cache) reads the same
    batches, the same tensors and the same skip counts as the loader that cached epoch 0. The audio crops
    draw from the global RNG: the trainer restores it at each epoch start (``manual_seed`` here), and the
    persistent workers, started in epoch 0 by one loader and in epoch 2 by the other, reseed it per epoch."""
    spec, good = bad_shards

    def epoch_of(loader: Loader, epoch: int) -> tuple[list[list[str]], list[dict], Counter]:
        loader.skipped.clear()
        loader.set_epoch(epoch)
        torch.manual_seed(100 + epoch)
        batches = list(loader)
        return [b["keys"] for b in batches], [b["inputs"] for b in batches], Counter(loader.skipped)

    def fresh() -> Loader:
        return build_loader(spec, modalities, 3, train=True, workers=workers, shuffle_buffer=8, seed=1, cache=True)

    run = fresh()
    epochs = [epoch_of(run, e) for e in range(4)]
    for keys, _, skipped in epochs:
        assert sorted(k for b in keys for k in b) == sorted(good)
        assert skipped == Counter(BAD_REASONS)  # counted every epoch, as without the cache
    assert epochs[2][0] != epochs[3][0] != epochs[1][0]
    resumed = fresh()
    for e in (2, 3):
        keys, inputs, skipped = epoch_of(resumed, e)
        assert keys == epochs[e][0] and skipped == epochs[e][2]
        for a, b in zip(inputs, epochs[e][1]):
            assert all(torch.equal(a[m], b[m]) for m in ("video", "audio", "text"))


def test_missing_modality_is_masked(synthetic_data: Path, modalities: dict[str, Processor],
                                    tmp_path: Path) -> None:
    samples = _samples(synthetic_data / "test-000000.tar")[:6]
    no_audio, bad_json = samples[2]["__key__"], samples[4]["__key__"]
    del samples[2]["flac"]  # the mp4 has no audio track: audio is missing, not bad
    samples[4]["json"] = b"{not json"
    with wds.TarWriter(str(tmp_path / "mask.tar"), encoder=False) as writer:
        for s in samples:
            writer.write(s)
    spec = str(tmp_path / "mask.tar")

    loader = build_loader(spec, modalities, 8, train=False, on_missing="mask", with_meta=True)
    (batch,) = list(loader)
    assert batch["keys"] == [s["__key__"] for s in samples if s["__key__"] != bad_json]
    assert loader.skipped == Counter({"bad_json": 1})
    audio = batch["present"]["audio"]
    assert audio.dtype == torch.bool
    assert audio.tolist() == [k != no_audio for k in batch["keys"]]
    assert batch["present"]["video"].all() and batch["present"]["text"].all()
    assert not batch["inputs"]["audio"][batch["keys"].index(no_audio)].any()
    assert all(set(m["labels"]) >= {"colour", "shape", "direction"} for m in batch["meta"])

    skipping = build_loader(spec, modalities, 8, train=False)
    assert no_audio not in _keys(skipping, 0)
    assert skipping.skipped == Counter({"missing_audio": 1})


def test_shard_spec_errors(synthetic_data: Path, modalities: dict[str, Processor]) -> None:
    missing = synthetic_data / "nope-000000.tar"
    with pytest.raises(DataError, match=str(missing)):
        build_loader(str(missing), modalities, 4, train=True)
    with pytest.raises(DataError, match="train-000004.tar"):
        expand_shards(str(synthetic_data / "train-{000000..000009}.tar"))
    for empty in ("", "  "):
        with pytest.raises(DataError, match="empty"):
            build_loader(empty, modalities, 4, train=True)

    spec = _spec(synthetic_data, "train")  # 4 shards
    with pytest.raises(DataError, match=r"4 shard\(s\).*need at least 8"):
        build_loader(spec, modalities, 4, train=True, workers=2, world=4)
    with pytest.raises(DataError, match="need at least 5"):
        build_loader(spec, modalities, 4, train=True, workers=0, world=5)
    build_loader(spec, modalities, 4, train=True, workers=2, world=2)
    check_shard_split(expand_shards(spec), world=4, workers=2, resample=True)


def test_order_is_deterministic(synthetic_data: Path, modalities: dict[str, Processor]) -> None:
    text = {"text": modalities["text"]}  # order does not depend on the modalities: the cheapest one
    spec = _spec(synthetic_data, "train")

    def order(epoch: int, seed: int = 0, workers: int = 0, train: bool = True) -> list[str]:
        loader = build_loader(spec, text, 8, train=train, workers=workers, shuffle_buffer=32, seed=seed)
        return _keys(loader, epoch)

    file_order = [f"train-{i:07d}" for i in range(64)]
    first = order(3)
    assert sorted(first) == file_order and first != file_order
    assert order(3) == first
    assert order(4) != first and sorted(order(4)) == file_order
    assert order(3, seed=1) != first
    assert order(3, workers=2) == order(3, workers=2)
    assert order(0, train=False) == file_order
    assert order(5, train=False) == file_order


def test_batch_shapes_and_dtypes(synthetic_data: Path, modalities: dict[str, Processor]) -> None:
    cfg = yaml.safe_load(TINY.read_text())["modalities"]
    v, a, t = cfg["video"], cfg["audio"], cfg["text"]
    patch = a["tower"]["patch"]
    mel_frames = (int(a["seconds"] * 16000) // 160 + 1) // patch * patch  # 16 kHz, hop 160 (defaults)
    loader = build_loader(_spec(synthetic_data, "test"), modalities, 8, train=False)
    batches = list(loader)
    assert [len(b["keys"]) for b in batches] == [8, 8, 8, 8]
    assert loader.skipped == Counter()
    for batch in batches:
        inputs = batch["inputs"]
        assert inputs["video"].shape == (8, v["frames"], 3, v["size"], v["size"])
        assert inputs["video"].dtype == torch.float32
        assert inputs["audio"].shape == (8, 1, a["n_mels"], mel_frames)
        assert inputs["audio"].dtype == torch.float32
        assert inputs["text"].shape == (8, t["max_len"])
        assert inputs["text"].dtype == torch.int64
        assert all(torch.isfinite(inputs[m]).all() for m in ("video", "audio"))
        assert (inputs["text"][:, 0] != 0).all()  # every caption has tokens (pad id 0)
        for present in batch["present"].values():
            assert present.dtype == torch.bool and present.shape == (8,) and present.all()


def test_cache_serves_later_epochs_without_the_shards(synthetic_data: Path, modalities: dict[str, Processor],
                                                      tmp_path: Path) -> None:
    for name in ("test-000000.tar", "test-000001.tar", "sizes.json"):
        shutil.copy(synthetic_data / name, tmp_path / name)
    shards = [tmp_path / "test-000000.tar", tmp_path / "test-000001.tar"]
    spec = str(tmp_path / "test-{000000..000001}.tar")
    evaluation = build_loader(spec, modalities, 8, train=False, cache=True)
    training = build_loader(spec, {"text": modalities["text"]}, 8, train=True, cache=True, shuffle_buffer=16)
    assert evaluation.size == 32
    first = list(evaluation)
    first_keys = _keys(training, 0)
    for shard in shards:
        shard.unlink()

    again = list(evaluation)
    assert [b["keys"] for b in again] == [b["keys"] for b in first]
    for old, new in zip(first, again):
        for name, tensor in old["inputs"].items():
            assert torch.equal(new["inputs"][name], tensor)
    later = _keys(training, 1)
    assert sorted(later) == sorted(first_keys) and len(set(later)) == 32
    assert training.skipped == Counter() and evaluation.skipped == Counter()


def test_unreadable_shards_are_counted(synthetic_data: Path, modalities: dict[str, Processor],
                                       tmp_path: Path) -> None:
    for name in ("test-000000.tar", "test-000001.tar"):
        shutil.copy(synthetic_data / name, tmp_path / name)
    (tmp_path / "test-000002.tar").write_text("not a tar\n" * 100)
    text = {"text": modalities["text"]}
    loader = build_loader(str(tmp_path / "test-{000000..000002}.tar"), text, 8, train=False)
    assert len(_keys(loader, 0)) == 32 and loader.skipped == Counter({"corrupt_tar": 1})
    (tmp_path / "test-000001.tar").unlink()  # gone after the spec was checked
    assert len(_keys(loader, 1)) == 16
    assert loader.skipped == Counter({"corrupt_tar": 2, "unreadable_shard": 1})


@pytest.fixture(scope="module")
def verdict_shards(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str | None]]:
    """A shard of real samples of every kind, good and bad, and a real shard cut in a member. Returns (spec,
    {key: the reason its sample is skipped under on_missing skip, None when good}); the cut sample is in
    neither (no reader sees it: it counts as the shard's ``corrupt_tar``)."""
    out = tmp_path_factory.mktemp("verdicts")
    pool = iter(_samples(synthetic_data / "train-000002.tar"))
    verdicts: dict[str, str | None] = {}

    def drop(ext: str) -> Any:
        return lambda s: {k: v for k, v in s.items() if k != ext}

    with wds.TarWriter(str(out / "verdict-000000.tar"), encoder=False) as writer:
        def put(key: str, reason: str | None, change: Any = dict) -> None:
            writer.write(change({**next(pool), "__key__": key}))
            verdicts[key] = reason

        put("good-0", None)
        put("no-txt", "missing_text", drop("txt"))
        put("corrupt-mp4", "bad_video", lambda s: {**s, "mp4": s["mp4"][: len(s["mp4"]) // 3]})
        no_flac = {**next(pool), "__key__": "no-flac"}
        with av.open(io.BytesIO(no_flac["mp4"])) as container:
            assert not container.streams.audio  # the mp4 has no audio track: without the flac, no audio at all
        writer.write(drop("flac")(no_flac))
        verdicts["no-flac"] = "missing_audio"
        put("good-1", None)
        put("latin1", "bad_text", lambda s: {**s, "txt": b"a green square \xe9\xff moves"})
        put("empty-txt", "empty_text", lambda s: {**s, "txt": b"  \n"})
        put("duplicate", "duplicate_member")
        writer.write({"__key__": "duplicate", "flac": _samples(synthetic_data / "train-000000.tar")[0]["flac"]})
        put("good-2", None)

    real = synthetic_data / "train-000003.tar"
    with tarfile.open(real) as tar:
        members = tar.getmembers()
    cut = members[9]  # flac, json, mp4, txt per sample: the json of the third sample
    (out / "verdict-000001.tar").write_bytes(real.read_bytes()[: cut.offset_data + cut.size // 2])
    verdicts.update({m.name.split(".")[0]: None for m in members[:8]})
    return str(out / "verdict-{000000..000001}.tar"), verdicts


@pytest.mark.parametrize("on_missing", ["skip", "mask"])
def test_validate_gives_the_loaders_verdict_on_every_sample(verdict_shards: tuple[str, dict[str, str | None]],
                                                            modalities: dict[str, Modality], synthetic_data: Path,
                                                            on_missing: str) -> None:
    spec, verdicts = verdict_shards
    if on_missing == "mask":  # a sample lacking a modality is kept, masked
        verdicts = {k: None if r and r.startswith("missing_") else r for k, r in verdicts.items()}
    bad = {k: r for k, r in verdicts.items() if r is not None}
    good = sorted(k for k, r in verdicts.items() if r is None)
    assert len(good) == (3 if on_missing == "skip" else 5) + 2

    loader = build_loader(spec, modalities, 3, train=True, shuffle_buffer=4, seed=2, on_missing=on_missing)
    assert sorted(_keys(loader, 0)) == good
    result = validate_shards(spec, tokenizer=str(synthetic_data / "tokenizer.model"), on_missing=on_missing)
    assert {b["key"]: b["reason"] for b in result["bad"] if b["key"] is not None} == bad
    assert [(b["shard"], b["reason"]) for b in result["bad"] if b["key"] is None] == [
        (spec.replace("{000000..000001}", "000001"), "corrupt_tar")]
    assert result["good"] == len(good) and result["samples"] == len(verdicts)
    assert loader.skipped == Counter(b["reason"] for b in result["bad"]) == Counter({**Counter(bad.values()),
                                                                                      "corrupt_tar": 1})


def test_sample_context_draws_are_a_function_of_seed_epoch_key_purpose_alone():
    import subprocess
    import sys

    from mmcl.data.context import SampleContext

    ctx = SampleContext("clip-000001", epoch=2, seed=7, train=True)
    here = ctx.seed_for("window")
    # the same in another interpreter (Python's str hash is salted per process; this must not be)
    code = ("from mmcl.data.context import SampleContext;"
            "print(SampleContext('clip-000001', epoch=2, seed=7, train=True).seed_for('window'))")
    there = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert here == there
    assert 0 <= here < 2**63
    others = {SampleContext("clip-000002", 2, 7, True).seed_for("window"),
              SampleContext("clip-000001", 3, 7, True).seed_for("window"),
              SampleContext("clip-000001", 2, 8, True).seed_for("window"),
              ctx.seed_for("augment.video")}
    assert here not in others and len(others) == 4
    a = torch.rand(4, generator=ctx.generator("window"))
    assert torch.equal(a, torch.rand(4, generator=SampleContext("clip-000001", 2, 7, False).generator("window")))
    assert ctx.random("x").random() == ctx.random("x").random()


def test_drop_last_in_training_only(synthetic_data: Path, modalities: dict[str, Processor]) -> None:
    """32 test samples in batches of 10: training drops the last 2 (and still counts skipped samples),
    eval keeps them whatever it is asked."""
    spec = _spec(synthetic_data, "test")
    text = {"text": modalities["text"]}
    sizes = {}
    for train, drop in ((True, True), (True, False), (False, True)):
        loader = build_loader(spec, text, 10, train=train, drop_last=drop, shard_shuffle=False, shuffle_buffer=0)
        sizes[train, drop] = [len(b["keys"]) for b in loader]
    assert sizes == {(True, True): [10, 10, 10], (True, False): [10, 10, 10, 2], (False, True): [10, 10, 10, 2]}
