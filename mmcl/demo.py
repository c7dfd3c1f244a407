"""``mmcl demo``: synthesise the procedural world, train ``configs/train/demo.yaml`` on it, run the eval
suite on the held-out split, write ``DIR/results.json``. No download; minutes on a laptop CPU."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from mmcl.config import load_config

log = logging.getLogger(__name__)

#: Full demo: enough distinct clips that the video tower learns motion instead of memorising clips.
FULL = {"train": 6000, "test": 256}
#: --quick: a couple of minutes; colour and pitch are learned, direction and shape are not yet.
QUICK = {"train": 1000, "test": 64}


def run_demo(out: Path, quick: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    from mmcl.data.synthetic import synth
    from mmcl.train.loop import train

    sizes = QUICK if quick else FULL
    data_dir = out / "data"
    t0 = time.time()
    world_file = data_dir / "world.json"
    world = json.loads(world_file.read_text()) if world_file.is_file() else None
    if not world or world["splits"]["train"]["n"] != sizes["train"] or world["splits"]["test"]["n"] != sizes["test"]:
        log.info("synthesising %d train + %d held-out clips into %s", sizes["train"], sizes["test"], data_dir)
        synth(data_dir, train=sizes["train"], test=sizes["test"], world="simple", seed=0)
        world = json.loads(world_file.read_text())
    synth_seconds = time.time() - t0
    paths = [
        f"data.train={data_dir / world['splits']['train']['pattern']}",
        f"data.test={data_dir / world['splits']['test']['pattern']}",
        f"model.modalities.text.tokenizer={(data_dir / 'tokenizer.model').resolve()}",
    ]
    if quick:
        paths += ["train.epochs=5", "train.warmup_steps=10", "train.log_every=5"]
    cfg = load_config("demo", paths + list(overrides or []))
    results = train(cfg, out / "run")
    results["demo"] = {"synth_seconds": round(synth_seconds, 1), "total_seconds": round(time.time() - t0, 1),
                       "train_clips": sizes["train"], "test_clips": sizes["test"]}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
