"""Issue #3, the higher-order advantage shown on data: on data where every pair of modalities is independent
but the three together are not, pairwise CLIP stays at chance while Symile and GRAM learn the relation.

* Symile's XOR set (``world="xor"``): query (a, b) jointly, retrieve c; accuracy of c's bit (chance 0.5).
* The joint world: query (video, text) jointly, retrieve the audio; accuracy of its pitch, i.e. of which
  object the caption names (chance 0.5; audio is independent of video and of text alone).

Same data, model, steps and recipe for every objective (``configs/train/{xor,joint}.yaml``); only
``objective.name`` changes. The trainings are ``slow`` tests; the XOR world itself, the CLI and training
with missing modalities are fast ones.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

from mmcl.cli import main as mmcl_main
from mmcl.config import CONFIG_DIR, load_config
from mmcl.data.shards import build_loader
from mmcl.data.synthetic import XOR_DIM, XOR_MODALITIES, generate_sample, synth
from mmcl.model import MultimodalModel
from mmcl.train.loop import train

OBJECTIVES = ("clip", "symile", "gram")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The xor recipe sets ``train.threads``, which sets torch's thread count for the whole process."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _spec(data: Path, split: str) -> str:
    return str(data / json.loads((data / "world.json").read_text())["splits"][split]["pattern"])


def _labels(data: Path, split: str) -> list[dict[str, Any]]:
    return [json.loads(s["json"])["labels"] for s in wds.WebDataset(_spec(data, split), shardshuffle=False)]


def _train(recipe: str, data: Path, out: Path, objective: str, *extra: str) -> dict[str, Any]:
    """Train ``configs/train/<recipe>.yaml`` on ``data`` with ``objective``; the run's summary."""
    overrides = [f"objective.name={objective}", f"data.train={_spec(data, 'train')}",
                 f"data.test={_spec(data, 'test')}", *extra]
    return train(load_config(CONFIG_DIR / "train" / f"{recipe}.yaml", overrides), out)


# ---------------------------------------------------------------------------------------------------
# The XOR world


@pytest.fixture(scope="module")
def xor_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("xor_small")
    synth(out, train=400, test=100, world="xor", seed=1, workers=1, per_shard=100)
    return out


def test_xor_world_bits_and_vectors(xor_small: Path):
    world = json.loads((xor_small / "world.json").read_text())
    assert world["world"] == "xor" and world["xor_p"] == 1.0 and world["tokenizer"] is None
    assert not (xor_small / "tokenizer.model").exists()
    labels = _labels(xor_small, "train")
    assert len(labels) == 400 and all(lab["c"] == lab["a"] ^ lab["b"] for lab in labels)
    # Every pair is independent: each of the 4 value pairs of any two bits is about equally frequent.
    for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
        counts = Counter((lab[x], lab[y]) for lab in labels)
        assert len(counts) == 4 and min(counts.values()) > 70, (x, y, counts)
    sample = generate_sample(5, "xor")
    assert set(sample["vectors"]) == set(XOR_MODALITIES)
    for m, v in sample["vectors"].items():
        assert v.dtype == np.float32 and v.shape == (XOR_DIM,)
        assert (v.mean() > 0) == bool(sample["labels"][m])  # noise std 1 per entry around +-1
    first = next(iter(wds.WebDataset(_spec(xor_small, "test"), shardshuffle=False)))
    assert {k for k in first if not k.startswith("__")} == {"a.npy", "b.npy", "c.npy", "json"}


@pytest.mark.parametrize("p, agree", [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0)])
def test_xor_p_mixes_xor_and_copy(p: float, agree: float):
    labels = [generate_sample(seed, "xor", xor_p=p)["labels"] for seed in range(600)]
    xor = np.mean([lab["c"] == lab["a"] ^ lab["b"] for lab in labels])
    copy = np.mean([lab["c"] == lab["a"] for lab in labels])
    assert abs(xor - (agree + (1 - agree) / 2)) < 0.07  # c = a agrees with a XOR b half the time
    assert abs(copy - (1 - agree + agree / 2)) < 0.07
    with pytest.raises(ValueError, match="xor_p must be in"):
        generate_sample(0, "xor", xor_p=1.5)


def test_cli_synthesises_the_xor_world(tmp_path: Path):
    assert mmcl_main(["shards", "synth", "--world", "xor", "--xor-p", "0.25", "--out", str(tmp_path),
                      "--train", "8", "--test", "4", "--workers", "1"]) == 0
    world = json.loads((tmp_path / "world.json").read_text())
    assert world["xor_p"] == 0.25 and world["splits"]["train"]["n"] == 8
    assert all(json.loads(s["json"])["xor_p"] == 0.25
               for s in wds.WebDataset(_spec(tmp_path, "train"), shardshuffle=False))


