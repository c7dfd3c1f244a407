"""Adding a modality is one file and a config: this module is that file for a new modality (the synthetic
world's JSON labels as attribute ids), its processor registered with ``register_processor`` and its tower type
with ``register_tower``, named by ``kind`` in a model config; with nothing else touched it trains beside video
and text, with separate towers and with the shared trunk, and round-trips through save/load. Adding a tower
type to an existing modality is one ``register_tower`` call (here: a video tower of pooled pixels)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mmcl.config import Config, ConfigError, from_dict
from mmcl.data.context import SampleContext
from mmcl.data.shards import build_loader
from mmcl.data.synthetic import ATTRIBUTES
from mmcl.modalities import (Processor, SampleError, TokenEmbedder, Tower, available_modalities, register_processor,
                             register_tower)
from mmcl.modalities.video import StandardizedFrames
from mmcl.model import MultimodalModel
from mmcl.train.loop import train


@dataclass
class AttributesTowerConfig:
    type: Literal["embedding"] = "embedding"
    width: int = 16


@dataclass
class AttributesConfig:
    #: Label names read from the sample's JSON (``labels``), each one token / one embedding.
    names: list[str] = field(default_factory=lambda: ["colour", "shape"])
    tower: Any = None


@register_processor
class Attributes(Processor):
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

    def decode(self, sample: dict[str, Any], ctx: SampleContext | None = None) -> torch.Tensor:
        _, data = self.find_member(sample)
        labels = json.loads(data)["labels"]
        if any(n not in labels for n in self.cfg.names):
            raise SampleError("bad_attributes", "a label is missing")
        return torch.tensor([self.offsets[n] + ATTRIBUTES[n].index(labels[n]) for n in self.cfg.names])

    def transform(self, data: torch.Tensor, train: bool, ctx: SampleContext | None = None) -> torch.Tensor:
        return data

    def empty(self) -> torch.Tensor:
        return torch.zeros(len(self.cfg.names), dtype=torch.long)


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


register_tower("test_attributes", "embedding", config=AttributesTowerConfig,
               build=lambda attrs, pretrained: AttributesTower(attrs.size, attrs.cfg.tower.width),
               embedder=lambda attrs, width: AttributeTokens(attrs.size, len(attrs.cfg.names), width))


@dataclass
class PixelTowerConfig:
    type: Literal["test_pixels"] = "test_pixels"
    width: int = 16


class PixelTower(Tower):
    """``[N, T, 3, S, S]`` standardised frames -> a 1x1 convolution -> the mean over frames and pixels."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=1)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(0, 1)).mean(dim=(2, 3)).view(x.shape[0], x.shape[1], -1).mean(dim=1)


register_tower("video", "test_pixels", config=PixelTowerConfig, inputs=lambda video: StandardizedFrames(),
               build=lambda video, pretrained: PixelTower(video.cfg.tower.width))


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
    assert_round_trips(model, tmp_path / "final", synthetic_data, tmp_path / "again")
    attrs = model.processors["attrs"]
    assert isinstance(attrs, Attributes) and attrs.cfg.names == ["colour", "shape", "direction"]
    ids = attrs.decode({"json": json.dumps({"labels": {"colour": "red", "shape": "square",
                                                       "direction": "up"}}).encode()})
    assert ids.tolist() == [ATTRIBUTES["colour"].index("red"), len(ATTRIBUTES["colour"])
                            + ATTRIBUTES["shape"].index("square"),
                            len(ATTRIBUTES["colour"]) + len(ATTRIBUTES["shape"]) + ATTRIBUTES["direction"].index("up")]
    with torch.no_grad():
        emb = model.encode({"attrs": ids[None]})["attrs"]
    assert emb.shape == (1, 16) and torch.isfinite(emb).all()


def assert_round_trips(model: MultimodalModel, source: Path, data: Path, out: Path) -> None:
    """``model`` (loaded from ``source``) holds the weights saved there; saved again and loaded, it has the same
    weights and gives the same embeddings of a batch of real samples (decoded by its own processors)."""
    saved = load_file(str(source / "model.safetensors"))
    state = model.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    model.eval().save_pretrained(out)
    loaded = MultimodalModel.from_pretrained(out).eval()
    again = loaded.state_dict()
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)
    batch = next(iter(build_loader(str(data / "test-000000.tar"), loaded.processors, 6, train=False)))
    with torch.no_grad():
        want, got = model.encode(batch["inputs"]), loaded.encode(batch["inputs"])
    assert set(got) == set(model.processors)
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_a_tower_type_registered_here_builds_trains_and_round_trips(synthetic_data: Path, tmp_path: Path):
    """``PixelTower`` is registered above for the built-in video modality and nothing else changes."""
    cfg = config(synthetic_data, shared=False)
    cfg.model.modalities["video"]["tower"] = {"type": "test_pixels", "width": 8}
    del cfg.model.modalities["attrs"]
    summary = train(cfg, tmp_path)
    assert summary["train"]["steps"] == 2
    model = MultimodalModel.from_pretrained(tmp_path / "final")
    assert isinstance(model.towers["video"], PixelTower) and model.towers["video"].proj.out_channels == 8
    assert_round_trips(model, tmp_path / "final", synthetic_data, tmp_path / "again")
    with pytest.raises(ConfigError) as e:
        MultimodalModel(from_dict(Config, {"model": {"modalities": {
            "video": {"tower": {"type": "test_pixels", "width": 8}}, "b": {"kind": "vector", "dim": 2}},
            "shared_trunk": {"width": 8, "depth": 1, "heads": 1}}}).model)
    assert str(e.value) == ("model.modalities.video.tower.type: 'test_pixels' towers are not available with "
                            "model.shared_trunk (allowed: 'tubelet')")
