"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmcl.config import load_config
from mmcl.data.synthetic import synth
from mmcl.model import MultimodalModel


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny simple-world dataset written by the project's generator: 64 train samples in 4 shards
    (``train-{000000..000003}.tar``), 32 test samples in 2, ``tokenizer.model``, ``sizes.json``,
    ``world.json``. Shared by the whole session: copy before changing it."""
    out = tmp_path_factory.mktemp("synthetic")
    synth(out, train=64, test=32, per_shard=16, workers=2)
    return out


@pytest.fixture(scope="module")
def model(synthetic_data: Path) -> MultimodalModel:
    """The untrained tiny model of ``test_distributed.tiny_config`` (seed 0) on the synthetic data's tokenizer,
    in eval mode: one per test module."""
    from test_distributed import tiny_config

    cfg = load_config(base=tiny_config(synthetic_data))
    torch.manual_seed(0)
    return MultimodalModel(cfg.model, cfg.objective).eval()
