"""The shared transformer trunk (mmcl/shared.py), one trunk behind the token embedders the separate towers are
made of: masking equals encoding the unpadded sequence with timm's blocks directly, gradient checkpointing changes
nothing, save/load round-trips, bad configs fail in one line, the demo recipe and a 4-modality world train
with it under ``train.towers`` controls (a locked tokeniser, a locked trunk but its last block), and (slow)
two ranks under DDP and ZeRO-3 train it like one process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distributed import Runs, check_like_one_process, tiny_config
from test_named_models import vit_block
from test_vector import ONE_HOT_DIM, four_modal_data, one_hot  # noqa: F401  (four_modal_data: a fixture)

from mmcl.config import ClipConfig, Config, ConfigError, ModelConfig, from_dict, load_config
from mmcl.model import MultimodalModel
from mmcl.modalities import Processor, register_processor, register_tower
from mmcl.modalities.vector import VectorConfig, VectorTower, VectorTowerConfig
from mmcl.shared import TRUNK, build_shared_towers, encode_shared
from mmcl.train.loop import seed_everything, train
from mmcl.train.optim import apply_tower_controls, param_groups, parameter_report

WIDTH = 32


def shared_spec(data: Path, **trunk: Any) -> dict[str, Any]:
    """A small shared-trunk model over the simple world's video, audio and text."""
    return {"embed_dim": 16, "shared_trunk": {"width": WIDTH, "depth": 2, "heads": 2, **trunk}, "modalities": {
        "video": {"frames": 4, "size": 24, "tower": {"patch": 12, "tubelet": 2}},
        "audio": {"n_mels": 32, "seconds": 2.0, "tower": {"patch": 16}},
        "text": {"tokenizer": str(data / "tokenizer.model"), "max_len": 24},
    }}


def build(spec: dict[str, Any]) -> MultimodalModel:
    torch.manual_seed(0)
    return MultimodalModel(from_dict(ModelConfig, spec, "model"), ClipConfig())


@pytest.fixture(scope="module")
def model(synthetic_data: Path) -> MultimodalModel:
    return build(shared_spec(synthetic_data)).eval()


def batch(model: MultimodalModel, n: int) -> dict[str, torch.Tensor]:
    v, a, t = (model.processors[m] for m in ("video", "audio", "text"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, t.vocab_size, (n, t.cfg.max_len), generator=g)
    ids[0, 5:] = t.pad_id  # one short caption
    return {"video": torch.randn(n, v.cfg.frames, 3, v.cfg.size, v.cfg.size, generator=g),
            "audio": torch.randn(n, 1, a.cfg.n_mels, a.n_frames, generator=g), "text": ids}


def test_padding_is_hidden_from_attention_and_pooling(model: MultimodalModel):
    """A padded caption's features equal timm's blocks run on its real tokens alone, without any mask; a
    caption with no token at all (a missing modality's placeholder) still encodes to finite numbers."""
    text, trunk = model.processors["text"], model.towers[TRUNK]
    ids = text.tokenize("a red circle moves to the left while a low flute note plays")
    padded = torch.stack([text.transform(ids, train=False), text.empty()])
    assert (padded[0] == text.pad_id).any()
    with torch.no_grad():
        got = encode_shared(model.towers, "text", padded)
        x = model.towers["text"](ids[None])[0] + trunk.modality_embed[trunk.order["text"]]
        for blk in trunk.encoder.blocks:
            x = blk(x)
        want = trunk.encoder.norm(x).mean(dim=1)
    torch.testing.assert_close(got[:1], want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got[1]).all()


def test_encode_shapes_and_modality_embeddings_matter(model: MultimodalModel):
    x = batch(model, 3)
    with torch.no_grad():
        emb = model.encode(x)
        for name, z in emb.items():
            assert z.shape == (3, 16)
            torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
        # The same tokens read as another modality pass the trunk differently (its embedding differs).
        tokens, _ = model.towers["video"](x["video"])
        trunk = model.towers[TRUNK]
        assert (trunk(tokens, None, "video") - trunk(tokens, None, "audio")).abs().max() > 1e-4
    with pytest.raises(KeyError, match="model has no modality 'trunk'"):
        model.encode({TRUNK: x["video"]})


def test_grad_checkpointing_of_the_trunk_changes_nothing(synthetic_data: Path):
    model = build(shared_spec(synthetic_data)).train()
    x = batch(model, 4)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.objective(model(x)).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.towers[TRUNK].set_grad_checkpointing(True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any(k.startswith("towers.trunk.encoder.blocks.") for k in plain)
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], atol=1e-6, rtol=1e-5)


