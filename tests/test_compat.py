"""Models saved by an earlier main load with today's code and give the same embeddings.

The fixtures under ``tests/fixtures/compat_v<format>/`` were written by ``tests/fixtures/make_compat_models.py``
run in a checkout of that main (never hand-edited): each holds a ``save_pretrained`` directory and
``expected.safetensors`` with a fixed input batch and the embeddings that code computed for it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcl.config import FORMAT_VERSION, ObjectiveConfig, from_dict, upgrade_config
from mmcl.model import MultimodalModel
from mmcl.objectives import build_objective

FIXTURES = Path(__file__).parent / "fixtures"
SAVED = sorted(p for p in FIXTURES.glob("compat_v*/*") if (p / "expected.safetensors").is_file())


def test_fixtures_exist() -> None:
    """Format 1 (the first saved format) with every layout: separate towers, shared trunk, timm, transformers."""
    assert {p.name for p in SAVED if p.parent.name == "compat_v1"} == {"towers", "shared", "timm", "hf_text"}
    # Format 2: transformers audio towers (Whisper with its whole chunk, HuBERT, wav2vec2 with a mask), which
    # format 3 pools over real audio only and fits to the window: saved ones keep what they computed.
    assert {p.name for p in SAVED if p.parent.name == "compat_v2"} == {"hf_audio"}


@pytest.mark.parametrize("saved", SAVED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_saved_model_loads_with_the_same_embeddings(saved: Path) -> None:
    written_format = json.loads((saved / "config.json").read_text())["mmcl_format"]
    assert saved.parent.name == f"compat_v{written_format}"
    expected = load_file(str(saved / "expected.safetensors"))
    inputs = {k.removeprefix("input."): v for k, v in expected.items() if k.startswith("input.")}
    model = MultimodalModel.from_pretrained(saved).eval()
    with torch.no_grad():
        emb = model.encode(inputs)
    assert set(emb) == set(inputs)
    for name, z in emb.items():
        torch.testing.assert_close(z, expected[f"embedding.{name}"], rtol=0, atol=1e-6)


#: The objective section as format 1 saved it: every objective's options, ``init_logit_scale: null`` meaning
#: the objective's own default.
V1_OBJECTIVE = {"name": "clip", "mode": "all_pairs", "anchor": "text", "init_logit_scale": None,
                "max_logit_scale": 100.0, "learn_logit_scale": True, "init_logit_bias": -10.0, "negatives": "n",
                "init_temperature": 0.07, "missing": "present", "gather": True}

#: Per objective: v1 fields set away from their defaults, and what the built objective then is (parameters
#: in log space; the attributes it keeps), as format 1's code built it.
V1_CASES = {
    "clip": ({}, {"logit_scale": math.log(1 / 0.07)}, {"mode": "all_pairs", "anchor": "text"}),
    "clip-set": ({"mode": "anchor", "anchor": "audio", "init_logit_scale": 50.0, "max_logit_scale": 20.0},
                 {"logit_scale": math.log(50.0)}, {"mode": "anchor", "anchor": "audio", "max_logit_scale": 20.0}),
    "siglip": ({}, {"logit_scale": math.log(10.0), "logit_bias": -10.0}, {"mode": "all_pairs"}),
    "siglip-set": ({"init_logit_bias": -5.0, "learn_logit_scale": False, "gather": False},
                   {"logit_scale": math.log(10.0), "logit_bias": -5.0}, {"gather": False}),
    "symile": ({}, {"logit_scale": math.log(1 / 0.07)}, {"negatives": "n"}),
    "symile-set": ({"negatives": "n_squared", "init_logit_scale": 50.0, "mode": "anchor"},
                   {"logit_scale": math.log(50.0)}, {"negatives": "n_squared"}),
    "gram": ({}, {"log_temperature": math.log(0.07)}, {"anchor": "text"}),
    "gram-set": ({"init_temperature": 0.1, "anchor": "video", "init_logit_scale": 50.0, "missing": "learned"},
                 {"log_temperature": math.log(0.1)}, {"anchor": "video", "missing": "learned"}),
}


@pytest.mark.parametrize("case", V1_CASES)
def test_v1_objective_config_upgrades_to_the_same_objective(case: str) -> None:
    """A format-1 config.json's flat objective (every field) upgrades to the chosen objective's own fields,
    which build the objective format 1 built."""
    name = case.split("-")[0]
    changed, parameters, attributes = V1_CASES[case]
    v1 = {"mmcl_format": 1, "model": {}, "objective": {**V1_OBJECTIVE, "name": name, **changed}}
    upgraded = upgrade_config(v1)
    assert upgraded["mmcl_format"] == FORMAT_VERSION == 3 and v1["mmcl_format"] == 1
    cfg = from_dict(ObjectiveConfig, upgraded["objective"], "objective")
    assert cfg.name == name
    objective = build_objective(cfg, ["video", "audio", "text"], embed_dim=8)
    state = objective.state_dict()
    assert {k for k in state if not k.startswith("missing_embedding.")} == set(parameters)
    for k, value in parameters.items():
        assert state[k].item() == pytest.approx(value, abs=1e-6)
        assert getattr(objective, k).requires_grad == changed.get("learn_logit_scale", True)
    for k, value in attributes.items():
        assert getattr(objective, k) == value


def test_upgrade_refuses_a_newer_format() -> None:
    with pytest.raises(ValueError, match=r"mmcl_format: 4 is not allowed \(allowed: 1..3"):
        upgrade_config({"mmcl_format": 4, "model": {}})


def test_v2_hf_audio_towers_keep_their_chunk_and_pooling() -> None:
    """Format 2 fed Whisper its whole chunk and mean-pooled every frame of models given no mask: v3 says so
    explicitly; a pooling or chunk that was set stays."""
    towers = {"a": {"type": "hf", "path": "a_hf"}, "b": {"type": "hf", "path": "b_hf", "pooling": "cls"},
              "c": {"type": "vit"}}
    v2 = {"mmcl_format": 2, "model": {"modalities": {
        name: {"kind": "audio", "tower": tower} for name, tower in towers.items()} | {"text": {}}}}
    got = upgrade_config(v2)["model"]["modalities"]
    assert got["a"]["tower"] == {"type": "hf", "path": "a_hf", "chunk": "full", "pooling": "mean_padded"}
    assert got["b"]["tower"] == {"type": "hf", "path": "b_hf", "chunk": "full", "pooling": "cls"}
    assert got["c"]["tower"] == {"type": "vit"} and got["text"] == {}
    assert "chunk" not in v2["model"]["modalities"]["a"]["tower"]
