"""The loop's training features, in this process, a few steps each on the session's tiny synthetic set:
gradient accumulation with cached features equals the large-batch update, gradient checkpointing changes
nothing, locked and partly frozen towers stay put, the logit scale is clamped, a checkpoint resumes
exactly, and bad DeepSpeed configs or a checkpoint of another model fail in one line before any step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import read_log, tiny_config
from test_named_models import vit_block
from test_shared import report_counts

from mmcl.cli import main as mmcl_main
from mmcl.config import Config, ConfigError, load_config
from mmcl.model import MultimodalModel
from mmcl.train.checkpoint import (
    TMP_PREFIX,
    checkpoint_tmp_dir,
    commit_checkpoint,
    list_checkpoints,
    resolve_resume,
    write_state,
)
from mmcl.train.loop import seed_everything, train
from mmcl.train.optim import apply_tower_controls, param_groups, parameter_report
from mmcl.train.zero import deepspeed_config

STEPS = 4
BATCH = 8


def make_config(data: Path, *overrides: str) -> Config:
    """4 steps of 8 samples from the first 2 shards of 16, in order (no shuffling)."""
    base = tiny_config(data, shards=4)
    base["data"].update(batch_size=BATCH, shard_shuffle=False)
    base["train"].update(steps=STEPS, checkpoint_every=2, warmup_steps=2)
    return load_config(base=base, overrides=list(overrides))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def baseline(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("baseline")
    train(make_config(synthetic_data), out)
    return out


def test_baseline_run_files_and_logit_scale_clamp(baseline: Path) -> None:
    log = read_log(baseline)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert all(len(r["keys"]) == BATCH for r in log)
    assert all(r["logit_scale"] <= 10.0 + 1e-5 for r in log)  # initial 1/0.07, max_logit_scale 10
    assert [s for s, _ in list_checkpoints(baseline / "checkpoints")] == [2, 4]
    results = json.loads((baseline / "results.json").read_text())
    assert results["train"]["steps"] == STEPS and results["train"]["world_size"] == 1
    # Every parameter group's lr by name, in log.jsonl and tensorboard.
    groups = {f"{part}{suffix}" for part in ("towers.video", "towers.audio", "towers.text") for suffix in
              ("", ".no_decay")} | {"heads.video", "heads.audio", "heads.text", "objective.no_decay"}
    assert all(set(r["lrs"]) == groups and set(r["lrs"].values()) == {r["lr"]} for r in log)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(baseline / "tb"))
    tb.Reload()
    assert {f"train/lr/{g}" for g in groups} <= set(tb.Tags()["scalars"])
    assert [e.value for e in tb.Scalars("train/lr/heads.text")] == pytest.approx([r["lr"] for r in log])


def test_grad_accumulation_equals_the_large_batch(baseline: Path, synthetic_data: Path, tmp_path: Path) -> None:
    """2 micro-batches of 4 with cached features: the same losses and weights as batches of 8 (the negatives
    of the whole batch, the objective's scale counted once; clip-grad acts on the same gradient)."""
    train(make_config(synthetic_data, f"data.batch_size={BATCH // 2}", "train.grad_accum=2"), tmp_path)
    for a, b in zip(read_log(baseline), read_log(tmp_path), strict=True):
        assert b["keys"] == a["keys"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["logit_scale"] == pytest.approx(a["logit_scale"], abs=1e-6)
    # Counting the scale's gradient once per micro-batch instead moves the weights by ~1e-5 here.
    assert max_diff(weights(tmp_path), weights(baseline)) <= 1e-6


def test_grad_checkpointing_changes_nothing(baseline: Path, synthetic_data: Path, tmp_path: Path) -> None:
    sets = [f"train.towers.{m}.grad_checkpointing=true" for m in ("video", "audio", "text")]
    train(make_config(synthetic_data, *sets), tmp_path)
    for a, b in zip(read_log(baseline), read_log(tmp_path), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    assert max_diff(weights(tmp_path), weights(baseline)) <= 1e-6


def test_locked_and_frozen_towers_stay_put(synthetic_data: Path, tmp_path: Path) -> None:
    """LiT: text locked; video: its stem and first of 2 blocks frozen; audio locked but its last block."""
    cfg = make_config(synthetic_data, "train.towers.text.lock=true", "train.towers.video.frozen_blocks=1",
                      "train.towers.audio.lock=true", "train.towers.audio.unlocked_blocks=1")
    seed_everything(cfg.train.seed)
    initial = MultimodalModel(cfg.model, cfg.objective).state_dict()
    train(cfg, tmp_path)
    final = weights(tmp_path)

    def moved(prefix: str) -> dict[str, bool]:
        return {k: not torch.equal(final[k], initial[k]) for k in final if k.startswith(prefix)}

    assert not any(moved("towers.text.").values())
    video = moved("towers.video.")
    assert not any(v for k, v in video.items() if ".blocks.1." not in k and ".norm" not in k), video
    assert all(v for k, v in video.items() if ".blocks.1." in k), video
    audio = moved("towers.audio.")
    assert not any(v for k, v in audio.items() if ".blocks.0." not in k), audio
    assert all(v for k, v in audio.items() if ".blocks.0." in k), audio
    assert all(moved("heads.").values())


def test_parameter_report_and_lrs_follow_the_controls(synthetic_data: Path) -> None:
    """The start-of-run report's trainable / frozen counts per tower, from the architecture (width 32 towers:
    video 2 blocks behind a 2 x 12 x 12 tubelet stem, audio 1 block behind 16 x 16 patches), and the
    optimizer's per-tower lrs (a head has its own: ``head_lr``, default ``train.lr``) and named groups."""
    cfg = make_config(synthetic_data, "train.towers.text.lock=true", "train.towers.video.frozen_blocks=1",
                      "train.towers.video.lr=1e-4", "train.towers.audio.lock=true", "train.towers.audio.head_lr=3e-3",
                      "train.towers.audio.unlocked_blocks=1", "train.towers.audio.lr=2e-3")
    model = MultimodalModel(cfg.model, cfg.objective)
    lrs = apply_tower_controls(model, cfg.train.towers)
    counts = report_counts(parameter_report(model))
    w, block = 32, vit_block(32)
    stem = {"video": 3 * 2 * 12 * 12 * w + w, "audio": 16 * 16 * w + w}
    assert counts["tower:video"] == (block + 2 * w, stem["video"] + block)  # trainable: block 1, final norm
    assert counts["tower:audio"] == (block, stem["audio"] + 2 * w)  # trainable: its last (only) block
    text = sum(p.numel() for p in model.towers["text"].parameters())
    assert counts["tower:text"] == (0, text) and text > 0
    assert counts["head:text"] == (w * 16, 0) and counts["objective"] == (1, 0)
    by_param = {id(p): g["lr"] for g in param_groups(model, cfg, lrs) for p in g["params"]}
    lr_of = {name: by_param.get(id(p)) for name, p in model.named_parameters()}
    assert lr_of["towers.video.trunk.blocks.1.attn.qkv.weight"] == lr_of["towers.video.trunk.norm.bias"] == 1e-4
    assert lr_of["towers.audio.trunk.blocks.0.mlp.fc1.weight"] == 2e-3 and lr_of["heads.audio.weight"] == 3e-3
    assert lr_of["heads.text.weight"] == lr_of["heads.video.weight"] == lr_of["objective.logit_scale"] == cfg.train.lr
    names = {g["name"]: g["lr"] for g in param_groups(model, cfg, lrs)}
    assert names == {"towers.video": 1e-4, "towers.video.no_decay": 1e-4, "towers.audio": 2e-3,
                     "towers.audio.no_decay": 2e-3, "heads.video": cfg.train.lr, "heads.audio": 3e-3,
                     "heads.text": cfg.train.lr, "objective.no_decay": cfg.train.lr}
    assert lr_of["towers.video.trunk.blocks.0.attn.qkv.weight"] is None  # frozen: not optimised


#: The weight-decay rule before the modules declared no_weight_decay(): 1-D and 0-D parameters and these
#: substrings of a parameter's name.
SUBSTRING_RULE = ("logit_scale", "logit_bias", "temperature", "missing")


@pytest.mark.parametrize("missing", ["present", "learned"])
@pytest.mark.parametrize("objective", ["clip", "siglip", "symile", "gram"])
@pytest.mark.parametrize("named", ["tiny", "tiny_shared"])
def test_no_weight_decay_sets_equal_the_substring_rule(synthetic_data: Path, named: str, objective: str,
                                                       missing: str) -> None:
    """The parameters the modules declare (plus every one with ndim < 2) are exactly those the substring
    rule left undecayed, for the named models with every objective."""
    cfg = load_config(base={"model": named}, overrides=[
        f"model.modalities.text.tokenizer={synthetic_data / 'tokenizer.model'}", f"objective.name={objective}",
        f"objective.missing={missing}"])
    model = MultimodalModel(cfg.model, cfg.objective)
    decay = {id(p): g["weight_decay"] for g in param_groups(model, cfg, {}) for p in g["params"]}
    undecayed = {name for name, p in model.named_parameters() if decay[id(p)] == 0.0}
    by_rule = {name for name, p in model.named_parameters()
               if p.ndim < 2 or any(s in name for s in SUBSTRING_RULE)}
    assert undecayed == by_rule
    assert {name for name, p in model.named_parameters() if decay[id(p)] == cfg.train.weight_decay} == \
        {name for name, _ in model.named_parameters()} - by_rule
    declared = {f"objective.{n}" for n in model.objective.no_weight_decay()}
    assert declared <= undecayed and any(n.startswith("objective.missing_embedding.") for n in declared) == (
        missing == "learned")


@pytest.mark.parametrize(("control", "message"), [
    ("train.towers.text.lokc=true", "train.towers.text.lokc: unknown field (allowed: frozen_blocks, "
                                    "grad_checkpointing, head_lr, lock, lr, unlocked_blocks)"),
    ("train.towers.text.head_lr=-1", "train.towers.text.head_lr: must be >= 0, got -1.0"),
    ("train.towers.text.lock=3", "train.towers.text.lock: expected true or false, got 3"),
    ("train.towers.text.unlocked_blocks=1", "train.towers.text.unlocked_blocks: only meaningful with lock: true"),
])
def test_tower_controls_are_typed_with_one_line_errors(synthetic_data: Path, control: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_config(synthetic_data, control)
    assert str(e.value) == message


def test_resume_from_a_checkpoint_is_exact(baseline: Path, synthetic_data: Path, tmp_path: Path) -> None:
    train(make_config(synthetic_data), tmp_path, resume=str(baseline / "checkpoints" / "step_2"))
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [3, 4]
    for a, b in zip(read_log(baseline)[2:], log):
        assert (b["keys"], b["loss"]) == (a["keys"], a["loss"])
    assert max_diff(weights(tmp_path), weights(baseline)) == 0.0


def test_resume_from_another_model_fails_in_one_line(baseline: Path, synthetic_data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "other.yaml"
    cfg = tiny_config(synthetic_data, shards=4)
    cfg["model"]["embed_dim"] = 8
    config.write_text(json.dumps(cfg))
    rc = mmcl_main(["train", "--config", str(config), "--out", str(tmp_path / "out"),
                    "--resume", str(baseline / "checkpoints" / "step_4")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == (f"mmcl train: error: --resume {baseline / 'checkpoints' / 'step_4'}: the checkpoint holds "
                   f"another model (first difference: heads.audio.weight)")
    assert not (tmp_path / "out" / "log.jsonl").exists()


def _ds_json(tmp_path: Path, **fields: Any) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **fields}))
    return str(path)


@pytest.mark.parametrize("fields, message", [
    ({"train_micro_batch_size_per_gpu": 16}, "sets train_micro_batch_size_per_gpu=16 but data.batch_size = 8"),
    ({"gradient_accumulation_steps": 4}, "sets gradient_accumulation_steps=4 but train.grad_accum = 1"),
    ({"train_batch_size": 8}, "sets train_batch_size=8 but data.batch_size x train.grad_accum x world size = 16"),
    ({"bf16": {"enabled": True}}, "enables bf16 but train.precision=fp32"),
])
def test_deepspeed_config_disagreeing_with_the_train_config(synthetic_data: Path, tmp_path: Path,
                                                            fields: dict[str, Any], message: str) -> None:
    cfg = make_config(synthetic_data)
    path = _ds_json(tmp_path, **fields)
    with pytest.raises(ConfigError) as err:
        deepspeed_config(cfg, path, world=2, bucket=1024)
    assert str(err.value).startswith(f"train.deepspeed: {path} {message}")


def test_deepspeed_config_auto_fields(synthetic_data: Path, tmp_path: Path) -> None:
    cfg = make_config(synthetic_data, "train.grad_accum=3", "train.clip_grad=0.5")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"},
                                "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                      "stage3_prefetch_bucket_size": 5000}}))
    ds = deepspeed_config(cfg, str(path), world=2, bucket=1024)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"],
            ds["train_batch_size"]) == (BATCH, 3, 0.5, BATCH * 3 * 2)
    assert ds["bf16"]["enabled"] is False  # fp32 (and no GPU here)
    # DeepSpeed allocates its buckets at their configured size: "auto" is the largest parameter's.
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1024, "stage3_prefetch_bucket_size": 5000}


def test_bad_deepspeed_config_fails_before_any_step(synthetic_data: Path, tmp_path: Path) -> None:
    cfg = make_config(synthetic_data, f"train.deepspeed={_ds_json(tmp_path, train_micro_batch_size_per_gpu=2)}")
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=2 but data.batch_size = 8"):
        train(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_commit_keep_last_and_crash_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    dead = checkpoint_tmp_dir(root, 7)  # a writer that died mid-write
    (dead / "model.safetensors").write_bytes(b"torn")
    assert resolve_resume("latest", root) is None
    for step in (2, 4, 6):
        tmp = checkpoint_tmp_dir(root, step)
        (tmp / "model.safetensors").write_bytes(b"w")
        write_state(tmp, {"step": step})
        if step == 4:
            assert [s for s, _ in list_checkpoints(root)] == [2]  # not visible before the rename
        commit_checkpoint(tmp, root, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(root)] == [4, 6]
    assert resolve_resume("latest", root) == root / "step_6"
    assert not list(root.glob(f"{TMP_PREFIX}*"))
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        resolve_resume(str(root / "step_2"), root)


def test_batch_checks_for_negatives(synthetic_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One warning line when a global batch has a single sample; drop_last leaving no step is an error."""
    from mmcl.train.loop import check_batch

    check_batch(make_config(synthetic_data, "data.batch_size=1"), 64, 1)
    check_batch(make_config(synthetic_data, "data.batch_size=9", "data.drop_last=false"), 64, 7)
    check_batch(make_config(synthetic_data, "data.batch_size=1", "train.grad_accum=2"), 64, 1)  # 2: no warning
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines == [
        "data.batch_size 1 x 1 rank(s) x train.grad_accum 1: a global batch of 1 sample gives the clip objective "
        "no negatives: raise data.batch_size",
        "data.drop_last is false and the last batch of an epoch holds 1 sample (64 samples, data.batch_size 9 x 7 "
        "rank(s)): it has no negatives for the clip objective (set data.drop_last: true)"]
    with pytest.raises(ConfigError, match=r"^data.batch_size: data.batch_size 8 x 9 rank\(s\) = 72 per step "
                                          r"exceeds the 64 training samples: with data.drop_last no step is left"):
        check_batch(make_config(synthetic_data), 64, 9)


def test_epochs_with_drop_last(synthetic_data: Path, tmp_path: Path) -> None:
    """2 epochs of 64 samples in batches of 24: 2 steps each (the last 16 dropped), the schedule sized to it."""
    train(make_config(synthetic_data, "train.steps=0", "train.epochs=2", "data.batch_size=24",
                      "train.checkpoint_every=0"), tmp_path)
    log = read_log(tmp_path)
    assert [(r["step"], r["epoch"], len(r["keys"])) for r in log] == [(1, 0, 24), (2, 0, 24), (3, 1, 24), (4, 1, 24)]
