"""End to end through the real CLI: synthesise shards, train, evaluate, reload and re-evaluate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def mmcl(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "mmcl.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_small_demo_learns_and_eval_reproduces(tmp_path):
    out = tmp_path / "demo"
    mmcl("demo", "--out", str(out), "--quick")
    results = json.loads((out / "results.json").read_text())
    zs, rt = results["zeroshot_classification"], results["retrieval"]
    # Chance: colour 1/6, pitch 1/3; the quick run trains on 256 clips for a few dozen steps.
    assert zs["video->colour"]["acc1"] >= 0.5, zs
    assert zs["audio->pitch"]["acc1"] >= 0.6, zs
    assert rt["text->video"]["R@10"] > 3 * 10 / rt["text->video"]["n"], rt
    assert results["data"]["skipped"] == {}
    assert results["train"]["steps"] > 0 and results["train"]["samples"] > 0

    # The run's files: a log line per logged step, a loadable final model, the eval reports.
    lines = [json.loads(x) for x in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == sorted(ln["step"] for ln in lines)
    assert {"step", "loss", "lr", "samples", "samples_per_s"} <= set(lines[-1])
    assert (out / "run" / "final" / "model.safetensors").is_file()
    assert (out / "run" / "eval" / "summary.md").is_file()

    # `mmcl eval` on the saved model reproduces the run's own numbers.
    world = json.loads((out / "data" / "world.json").read_text())
    test = str(out / "data" / world["splits"]["test"]["pattern"])
    mmcl("eval", "--suite", "synthetic", "--model", str(out / "run" / "final"), "--data", test,
         "--out", str(tmp_path / "eval"))
    again = json.loads((tmp_path / "eval" / "results.json").read_text())
    for kind in ("zeroshot_classification", "retrieval"):
        for task, metrics in results[kind].items():
            for k, v in metrics.items():
                assert again[kind][task][k] == pytest.approx(v, abs=1e-6, nan_ok=True), (task, k)