def test_xor_vectors_load_through_the_xor_model(xor_small: Path):
    model = MultimodalModel(load_config(CONFIG_DIR / "train" / "xor.yaml").model)
    loader = build_loader(_spec(xor_small, "test"), model.processors, 64, train=False, with_meta=True)
    batch = next(iter(loader))
    assert {m: tuple(x.shape) for m, x in batch["inputs"].items()} == {m: (64, XOR_DIM) for m in XOR_MODALITIES}
    assert loader.skipped == Counter()
    emb = model.encode(batch["inputs"])
    assert all(e.shape == (64, model.model_cfg.embed_dim) for e in emb.values())


# ---------------------------------------------------------------------------------------------------
# Missing modalities in training (data.on_missing: mask). That a fully present mask gives exactly the loss
# of no mask is tests/test_objectives.py::test_fully_present_mask_gives_exactly_the_same_loss.


@pytest.fixture(scope="module")
def xor_with_holes(xor_small: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """The small XOR train split with one member dropped from every third sample (a, b, c in turn).
    Returns (the shard, samples, samples missing a member)."""
    out = tmp_path_factory.mktemp("holes")
    n = dropped = 0
    with wds.TarWriter(str(out / "holes-000000.tar"), encoder=False) as writer:
        for s in wds.WebDataset(_spec(xor_small, "train"), shardshuffle=False):
            sample = {k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
            if n % 3 == 0:
                del sample[f"{XOR_MODALITIES[(n // 3) % 3]}.npy"]
                dropped += 1
            writer.write(sample)
            n += 1
    return out / "holes-000000.tar", n, dropped


@pytest.mark.parametrize("objective", ["clip", "siglip", "symile", "gram"])
def test_batches_with_missing_modalities_train(xor_with_holes: tuple[Path, int, int], xor_small: Path,
                                               tmp_path: Path, objective: str):
    shard, n, dropped = xor_with_holes
    assert dropped == 134
    cfg = load_config(CONFIG_DIR / "train" / "xor.yaml", [
        f"objective.name={objective}", f"data.train={shard}", f"data.test={_spec(xor_small, 'test')}",
        "data.on_missing=mask", "data.batch_size=50", "data.cache=false", "train.steps=8", "train.log_every=1",
        "train.warmup_steps=2", "eval.suite="])
    summary = train(cfg, tmp_path)
    assert summary["train"]["samples"] == 8 * 50 and summary["data"]["skipped"] == {}  # nothing dropped
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and all(np.isfinite(r["loss"]) for r in log)
    mask = build_loader(str(shard), MultimodalModel(cfg.model).processors, n, train=False, on_missing="mask")
    (batch,) = list(mask)
    assert sum(int((~p).sum()) for p in batch["present"].values()) == dropped


# ---------------------------------------------------------------------------------------------------
# The proof: same data, model, steps and recipe; only the objective differs


def _check(objective: str, accuracy: float) -> None:
    if objective == "clip":
        assert abs(accuracy - 0.5) <= 0.1, f"pairwise CLIP should stay at chance, got {accuracy:.3f}"
    else:
        assert accuracy >= 0.9, f"{objective} should predict the third modality, got {accuracy:.3f}"


@pytest.fixture(scope="module")
def xor_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("xor")
    synth(out, train=4000, test=1000, world="xor", seed=0, workers=2, per_shard=1000)
    return out


def _prove(recipe: str, data: Path, out: Path, objective: str, task: str, *extra: str) -> None:
    """Train ``recipe`` with ``objective`` and check the accuracy of ``task`` (retrieval attribute match)."""
    start = time.perf_counter()
    summary = _train(recipe, data, out, objective, *extra)
    accuracy = summary["retrieval"][task]["R@1_attribute_match"]
    print(f"{recipe} {objective}: {task} accuracy {accuracy:.3f}, {summary['train']['steps']} steps, "
          f"{time.perf_counter() - start:.0f} s")
    _check(objective, accuracy)


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_xor_third_modality_needs_a_higher_order_objective(xor_data: Path, tmp_path: Path, objective: str):
    _prove("xor", xor_data, tmp_path, objective, "a+b->c")


@pytest.fixture(scope="module")
def joint_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("joint")
    synth(out, train=4000, test=500, world="joint", seed=0, workers=2, per_shard=250)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_joint_world_named_object_needs_a_higher_order_objective(joint_data: Path, tmp_path: Path,
                                                                 objective: str):
    _prove("joint", joint_data, tmp_path, objective, "video+text->audio",
           f"model.modalities.text.tokenizer={joint_data / 'tokenizer.model'}")
