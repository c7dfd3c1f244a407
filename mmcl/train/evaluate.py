"""Eval during and after training: the eval suite (``eval.suite``) on the exported plain model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mmcl.config import Config, to_dict
from mmcl.model import MultimodalModel
from mmcl.train.engine import Engine
from mmcl.train.logs import RunLog


def periodic_eval(engine: Engine, cfg: Config, step: int, log: RunLog) -> None:
    """Every ``eval.every`` steps: the suite's flat metrics into the log (tensorboard: the non-NaN ones).
    Every rank calls it (the export is a collective under DeepSpeed); the main process evaluates."""
    if not cfg.eval.suite:
        return
    plain = engine.export()
    if engine.is_main:
        from mmcl.eval.suite import flat_metrics, load_suite, run_suite

        results = run_suite(plain, load_suite(cfg.eval.suite), cfg.data.test, workers=cfg.data.workers,
                            clip=cfg.data.clip)
        flat = flat_metrics(results)
        log.write({"step": step, **flat}, {k: v for k, v in flat.items() if not math.isnan(v)})
    engine.model.train()  # the suite put the model in eval mode (a single process exports the model itself)
    engine.wait()


def save_final(final: MultimodalModel, cfg: Config, out: Path) -> dict[str, Any]:
    """``out/final`` (save_pretrained), then the suite on it into ``out/eval`` and the model card; returns
    the suite's results (empty without ``eval.suite``). Main process only."""
    final.save_pretrained(out / "final", data_clip=cfg.data.clip)  # benchmarks default to its window
    if not cfg.eval.suite:
        return {}
    from mmcl.eval.suite import load_suite, run_suite

    from mmcl.hub import read_eval_dir, write_model_card

    results = run_suite(final, load_suite(cfg.eval.suite), cfg.data.test, workers=cfg.data.workers,
                        out_dir=out / "eval", model_name=str(out / "final"), clip=cfg.data.clip)
    write_model_card(out / "final", read_eval_dir(out / "eval"), to_dict(cfg))
    return {k: v for k, v in results.items() if k != "eval_data"}
