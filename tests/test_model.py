"""Towers, projection heads and the save_pretrained / from_pretrained round trip."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from mmcl.config import CONFIG_DIR, ClipConfig, ConfigError, ModelConfig, from_dict
from mmcl.model import MultimodalModel


def tiny_spec(data_dir: Path) -> dict:
    spec = yaml.safe_load((CONFIG_DIR / "models" / "tiny.yaml").read_text())
    spec["modalities"]["text"]["tokenizer"] = str(data_dir / "tokenizer.model")
    return spec


@pytest.fixture(scope="module")
def model(synthetic_data) -> MultimodalModel:
    torch.manual_seed(0)
    return MultimodalModel(from_dict(ModelConfig, tiny_spec(synthetic_data)), ClipConfig())


def batch(model: MultimodalModel, n: int) -> dict[str, torch.Tensor]:
    v, a, t = model.processors["video"].cfg, model.processors["audio"], model.processors["text"].cfg
    g = torch.Generator().manual_seed(1)
    return {
        "video": torch.randn(n, v.frames, 3, v.size, v.size, generator=g),
        "audio": torch.randn(n, 1, a.cfg.n_mels, a.n_frames, generator=g),
        "text": torch.randint(2, model.processors["text"].tokenizer.vocab_size, (n, t.max_len), generator=g),
    }


def test_tower_shapes(model):
    x = batch(model, 3)
    for name, tower in model.towers.items():
        assert tower(x[name]).shape == (3, tower.out_dim)
    emb = model.encode(x)
    for name, z in emb.items():
        assert z.shape == (3, model.model_cfg.embed_dim)
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))


def test_video_tower_sees_temporal_order(model):
    """Reversing the frames must change the video embedding (mean pooling of frames alone would not)."""
    model.eval()
    x = batch(model, 2)["video"]
    with torch.no_grad():
        fwd = model.encode({"video": x})["video"]
        rev = model.encode({"video": x.flip(1)})["video"]
    assert (fwd - rev).abs().max() > 1e-3


def test_text_padding_is_ignored(model):
    """Masked-mean pooling: the embedding of a caption does not depend on how much padding follows it."""
    model.eval()
    text = model.processors["text"]
    ids = text.tokenize("a red circle moves to the left while a low flute note plays")
    short = torch.full((1, ids.numel() + 2), text.tokenizer.pad_id)
    short[0, : ids.numel()] = ids
    with torch.no_grad():
        full = model.towers["text"](text.transform(ids, train=False)[None])
        tower_short = copy.deepcopy(model.towers["text"])
        padded = tower_short(short)
    torch.testing.assert_close(full, padded, atol=1e-5, rtol=1e-5)


def test_forward_embeddings_loss_and_backward(model):
    model.train()
    emb = model(batch(model, 4))
    assert {m: tuple(z.shape) for m, z in emb.items()} == {m: (4, model.model_cfg.embed_dim) for m in emb}
    torch.testing.assert_close(torch.stack([z.norm(dim=-1) for z in emb.values()]), torch.ones(3, 4))
    loss = model.objective(emb)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, tower in model.towers.items():
        grads = [p.grad for p in tower.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
    model.zero_grad()


def test_save_load_roundtrip(model, tmp_path):
    model.eval()
    out = model.save_pretrained(tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["modalities"]["text"]["tokenizer"] == "text_tokenizer.model"
    assert (out / "text_tokenizer.model").is_file() and (out / "model.safetensors").is_file()
    loaded = MultimodalModel.from_pretrained(out)
    x = batch(model, 3)
    with torch.no_grad():
        a, b = model.encode(x), loaded.encode(x)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_from_pretrained_refuses_missing_weights(model, tmp_path):
    out = model.save_pretrained(tmp_path / "m")
    (out / "model.safetensors").unlink()
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        MultimodalModel.from_pretrained(out)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["modalities"]["video"].update(colour=1), "model.modalities.video.colour: unknown field"),
    (lambda s: s["modalities"]["video"]["tower"].update(depth="four"), "model.modalities.video.tower.depth: expected an integer"),
    (lambda s: s["modalities"]["video"].update(size=50), "model.modalities.video.size: 50 is not a multiple of tower.patch 16"),
    (lambda s: s["modalities"]["text"]["tower"].update(pooling="max"), "pooling: 'max' is not allowed (allowed: 'mean', 'cls', 'last')"),
    (lambda s: s["modalities"]["video"].update(kind="depth"), "model.modalities.video.kind: unknown modality 'depth'"),
    (lambda s: s["modalities"]["text"].update(tokenizer="/nonexistent/tok.model"), "tokenizer: file not found: /nonexistent/tok.model"),
])
def test_bad_model_config(synthetic_data, mutate, message):
    spec = tiny_spec(synthetic_data)
    mutate(spec)
    with pytest.raises(ConfigError) as e:
        MultimodalModel(from_dict(ModelConfig, spec, "model"), ClipConfig())
    assert message in str(e.value)
    assert "\n" not in str(e.value)
