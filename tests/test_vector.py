"""The vector modality: decoding ``.npy`` members, standardisation, the MLP tower, bad arrays skipped and
counted by the loader, and a 4-modality model (video, audio, text + a vector) trained with every objective
on real shards."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from mmcl.config import CONFIG_DIR, Config, ConfigError, from_dict
from mmcl.data.shards import build_loader
from mmcl.data.synthetic import ATTRIBUTES
from mmcl.modalities import SampleError, available_modalities, build_processor, build_tower
from mmcl.modalities.base import MissingModality
from mmcl.model import MultimodalModel
from mmcl.train.loop import train


def npy(array: Any) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def vector(name: str = "feat", **spec: Any):
    return build_processor(name, {"kind": "vector", "dim": 4, **spec})


def test_registered_and_configured_by_kind():
    assert "vector" in available_modalities()
    with pytest.raises(ConfigError, match=r"model.modalities.feat.dim: required field is missing"):
        build_processor("feat", {"kind": "vector"})
    with pytest.raises(ConfigError, match=r"feat.tower.activation: 'swish' is not allowed"):
        vector(tower={"activation": "swish"})
    with pytest.raises(ConfigError, match=r"feat.mean: standardize 'features' needs 4 values"):
        vector(standardize="features", mean=[0.0], std=[1.0])
    with pytest.raises(ConfigError, match=r"std > 0"):
        vector(standardize="features", mean=[0.0] * 4, std=[1.0, 1.0, 0.0, 1.0])
    with pytest.raises(ConfigError, match=r"only used with standardize 'features'"):
        vector(mean=[0.0] * 4)


def test_decode_reads_its_own_member_as_float32():
    mod = vector()
    for array in (np.arange(4, dtype=np.float64), np.arange(4, dtype=np.int16), np.array([True, False] * 2)):
        out = mod.decode({"feat.npy": npy(array), "other.npy": npy(np.zeros(3))})
        assert out.dtype == torch.float32 and out.shape == (4,)
        torch.testing.assert_close(out, torch.from_numpy(array.astype(np.float32)))
    renamed = vector(member="Emb.NPY")
    assert renamed.decode({"emb.npy": npy(np.ones(4))}).tolist() == [1.0] * 4  # members are lower-cased
    with pytest.raises(MissingModality) as missing:
        renamed.decode({"feat.npy": npy(np.ones(4))})
    assert missing.value.reason == "missing_feat"


@pytest.mark.parametrize("array, detail", [
    (np.zeros(5), "expected shape (4,), got (5,)"),
    (np.zeros((1, 4)), "expected shape (4,), got (1, 4)"),
    (np.float32(1.0), "expected shape (4,), got ()"),
    (np.array([0.0, np.nan, 0.0, 0.0]), "non-finite"),
    (np.array([0.0, 0.0, -np.inf, 0.0]), "non-finite"),
    (np.array([1e300, 0.0, 0.0, 0.0]), "non-finite"),  # beyond float32
    (np.array(["a", "b", "c", "d"]), "real numeric"),
    (np.zeros(4, dtype=np.complex64), "real numeric"),
])
def test_bad_arrays_are_sample_errors(array: np.ndarray, detail: str):
    with pytest.raises(SampleError, match=re.escape(detail)) as err:
        vector().decode({"feat.npy": npy(array)})
    assert err.value.reason == "bad_feat"


def test_unreadable_and_pickled_members_are_sample_errors():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}] * 4, dtype=object), allow_pickle=True)
    for data in (b"not an npy file", npy(np.zeros(4))[:-8], buffer.getvalue()):
        with pytest.raises(SampleError, match="unreadable npy") as err:
            vector().decode({"feat.npy": data})
        assert err.value.reason == "bad_feat"


def test_standardisation():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.equal(vector().transform(x, train=True), x)
    per_sample = vector(standardize="sample").transform(x, train=False)
    torch.testing.assert_close(per_sample.mean(), torch.tensor(0.0))
    torch.testing.assert_close(per_sample.std(correction=0), torch.tensor(1.0), atol=1e-5, rtol=0)
    features = vector(standardize="features", mean=[1.0, 0.0, 3.0, 2.0], std=[1.0, 2.0, 0.5, 4.0])
    torch.testing.assert_close(features.transform(x, train=False), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.equal(vector().empty(), torch.zeros(4))


@pytest.mark.parametrize("depth, activation", [(0, "gelu"), (1, "relu"), (3, "tanh")])
def test_tower_shapes(depth: int, activation: str):
    mod = vector(tower={"hidden": 16, "depth": depth, "activation": activation})
    tower = build_tower(mod)
    assert tower.out_dim == (4 if depth == 0 else 16)
    assert len(tower.blocks()) == depth
    x = mod.collate([mod.transform(torch.randn(4), train=True) for _ in range(5)])
    assert x.shape == (5, 4)
    assert tower(x).shape == (5, tower.out_dim)
    if depth == 0:
        assert torch.equal(tower(x), x)


def test_model_with_a_linear_vector_tower_is_linear():
    spec = {"embed_dim": 8, "modalities": {m: {"kind": "vector", "dim": 4, "tower": {"depth": 0}} for m in "ab"}}
    model = MultimodalModel(from_dict(Config, {"model": spec}).model)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    z = lambda v: model.encode({"a": v}, normalize=False)["a"]  # noqa: E731
    torch.testing.assert_close(z(2 * x + y), 2 * z(x) + z(y))


def test_bad_arrays_are_skipped_and_counted_by_the_loader(tmp_path: Path):
    good = {"feat.npy": npy(np.ones(4, np.float32)), "aux.npy": npy(np.zeros(2))}
    samples = [
        ("good-0", good),
        ("wrong-dim", {**good, "feat.npy": npy(np.ones(3))}),
        ("nan", {**good, "feat.npy": npy(np.array([1.0, np.nan, 1.0, 1.0]))}),
        ("good-1", good),
        ("garbage", {**good, "feat.npy": b"\x93NUMPY garbage"}),
        ("bad-aux", {**good, "aux.npy": npy(np.ones((2, 2)))}),
        ("no-feat", {"aux.npy": good["aux.npy"]}),
        ("good-2", good),
    ]
    with wds.TarWriter(str(tmp_path / "v-000000.tar"), encoder=False) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    mods = {"feat": vector(), "aux": build_processor("aux", {"kind": "vector", "dim": 2})}
    loader = build_loader(str(tmp_path / "v-000000.tar"), mods, 2, train=False)
    batches = list(loader)
    assert [k for b in batches for k in b["keys"]] == ["good-0", "good-1", "good-2"]
    assert loader.skipped == Counter({"bad_feat": 3, "bad_aux": 1, "missing_feat": 1})
    assert batches[0]["inputs"]["feat"].shape == (2, 4) and batches[0]["inputs"]["aux"].shape == (2, 2)


# ---------------------------------------------------------------------------------------------------
# Four modalities: the simple world plus a vector carrying the one-hot labels


LABELLED = ("colour", "shape", "direction")
ONE_HOT_DIM = sum(len(ATTRIBUTES[a]) for a in LABELLED)


def one_hot(labels: dict[str, str]) -> np.ndarray:
    """The concatenated one-hot codes of the labelled attributes, float32 ``[ONE_HOT_DIM]`` (14)."""
    return np.concatenate([np.eye(len(ATTRIBUTES[a]), dtype=np.float32)[ATTRIBUTES[a].index(labels[a])]
                           for a in LABELLED])


@pytest.fixture(scope="module")
def four_modal_data(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's simple-world shards with a ``labels.npy`` member added to every sample."""
    out = tmp_path_factory.mktemp("four")
    for shard in sorted(synthetic_data.glob("*.tar")):
        with wds.TarWriter(str(out / shard.name), encoder=False) as writer:
            for s in wds.WebDataset(str(shard), shardshuffle=False):
                sample = {k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
                sample["labels.npy"] = npy(one_hot(json.loads(sample["json"])["labels"]))
                writer.write(sample)
    return out


@pytest.mark.parametrize("objective", ["clip", "siglip", "symile", "gram"])
def test_four_modalities_train_with_every_objective(four_modal_data: Path, synthetic_data: Path, tmp_path: Path,
                                                    objective: str):
    spec = yaml.safe_load((CONFIG_DIR / "models" / "tiny.yaml").read_text())
    spec["modalities"]["text"]["tokenizer"] = str(synthetic_data / "tokenizer.model")
    spec["modalities"]["labels"] = {"kind": "vector", "dim": ONE_HOT_DIM, "tower": {"hidden": 32, "depth": 1}}
    cfg = from_dict(Config, {
        "model": spec,
        "objective": {"name": objective, "anchor": "text", "negatives": "n"},
        "data": {"train": str(four_modal_data / "train-{000000..000003}.tar"), "batch_size": 8,
                 "shuffle_buffer": 8},
        "train": {"steps": 2, "warmup_steps": 1, "log_every": 1, "progress": False},
    })
    summary = train(cfg, tmp_path)
    assert summary["train"]["steps"] == 2 and summary["data"]["skipped"] == {}
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    model = MultimodalModel.from_pretrained(tmp_path / "final")
    assert model.modality_names == ["video", "audio", "text", "labels"]
    assert model.processors["labels"].cfg.dim == ONE_HOT_DIM
    with torch.no_grad():
        emb = model.encode({"labels": torch.from_numpy(np.stack([one_hot({"colour": "red", "shape": "cross",
                                                                            "direction": "up"})]))})
    assert emb["labels"].shape == (1, spec["embed_dim"])