def test_save_load_roundtrip(model: MultimodalModel, tmp_path: Path):
    out = model.save_pretrained(tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["shared_trunk"] == {"width": WIDTH, "depth": 2, "heads": 2, "mlp_ratio": 4.0, "drop_path": 0.0}
    keys = load_file(str(out / "model.safetensors")).keys()
    assert {"towers.trunk.modality_embed", "towers.trunk.encoder.blocks.1.mlp.fc2.weight",
            "towers.text.embed.weight", "towers.video.embed.weight"} <= keys
    loaded = MultimodalModel.from_pretrained(out)
    x = batch(model, 3)
    with torch.no_grad():
        a, b = model.encode(x), loaded.encode(x)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@register_processor
class Depth(Processor):
    """A modality whose one tower type has no token embedder for a shared trunk."""

    kind = "depthmap"
    Config = VectorConfig
    members = ("depth.npy",)


register_tower("depthmap", "mlp", config=VectorTowerConfig,
               build=lambda depth, pretrained: VectorTower(depth.cfg.dim, depth.cfg.tower))


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["shared_trunk"].update(widht=64), "model.shared_trunk.widht: unknown field (allowed: depth, "
                                                   "drop_path, heads, mlp_ratio, width)"),
    (lambda s: s["shared_trunk"].update(width=30, heads=4), "model.shared_trunk.width: 30 is not a multiple of "
                                                            "heads 4"),
    (lambda s: s["shared_trunk"].update(width=9, heads=3), "model.shared_trunk.width: must be even, got 9"),
    (lambda s: s["shared_trunk"].update(depth=0), "model.shared_trunk.depth: must be > 0, got 0"),
    (lambda s: s["shared_trunk"].update(depth="two"), "model.shared_trunk.depth: expected an integer, got 'two'"),
    (lambda s: s.update(shared_trunk=4), "model.shared_trunk: expected a mapping, got 4"),
    (lambda s: s["modalities"].update(trunk={"kind": "vector", "dim": 3}),
     "model.modalities.trunk: the name is taken by model.shared_trunk; rename the modality"),
])
def test_bad_shared_config_is_one_line(synthetic_data: Path, mutate, message: str):
    spec = shared_spec(synthetic_data)
    mutate(spec)
    with pytest.raises(ConfigError) as e:
        MultimodalModel(from_dict(ModelConfig, spec, "model"))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_modality_without_a_tokeniser_is_one_line():
    with pytest.raises(ConfigError) as e:
        build_shared_towers({"depth": Depth("depth", VectorConfig(dim=3, tower=VectorTowerConfig()))}, from_dict(ModelConfig, {"embed_dim": 8, "modalities": {
            "a": {}}, "shared_trunk": {"width": 8, "depth": 1, "heads": 1}}).shared_trunk)
    message, kinds = str(e.value).split(" (kinds that have one: ")
    assert message == "model.shared_trunk: modality 'depth' (kind 'depthmap') has no tokeniser for a shared trunk"
    # Other test modules may register kinds of their own.
    assert {"audio", "text", "vector", "video"} <= set(kinds.rstrip(")").split(", ")) and "depthmap" not in kinds


@pytest.mark.parametrize("controls, message", [
    ({"video": {"grad_checkpointing": True}}, "train.towers.video.grad_checkpointing: the tower has no blocks to "
                                              "checkpoint (the shared blocks are train.towers.trunk)"),
    ({"text": {"lock": True, "unlocked_blocks": 1}}, "train.towers.text.unlocked_blocks: 1 is not in 0..0"),
    ({"trunk": {"frozen_blocks": 3}}, "train.towers.trunk.frozen_blocks: 3 is not in 0..2"),
    ({"tower": {"lock": True}}, "train.towers.tower: no such tower (allowed: video, audio, text, trunk)"),
])
def test_bad_tower_controls_are_one_line(synthetic_data: Path, controls: dict, message: str):
    with pytest.raises(ConfigError) as e:
        apply_tower_controls(build(shared_spec(synthetic_data)), controls)
    assert message in str(e.value) and "\n" not in str(e.value)


def report_counts(report: str) -> dict[str, tuple[int, int]]:
    """``parameter_report`` text -> ``{part: (trainable, frozen)}``."""
    rows = [line.split() for line in report.splitlines()[1:]]
    return {r[0]: (int(r[1].replace(",", "")), int(r[2].replace(",", ""))) for r in rows}


def test_controls_report_and_lrs(synthetic_data: Path):
    """text's tokeniser locked, the trunk locked but its last block, per-tower lrs (a head has its own,
    ``head_lr``; the trunk has none): the report's counts follow from the architecture, the optimizer groups
    from the config."""
    model = build(shared_spec(synthetic_data))
    with pytest.raises(ConfigError, match=r"^train.towers.trunk.head_lr: the tower has no projection head"):
        apply_tower_controls(model, {"trunk": {"head_lr": 1e-3}})
    lrs = apply_tower_controls(model, {"text": {"lock": True, "lr": 1e-3, "head_lr": 1e-3},
                                       "trunk": {"lock": True, "unlocked_blocks": 1, "lr": 2e-4}})
    counts = report_counts(parameter_report(model))
    text = model.processors["text"]
    assert counts["tower:text"] == (0, (text.vocab_size + text.cfg.max_len) * WIDTH)
    # Frozen: the first block, the final LayerNorm and the 3 modality embeddings.
    assert counts["tower:trunk"] == (vit_block(WIDTH), vit_block(WIDTH) + 2 * WIDTH + 3 * WIDTH)
    assert counts["tower:audio"] == (16 * 16 * WIDTH + WIDTH, 0)
    assert counts["head:text"] == (WIDTH * 16, 0)
    cfg = load_config(base={"model": shared_spec(synthetic_data), "train": {"lr": 5e-4}})
    by_param = {id(p): g["lr"] for g in param_groups(model, cfg, lrs) for p in g["params"]}
    names = dict(model.named_parameters())
    assert by_param[id(names["towers.trunk.encoder.blocks.1.attn.qkv.weight"])] == 2e-4
    assert by_param[id(names["heads.text.weight"])] == 1e-3
    assert by_param[id(names["heads.video.weight"])] == by_param[id(names["towers.video.embed.weight"])] == 5e-4
    assert id(names["towers.text.embed.weight"]) not in by_param  # locked: not optimised


