"""Locked towers are frozen in eval mode, for every tower type: a timm CNN with batch norm and dropout, a
transformers BERT with dropout 0.5 (random weights saved with ``save_pretrained``), towers of this
project's layers with drop path / dropout, and a shared trunk. Their features for one batch do not move
over training steps and equal the eval-mode forward; partly unlocked towers keep their frozen blocks in eval
mode while the unlocked blocks still train (dropout on). The frozen-feature cache of locked towers gives the
losses of a run without it, in RAM and on disk, is reused by a later run and invalidated by a changed tower
or processing, and leaves inputs drawn at random uncached."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import read_log
from test_pretrained_towers import CAPTIONS, bert_tokenizer, save_bert
from test_train import make_config

from mmcl.config import ModelConfig, from_dict
from mmcl.model import MultimodalModel
from mmcl.train.loop import train
from mmcl.train.optim import apply_tower_controls

N = len(CAPTIONS)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bert") / "bert"
    tok = bert_tokenizer()
    save_bert(path, len(tok), hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    tok.save_pretrained(path)
    return path


VIDEO = {"frames": 4, "size": 24, "tower": {"width": 32, "depth": 2, "heads": 2, "patch": 12, "drop_path": 0.5}}
AUDIO_VIT = {"n_mels": 32, "seconds": 1.0, "tower": {"width": 32, "depth": 2, "heads": 2, "patch": 16,
                                                      "drop_path": 0.5}}
AUDIO_CNN = {"n_mels": 32, "seconds": 1.0, "tower": {"type": "timm", "model": "test_resnet",
                                                      "kwargs": {"drop_rate": 0.5}}}


def model_of(kind: str, bert_dir: Path, synthetic_data: Path) -> MultimodalModel:
    """``pretrained``: timm CNN audio + transformers text; ``scratch``: this project's towers (BERT text
    with dropout); ``shared``: one trunk with drop path behind the three embedders."""
    sp = {"tokenizer": str(synthetic_data / "tokenizer.model"), "max_len": 24}
    spec: dict[str, Any] = {
        "pretrained": {"video": VIDEO, "audio": AUDIO_CNN,
                       "text": {"max_len": 24, "tower": {"type": "hf", "path": str(bert_dir)}}},
        "scratch": {"video": VIDEO, "audio": AUDIO_VIT,
                    "text": {**sp, "tower": {"width": 32, "depth": 2, "heads": 2, "dropout": 0.5}}},
        "shared": {"video": VIDEO, "audio": AUDIO_VIT, "text": sp},
    }[kind]
    cfg = {"embed_dim": 8, "modalities": spec}
    if kind == "shared":
        cfg["shared_trunk"] = {"width": 32, "depth": 2, "heads": 2, "drop_path": 0.5}
    torch.manual_seed(0)
    return MultimodalModel(from_dict(ModelConfig, cfg, "model"))


def batch(model: MultimodalModel) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, proc in model.processors.items():
        if name == "text":
            out[name] = proc.collate([proc.transform(proc.tokenize(c), train=False) for c in CAPTIONS])
        else:
            out[name] = torch.randn(N, *proc.empty().shape, generator=g)
    return out


def tower_features(model: MultimodalModel, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {m: model.tower_features(m, x[m]).detach() for m in x}


@pytest.mark.parametrize("kind", ["pretrained", "scratch", "shared"])
def test_locked_towers_give_eval_features_across_training_steps(kind: str, bert_dir: Path,
                                                                synthetic_data: Path) -> None:
    model = model_of(kind, bert_dir, synthetic_data)
    apply_tower_controls(model, {name: {"lock": True} for name in model.towers})
    x = batch(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen = []
    for _ in range(2):
        model.train()
        assert not any(m.training for t in model.towers.values() for m in t.modules())
        seen.append(tower_features(model, x))
        loss = model.objective(model(x), {m: torch.ones(N, dtype=torch.bool) for m in x})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        reference = tower_features(model, x)
    for m in x:
        assert torch.equal(seen[0][m], seen[1][m]), m
        assert torch.equal(seen[1][m], reference[m]), m
    state = model.state_dict()
    assert all(torch.equal(before[k], state[k]) for k in state if k.startswith("towers.")), \
        "a locked tower moved (batch-norm statistics?)"
    assert not torch.equal(before["heads.text.weight"], state["heads.text.weight"])


def test_partly_unlocked_towers_keep_their_frozen_blocks_in_eval_mode(bert_dir: Path, synthetic_data: Path) -> None:
    """text (transformers): locked but its last block; video (this project's): its stem and first block
    frozen. The frozen blocks' outputs are deterministic in training mode; the tower's output is not (dropout
    and drop path 0.5 in the trainable block)."""
    model = model_of("pretrained", bert_dir, synthetic_data)
    apply_tower_controls(model, {"text": {"lock": True, "unlocked_blocks": 1}, "video": {"frozen_blocks": 1}})
    model.train()
    x = batch(model)
    for m in ("text", "video"):
        blocks = model.towers[m].blocks()
        assert not blocks[0].training and blocks[1].training
        outputs: list[torch.Tensor] = []
        hook = blocks[0].register_forward_hook(
            lambda _m, _i, out: outputs.append((out[0] if isinstance(out, tuple) else out).detach()))
        first, second = model.tower_features(m, x[m]), model.tower_features(m, x[m])
        hook.remove()
        assert torch.equal(outputs[0], outputs[1]), m
        assert not torch.equal(first, second), m  # the unlocked block still trains with dropout


# ----------------------------------------------------------------------------------------------------
# The frozen-feature cache in training runs


def cached_run(data: Path, out: Path, cache: str, *overrides: str) -> list[dict[str, Any]]:
    """2 epochs of the 64 samples in batches of 16 (in order), text and audio locked, video trained."""
    cfg = make_config(data, "train.steps=0", "train.epochs=2", "train.checkpoint_every=0", "data.batch_size=16",
                      "train.towers.text.lock=true", "train.towers.audio.lock=true",
                      f"train.feature_cache={cache}", *overrides)
    train(cfg, out)
    return read_log(out)


def test_feature_cache_gives_the_losses_of_no_cache(synthetic_data: Path, tmp_path: Path) -> None:
    """The audio window (3 s) covers the 2 s clips and text has no randomness: both are cached, in RAM or on
    disk. Epoch 1 computes all 64 rows of each, later epochs read them; the losses equal the uncached run's."""
    runs = {c: cached_run(synthetic_data, tmp_path / c, c) for c in ("none", "ram", "disk")}
    assert len(runs["none"]) == 8 and all("feature_cache" not in r for r in runs["none"])
    for cache in ("ram", "disk"):
        log = runs[cache]
        for a, b in zip(runs["none"], log, strict=True):
            assert b["keys"] == a["keys"]
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        counts = [r["feature_cache"] for r in log]
        assert counts[:4] == [{"hits": 0, "misses": 32}] * 4  # 16 rows x 2 modalities per step
        assert counts[4:] == [{"hits": 32, "misses": 0}] * 4
    disk = tmp_path / "disk" / "feature_cache"
    assert sorted(p.name.split("-")[0] for p in disk.iterdir()) == ["audio", "text"]
    for d in disk.iterdir():
        assert (d / "rank0.keys").read_text().count("\n") == 64
        assert (d / "rank0.f32").stat().st_size == 64 * 32 * 4  # width-32 towers, float32


def test_feature_cache_on_disk_is_reused_and_invalidated(synthetic_data: Path, tmp_path: Path) -> None:
    """A later run beside the same cache reads it from its first step; a changed audio tower (other initial
    weights: train.seed) or processing (n_mels) gets a new directory, the stale one removed, and text
    (unchanged) is still read."""
    first = tmp_path / "first"
    cached_run(synthetic_data, first, "disk")
    before = {p.name for p in (first / "feature_cache").iterdir()}
    again = tmp_path / "again"
    shutil.copytree(first / "feature_cache", again / "feature_cache")
    log = cached_run(synthetic_data, again, "disk")
    assert all(r["feature_cache"] == {"hits": 32, "misses": 0} for r in log)
    assert {p.name for p in (again / "feature_cache").iterdir()} == before
    changed = tmp_path / "changed"
    shutil.copytree(first / "feature_cache", changed / "feature_cache")
    log = cached_run(synthetic_data, changed, "disk", "model.modalities.audio.n_mels=48")
    assert log[0]["feature_cache"] == {"hits": 16, "misses": 16}  # text read, audio computed
    after = {p.name for p in (changed / "feature_cache").iterdir()}
    assert {n for n in after if n.startswith("text-")} == {n for n in before if n.startswith("text-")}
    assert len(after) == 2 and after != before


def test_random_inputs_are_not_cached(synthetic_data: Path, tmp_path: Path) -> None:
    """A 1 s audio window of the 2 s clips is drawn at random in training: audio is encoded every step (its
    rows are misses in every epoch), text is still cached; the losses are those without the cache."""
    short = "model.modalities.audio.seconds=1.0"
    off = cached_run(synthetic_data, tmp_path / "off", "none", short)
    ram = cached_run(synthetic_data, tmp_path / "ram", "ram", short)
    for a, b in zip(off, ram, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    assert [r["feature_cache"] for r in ram[4:]] == [{"hits": 16, "misses": 16}] * 4
