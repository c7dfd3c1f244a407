"""Config loading, overrides and one-line validation errors; the CLI's handling of bad arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmcl.config import ClipConfig, Config, ConfigError, GramConfig, SymileConfig, load_config, to_dict


def test_demo_config_loads_with_named_model():
    cfg = load_config("demo")
    assert isinstance(cfg, Config)
    assert set(cfg.model.modalities) == {"video", "audio", "text"}
    assert cfg.objective.name == "clip" and cfg.eval.suite == "synthetic"


def test_overrides_apply_and_parse_types():
    cfg = load_config("demo", ["train.lr=1e-4", "data.batch_size=8", "model.embed_dim=64", "train.log_keys=true",
                               "objective.mode=anchor"])
    assert cfg.train.lr == 1e-4 and cfg.data.batch_size == 8 and cfg.model.embed_dim == 64
    assert cfg.train.log_keys is True and cfg.objective.mode == "anchor"
    # A round trip through plain data gives the same config.
    assert to_dict(load_config(base=to_dict(cfg))) == to_dict(cfg)


@pytest.mark.parametrize("override, message", [
    ("objective.name=triplet", "objective.name: 'triplet' is not allowed (allowed: 'clip', 'siglip', 'symile', 'gram')"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("train.lrr=1", "train.lrr: unknown field (allowed:"),
    ("data.batch_size=0", "data.batch_size: must be > 0"),
    ("model=huge", "model: unknown named model 'huge' (allowed:"),
    ("trainlr", "expected key=value"),
    ("objective.negativs=n", "objective.negativs: unknown field (allowed: anchor, gather, init_logit_scale, "
                               "learn_logit_scale, max_logit_scale, missing, mode, name)"),
])
def test_bad_overrides_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_each_objective_has_its_own_options_and_defaults():
    """The tagged union on objective.name: each objective's config with only its options and explicit
    defaults (CLIP and Symile start at 1/0.07, SigLIP at 10)."""
    assert load_config("demo").objective == ClipConfig(mode="anchor", anchor="text")
    assert load_config("demo", ["objective.name=siglip"]).objective.init_logit_scale == 10.0
    assert load_config("demo", ["objective.name=symile"]).objective == SymileConfig()
    assert SymileConfig().init_logit_scale == ClipConfig().init_logit_scale == 1 / 0.07
    assert to_dict(GramConfig()) == {"name": "gram", "max_logit_scale": 100.0, "learn_logit_scale": True,
                                     "missing": "present", "gather": True, "anchor": "text",
                                     "init_temperature": 0.07}


def test_switching_the_objective_keeps_the_shared_options():
    """--set objective.name=X over a recipe written for another objective (configs/train/joint.yaml: symile
    with negatives and a larger initial scale): the options X has are kept, the others dropped; a field no
    objective has stays an error."""
    joint = {"model": "joint", "objective": {"name": "symile", "mode": "all_pairs", "anchor": "text",
                                             "negatives": "n_squared", "init_logit_scale": 50.0}}
    assert load_config(base=joint).objective == SymileConfig(negatives="n_squared", init_logit_scale=50.0)
    assert load_config(base=joint, overrides=["objective.name=clip"]).objective == ClipConfig(init_logit_scale=50.0)
    assert load_config(base=joint, overrides=["objective.name=gram"]).objective == GramConfig(anchor="text")
    with pytest.raises(ConfigError, match=r"^objective.negativs: unknown field \(allowed: anchor, gather, "):
        load_config(base=joint, overrides=["objective.name=gram", "objective.negativs=n"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmcl.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_bad_arguments_exit_nonzero_with_usage():
    r = run_cli("train", "--config", "demo")
    assert r.returncode == 2 and "usage:" in r.stderr and "--out" in r.stderr
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "usage:" in r.stderr


def test_cli_bad_config_value_is_one_line(tmp_path):
    r = run_cli("train", "--config", "demo", "--out", str(tmp_path), "--set", "objective.mode=star")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "mmcl train: error: objective.mode: 'star' is not allowed (allowed: 'all_pairs', 'anchor')")


def test_cli_missing_shards_is_one_line(tmp_path):
    r = run_cli("train", "--config", "demo", "--out", str(tmp_path), "--set", f"data.train={tmp_path}/nope-{{0..3}}.tar")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"mmcl train: error: shard not found: {tmp_path}/nope-0.tar"


def test_cli_models_lists_named_configs():
    r = run_cli("models")
    assert r.returncode == 0 and "tiny" in r.stdout
