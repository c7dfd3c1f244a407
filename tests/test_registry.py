"""Adding a modality is one file and a config: this module is that file for a new modality (the synthetic
world's JSON labels as attribute ids), registered with ``register_modality`` and named by ``kind`` in a
model config; with nothing else touched it trains beside video and text, with separate towers and with
the shared trunk, and round-trips through save/load."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mmcl.config import Config, ConfigError, from_dict
from mmcl.data.synthetic import ATTRIBUTES
from mmcl.modalities import Modality, SampleError, TokenEmbedder, Tower, available_modalities, register_modality
from mmcl.model import MultimodalModel
from mmcl.train.loop import train


@dataclass
class AttributesConfig:
    #: Label names read from the sample's JSON (``labels``), each one token / one embedding.
    names: list[str] = field(default_factory=lambda: ["colour", "shape"])
    width: int = 16


@register_modality
class Attributes(Modality):
    """``json["labels"][name]`` for each name -> the value's index in one table ``[len(names)]`` int64."""

    kind = "test_attributes"
    Config = AttributesConfig
    members = ("json",)

    def __init__(self, name: str, cfg: AttributesConfig, base_dir: Any = None):
        super().__init__(name, cfg, base_dir)
        self.offsets = {}
        for label in cfg.names:
            self.offsets[label] = sum(len(ATTRIBUTES[n]) for n in self.offsets)
        self.size = sum(len(ATTRIBUTES[n]) for n in cfg.names)

    def decode(self, sample: dict[str, Any]) -> torch.Tensor:
        _, data = self.find_member(sample)
        labels = json.loads(data)["labels"]
        if any(n not in labels for n in self.cfg.names):
            raise SampleError("bad_attributes", "a label is missing")
        return torch.tensor([self.offsets[n] + ATTRIBUTES[n].index(labels[n]) for n in self.cfg.names])

    def transform(self, data: torch.Tensor, train: bool) -> torch.Tensor:
        return data

    def empty(self) -> torch.Tensor:
        return torch.zeros(len(self.cfg.names), dtype=torch.long)

    def build_tower(self) -> Tower:
        return AttributesTower(self.size, self.cfg.width)

    def build_token_embedder(self, width: int) -> TokenEmbedder:
        return AttributeTokens(self.size, len(self.cfg.names), width)


class AttributesTower(Tower):
    """``[N, A]`` ids -> the mean of their embeddings -> ``[N, width]``."""

    def __init__(self, size: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(size, width)
        self.out_dim = width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids).mean(dim=1)


class AttributeTokens(TokenEmbedder):
    """``[N, A]`` ids -> ``[N, A, width]`` tokens (one per attribute, with a learned position)."""

    def __init__(self, size: int, n: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(size, width)
        self.pos = nn.Parameter(torch.zeros(n, width))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.embed(ids) + self.pos, None


def config(data: Path, shared: bool) -> Config:
    spec: dict[str, Any] = {"embed_dim": 16, "modalities": {
        "video": {"frames": 4, "size": 24, "tower": {"width": 32, "depth": 1, "heads": 2, "patch": 12}},
        "text": {"tokenizer": str(data / "tokenizer.model"), "max_len": 24,
                 "tower": {"width": 32, "depth": 1, "heads": 2}},
        "attrs": {"kind": "test_attributes", "names": ["colour", "shape", "direction"]},
    }}
    if shared:
        spec["shared_trunk"] = {"width": 32, "depth": 1, "heads": 2}
    return from_dict(Config, {
        "model": spec, "objective": {"name": "symile"},
        "data": {"train": str(data / "train-{000000..000003}.tar"), "batch_size": 8, "shuffle_buffer": 8},
        "train": {"steps": 2, "warmup_steps": 1, "log_every": 1, "progress": False},
    })


def test_a_new_modality_is_registered_and_validated():
    assert "test_attributes" in available_modalities()
    with pytest.raises(ConfigError) as e:
        MultimodalModel(from_dict(Config, {"model": {"modalities": {
            "attrs": {"kind": "test_attributes", "names": "colour"}, "b": {"kind": "vector", "dim": 2}}}}).model)
    assert str(e.value) == "model.modalities.attrs.names: expected a list, got 'colour'"


@pytest.mark.parametrize("shared", [False, True], ids=["towers", "shared_trunk"])
def test_a_new_modality_trains_and_round_trips(synthetic_data: Path, tmp_path: Path, shared: bool):
    cfg = config(synthetic_data, shared)
    summary = train(cfg, tmp_path)
    assert summary["train"]["steps"] == 2 and summary["data"]["skipped"] == {}
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] == r["loss"] for r in log)
    model = MultimodalModel.from_pretrained(tmp_path / "final")
    attrs = model.modalities["attrs"]
    assert isinstance(attrs, Attributes) and attrs.cfg.names == ["colour", "shape", "direction"]
    ids = attrs.decode({"json": json.dumps({"labels": {"colour": "red", "shape": "square",
                                                       "direction": "up"}}).encode()})
    assert ids.tolist() == [ATTRIBUTES["colour"].index("red"), len(ATTRIBUTES["colour"])
                            + ATTRIBUTES["shape"].index("square"),
                            len(ATTRIBUTES["colour"]) + len(ATTRIBUTES["shape"]) + ATTRIBUTES["direction"].index("up")]
    with torch.no_grad():
        emb = model.encode({"attrs": ids[None]})["attrs"]
    assert emb.shape == (1, 16) and torch.isfinite(emb).all()
