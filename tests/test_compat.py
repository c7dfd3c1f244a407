"""Models saved by an earlier main load with today's code and give the same embeddings.

The fixtures under ``tests/fixtures/compat_v<format>/`` were written by ``tests/fixtures/make_compat_models.py``
run in a checkout of that main (never hand-edited): each holds a ``save_pretrained`` directory and
``expected.safetensors`` with a fixed input batch and the embeddings that code computed for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmcl.model import MultimodalModel

FIXTURES = Path(__file__).parent / "fixtures"
SAVED = sorted(p for p in FIXTURES.glob("compat_v*/*") if (p / "expected.safetensors").is_file())


def test_fixtures_exist() -> None:
    """Format 1 (the first saved format) with every layout: separate towers, shared trunk, timm, transformers."""
    assert {p.name for p in SAVED if p.parent.name == "compat_v1"} == {"towers", "shared", "timm", "hf_text"}


@pytest.mark.parametrize("saved", SAVED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_saved_model_loads_with_the_same_embeddings(saved: Path) -> None:
    written_format = json.loads((saved / "config.json").read_text())["mmcl_format"]
    assert saved.parent.name == f"compat_v{written_format}"
    expected = load_file(str(saved / "expected.safetensors"))
    inputs = {k.removeprefix("input."): v for k, v in expected.items() if k.startswith("input.")}
    model = MultimodalModel.from_pretrained(saved).eval()
    with torch.no_grad():
        emb = model.encode(inputs)
    assert set(emb) == set(inputs)
    for name, z in emb.items():
        torch.testing.assert_close(z, expected[f"embedding.{name}"], rtol=0, atol=1e-6)
