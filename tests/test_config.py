"""Config loading, overrides and one-line validation errors; the CLI's handling of bad arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmcl import errors as mmcl_errors
from mmcl.cli import main as mmcl_main
from mmcl.config import (CONFIG_DIR, ClipConfig, Config, ConfigError, GramConfig, ModelConfig, SymileConfig,
                         apply_overrides, from_dict, load_config, named_model, to_dict)
from mmcl.data.shards import DataError
from mmcl.eval.suite import EvalError
from mmcl.hub import HubError
from mmcl.model import MultimodalModel

NAMED = sorted(f.stem for f in (CONFIG_DIR / "models").glob("*.yaml"))
#: A saved model of the test fixtures (only read here).
SAVED_MODEL = Path(__file__).resolve().parent / "fixtures" / "compat_v1" / "towers"


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


def test_cli_models_lists_named_configs(synthetic_data: Path, capsys: pytest.CaptureFixture[str]):
    """Every named config builds (those naming a tokenizer file under data/ given the session's through
    ``--set``) and its line shows the counts of ``MultimodalModel(..., device="meta")``."""
    tokenizer = synthetic_data / "tokenizer.model"
    assert mmcl_main(["models", "--set", f"model.modalities.text.tokenizer={tokenizer}"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    lines = {line.split()[0]: line for line in out.out.splitlines()[1:]}
    assert sorted(lines) == NAMED
    for name in NAMED:
        spec = named_model(name)
        if "text" in spec["modalities"]:
            spec = apply_overrides(spec, [f"modalities.text.tokenizer={tokenizer}"])
        counts = MultimodalModel(from_dict(ModelConfig, spec, "model"), device="meta").parameter_counts()
        parts = "  ".join(f"{part} {n:,}" for part, n in counts.items() if part not in ("objective", "total"))
        assert lines[name].split() == [name, f"{counts['total'] / 1e6:.2f}M", "embed_dim", str(spec["embed_dim"]),
                                       *parts.split()], name


def test_cli_models_fails_when_a_config_does_not_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]):
    """A fresh clone has no data/: the configs whose tokenizer lives there are one line each and exit 1;
    the others are still listed."""
    monkeypatch.chdir(tmp_path)
    assert mmcl_main(["models"]) == 1
    out = capsys.readouterr()
    errors = out.err.splitlines()
    assert [line.split(":")[1].strip() for line in errors] == ["joint", "tiny", "tiny_shared"]
    for line in errors:
        world = "joint" if "joint:" in line else "synthetic"
        assert line.endswith(f"does not build: model.modalities.text.tokenizer: file not found: "
                             f"{tmp_path}/data/{world}/tokenizer.model"), line
    assert sorted(line.split()[0] for line in out.out.splitlines()[1:]) == ["base", "small", "xor"]


@pytest.mark.parametrize("override, message", [
    ("train.lr=1", "mmcl models: error: override 'train.lr=1': mmcl models takes model fields (model.KEY=VALUE)"),
    ("model.modalitie.text.tokenizer=x",
     "mmcl models: error: override 'model.modalitie.text.tokenizer=x': no named config has model.modalitie.text"),
])
def test_cli_models_bad_override_is_one_line(override: str, message: str, capsys: pytest.CaptureFixture[str]):
    assert mmcl_main(["models", "--set", override]) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [message] and out.out == ""


def test_error_kinds_are_their_own_classes_under_one_base():
    assert (ConfigError, DataError, EvalError, HubError) == (mmcl_errors.ConfigError, mmcl_errors.DataError,
                                                             mmcl_errors.EvalError, mmcl_errors.HubError)
    kinds = [ConfigError, DataError, EvalError, HubError]
    for kind in kinds:
        assert issubclass(kind, mmcl_errors.MmclError)
        assert not any(issubclass(kind, other) for other in kinds if other is not kind), kind
    assert issubclass(ConfigError, ValueError)  # as before: code catching a bad value keeps catching it


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "demo", "--out", "{tmp}/run", "--set", "objective.mode=star"],
     "mmcl train: error: objective.mode: 'star' is not allowed (allowed: 'all_pairs', 'anchor')"),  # ConfigError
    (["shards", "validate", "{tmp}/none-{{0..1}}.tar"], "mmcl shards: error: shard not found: {tmp}/none-0.tar"),
    (["eval", "--suite", "synthetic", "--model", str(SAVED_MODEL), "--out", "{tmp}/eval"],
     "mmcl eval: error: task video->direction: data is 'test' but no held-out shards were given"),  # EvalError
    (["eval", "--suite", "synthetic", "--model", "{tmp}", "--out", "{tmp}/eval"],
     "mmcl eval: error: {tmp}: not a model directory (no config.json)"),  # HubError
])
def test_cli_maps_each_error_kind_to_one_line(argv, message, tmp_path, capsys):
    assert mmcl_main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message.format(tmp=tmp_path)) and "\n" not in err, err
