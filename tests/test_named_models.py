"""The named model configs (configs/models): small and base have exactly the parameters their architecture
implies (counted here from the config alone), counts taken on the meta device equal those of the real model,
``mmcl models`` lists every config with its counts per tower, and text's ``vocab_size`` (which lets small
and base build without a tokenizer file) sizes the table or fails in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mmcl.cli import main as mmcl_main
from mmcl.config import CONFIG_DIR, ConfigError, ModelConfig, from_dict
from mmcl.model import MultimodalModel

NAMED = sorted(f.stem for f in (CONFIG_DIR / "models").glob("*.yaml"))


def vit_block(w: int, mlp_ratio: float = 4.0) -> int:
    """A timm ViT block: 2 LayerNorms, qkv (with bias), output projection, 2-layer MLP."""
    h = int(w * mlp_ratio)
    return 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * h + h) + (h * w + w)


def bert_layer(w: int, mlp_ratio: float = 4.0) -> int:
    """A BERT layer: query, key, value and output projections, 2 LayerNorms, intermediate and output dense."""
    h = int(w * mlp_ratio)
    return 4 * (w * w + w) + 2 * 2 * w + (w * h + h) + (h * w + w)


def expected_counts(spec: dict[str, Any]) -> dict[str, int]:
    """Parameters per part of a separate-tower config with linear patch stems and a sized text table."""
    v, a, t = (spec["modalities"][m] for m in ("video", "audio", "text"))
    vt, at, tt = v["tower"], a["tower"], t["tower"]
    counts = {
        "video": 3 * vt["tubelet"] * vt["patch"] ** 2 * vt["width"] + vt["width"]    # tubelet projection
        + vt["depth"] * vit_block(vt["width"]) + 2 * vt["width"],                   # blocks, final LayerNorm
        "audio": at["patch"] ** 2 * at["width"] + at["width"] + at["depth"] * vit_block(at["width"]) + 2 * at["width"],
        "text": (t["vocab_size"] + t["max_len"] + 1) * tt["width"] + 2 * tt["width"]  # word, position, type; LN
        + tt["depth"] * bert_layer(tt["width"]),
        "heads": (vt["width"] + at["width"] + tt["width"]) * spec["embed_dim"],
        "objective": 1,  # CLIP's logit scale
    }
    counts["total"] = sum(counts.values())
    return counts


def named_spec(name: str, tokenizer: Path) -> dict[str, Any]:
    """The named config, its text tokenizer (if it names a file) pointed at ``tokenizer``."""
    spec = yaml.safe_load((CONFIG_DIR / "models" / f"{name}.yaml").read_text())
    text = spec["modalities"].get("text")
    if text is not None and text.get("tokenizer"):
        text["tokenizer"] = str(tokenizer)
    return spec


@pytest.mark.parametrize("name, total_millions", [("small", (70, 80)), ("base", (275, 290))])
def test_small_and_base_have_the_parameters_of_their_architecture(name: str, total_millions: tuple[int, int]):
    spec = named_spec(name, Path("unused"))
    counts = MultimodalModel(from_dict(ModelConfig, spec, "model"), device="meta").parameter_counts()
    assert counts == expected_counts(spec)
    assert total_millions[0] * 1e6 < counts["total"] < total_millions[1] * 1e6


@pytest.mark.parametrize("name", [n for n in NAMED if n not in ("small", "base")])
def test_meta_counts_equal_the_real_model(name: str, synthetic_data: Path):
    spec = from_dict(ModelConfig, named_spec(name, synthetic_data / "tokenizer.model"), "model")
    meta = MultimodalModel(spec, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    real = MultimodalModel(spec)
    assert meta.parameter_counts() == real.parameter_counts()
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}


def test_cli_lists_every_named_config_with_its_counts(synthetic_data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, capsys):
    # The configs' tokenizers resolve against the working directory: give them the session's.
    for world in ("synthetic", "joint"):
        (tmp_path / "data" / world).mkdir(parents=True)
        (tmp_path / "data" / world / "tokenizer.model").symlink_to(synthetic_data / "tokenizer.model")
    monkeypatch.chdir(tmp_path)
    assert mmcl_main(["models"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert sorted(lines) == NAMED
    for name in NAMED:
        counts = MultimodalModel(from_dict(ModelConfig, named_spec(name, synthetic_data / "tokenizer.model"),
                                           "model"), device="meta").parameter_counts()
        for part, n in counts.items():
            if part not in ("objective", "total"):
                assert f"{part} {n:,}" in lines[name], (name, part)
        assert f"{counts['total'] / 1e6:.2f}M" in lines[name]
    assert "trunk " in lines["tiny_shared"] and "trunk " not in lines["tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small", "base"])
def test_small_and_base_build_for_real_and_encode(name: str):
    """Random weights on the CPU (base: 281 M parameters, 1.1 GB): the counts of the meta build, and one
    sample of each modality encodes to a finite unit vector."""
    spec = named_spec(name, Path("unused"))
    torch.manual_seed(0)
    model = MultimodalModel(from_dict(ModelConfig, spec, "model")).eval()
    assert model.parameter_counts() == expected_counts(spec)
    v, t = (model.processors[m].cfg for m in ("video", "text"))
    a = model.processors["audio"]
    x = {"video": torch.randn(1, v.frames, 3, v.size, v.size), "audio": torch.randn(1, 1, a.cfg.n_mels, a.n_frames),
         "text": torch.randint(1, t.vocab_size, (1, t.max_len))}
    with torch.no_grad():
        emb = model.encode(x)
    for z in emb.values():
        assert z.shape == (1, spec["embed_dim"]) and torch.isfinite(z).all()
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(1))


def text_spec(**text: Any) -> dict[str, Any]:
    return {"embed_dim": 8, "modalities": {
        "vector": {"kind": "vector", "dim": 3},
        "text": {"max_len": 8, "tower": {"width": 16, "depth": 1, "heads": 2}, **text}}}


def test_text_table_sized_by_vocab_size(synthetic_data: Path, tmp_path: Path):
    """``vocab_size`` sizes the table: without a tokenizer (pad id 0; reading text is then a one-line error,
    the model saves and loads without one), or above a tokenizer's vocabulary (whose pad id it keeps)."""
    model = MultimodalModel(from_dict(ModelConfig, text_spec(tokenizer="", vocab_size=500), "model"))
    assert model.towers["text"].encoder.embeddings.word_embeddings.weight.shape == (500, 16)
    assert model.processors["text"].pad_id == 0
    assert torch.equal(model.processors["text"].empty(), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ConfigError) as e:
        model.processors["text"].tokenize("a red square")
    assert str(e.value) == "model.modalities.text.tokenizer: not set; reading text needs one"
    loaded = MultimodalModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    ids = torch.tensor([[5, 7, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        assert torch.equal(loaded.encode({"text": ids})["text"], model.encode({"text": ids})["text"])
    tokenizer = str(synthetic_data / "tokenizer.model")
    model = MultimodalModel(from_dict(ModelConfig, text_spec(tokenizer=tokenizer, vocab_size=500), "model"))
    assert model.towers["text"].encoder.embeddings.word_embeddings.weight.shape == (500, 16)
    assert model.processors["text"].pad_id == model.processors["text"].tokenizer.pad_id


@pytest.mark.parametrize("text, message", [
    # Neither a tokenizer nor vocab_size: the bert tower's default sentencepiece file, absent here.
    ({"tokenizer": ""}, "model.modalities.text.tokenizer: file not found: "),
    ({"vocab_size": -1}, "model.modalities.text.vocab_size: must be >= 0, got -1"),
    ({"vocab_size": 10}, "model.modalities.text.vocab_size: 10 is smaller than the tokenizer's vocabulary (95, "),
])
def test_bad_text_vocab_size_is_one_line(synthetic_data: Path, text: dict[str, Any], message: str):
    spec = text_spec(**{"tokenizer": str(synthetic_data / "tokenizer.model"), **text})
    with pytest.raises(ConfigError) as e:
        MultimodalModel(from_dict(ModelConfig, spec, "model"))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