def test_demo_recipe_trains_with_the_shared_trunk(synthetic_data: Path, tmp_path: Path):
    """configs/train/demo_shared.yaml (the demo's recipe on configs/models/tiny_shared.yaml), a few steps on
    the session's tiny world, text's tokeniser locked and the trunk locked but its last block (checkpointed):
    exactly those weights stay put, the rest moves, and the saved model is the shared one."""
    cfg = load_config("demo_shared", [
        f"data.train={synthetic_data}/train-{{000000..000003}}.tar", f"data.test={synthetic_data}/test-000000.tar",
        f"model.modalities.text.tokenizer={synthetic_data}/tokenizer.model", "data.batch_size=8",
        "data.workers=0", "train.steps=3", "train.warmup_steps=1", "train.log_every=1", "train.progress=false",
        "eval.suite=", "train.towers.text.lock=true", "train.towers.trunk.lock=true",
        "train.towers.trunk.unlocked_blocks=1", "train.towers.trunk.grad_checkpointing=true"])
    seed_everything(cfg.train.seed)
    initial = MultimodalModel(cfg.model, cfg.objective).state_dict()
    summary = train(cfg, tmp_path)
    assert summary["train"]["steps"] == 3 and summary["data"]["skipped"] == {}
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    final = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert final.keys() == initial.keys()
    moved = {k: not torch.equal(final[k], initial[k]) for k in final}
    last = f"towers.trunk.encoder.blocks.{cfg.model.shared_trunk.depth - 1}."
    assert not any(v for k, v in moved.items() if k.startswith("towers.text.") or
                   (k.startswith("towers.trunk.") and not k.startswith(last))), moved
    assert all(v for k, v in moved.items() if k.startswith((last, "towers.video.", "towers.audio.", "heads."))), moved
    loaded = MultimodalModel.from_pretrained(tmp_path / "final")
    assert loaded.model_cfg.shared_trunk == cfg.model.shared_trunk and set(loaded.towers) == {"video", "audio",
                                                                                            "text", TRUNK}


@pytest.mark.parametrize("objective", ["clip", "siglip", "symile", "gram"])
def test_four_modalities_share_the_trunk_with_every_objective(four_modal_data: Path, synthetic_data: Path,
                                                              tmp_path: Path, objective: str):
    """The simple world plus a one-hot vector modality (2 tokens), all through one trunk."""
    spec = shared_spec(synthetic_data)
    spec["modalities"]["labels"] = {"kind": "vector", "dim": ONE_HOT_DIM, "tower": {"tokens": 2}}
    cfg = from_dict(Config, {
        "model": spec, "objective": {"name": objective, "anchor": "text"},
        "data": {"train": str(four_modal_data / "train-{000000..000003}.tar"), "batch_size": 8, "shuffle_buffer": 8},
        "train": {"steps": 2, "warmup_steps": 1, "log_every": 1, "progress": False},
    })
    summary = train(cfg, tmp_path)
    assert summary["train"]["steps"] == 2 and summary["data"]["skipped"] == {}
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    model = MultimodalModel.from_pretrained(tmp_path / "final")
    assert list(model.towers[TRUNK].order) == ["video", "audio", "text", "labels"]
    assert model.towers[TRUNK].modality_embed.shape == (4, WIDTH)
    tokens, valid = model.towers["labels"](torch.from_numpy(one_hot({"colour": "red", "shape": "cross",
                                                                      "direction": "up"}))[None])
    assert tokens.shape == (1, 2, WIDTH) and valid is None


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero3"])
def test_two_ranks_train_the_shared_trunk_like_one_process(tmp_path_factory: pytest.TempPathFactory, mode: str):
    """The equivalence of tests/test_distributed.py with a shared trunk (the trunk runs once per modality in
    each forward: DDP's and ZeRO-3's hooks see its parameters used three times per step)."""
    root = tmp_path_factory.getbasetemp() / "equivalence_shared"
    root.mkdir(exist_ok=True)
    if not (root / "config.yaml").is_file():
        cfg = tiny_config(root / "data")
        cfg["model"]["shared_trunk"] = {"width": WIDTH, "depth": 2, "heads": 2}
        (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    check_like_one_process(Runs(root), "torchrun", mode)
