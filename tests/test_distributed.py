"""Scale-out with real launchers and real processes (gloo, CPU).

Two ranks under ``torchrun``, ``accelerate launch`` and the ``deepspeed`` launcher, each with DDP and
DeepSpeed ZeRO-1/2/3, train the loss trajectory of one process on the same global batches: every shard
holds one per-rank batch, shards are not sample-shuffled, so one process with batch 2B reads shards
(2i, 2i+1) exactly as ranks 0 and 1 read shards 2i and 2i+1 (the shard order, reshuffled every epoch, is
the same on every rank). The CLIP loss only matches if the negatives are gathered across the ranks.
Bad launcher settings and a data set that cannot be split over the ranks fail in one line.

The runs are launched once per session and kept under the session's temporary directory
(:class:`Runs`), so ``test_resume.py`` can compare against them too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmcl.data.synthetic import synth
from mmcl.model import MultimodalModel

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
B = 4  # per-rank batch = samples per shard
SHARDS = 16  # 64 samples: 8 steps of 2B per epoch
STEPS = 12  # into the second epoch
CHECKPOINT_EVERY = 4
TOL = 1e-4
LAUNCHERS = ("torchrun", "accelerate", "deepspeed")
MODES = ("ddp", "zero1", "zero2", "zero3")
TIMEOUT = 900


def tiny_config(data: Path, shards: int = SHARDS) -> dict[str, Any]:
    """Training on the first ``shards`` shards of ``data`` with a model small enough that a step takes
    milliseconds. The audio window is longer than the 2 s clips, so training draws no random crop (one
    process and two ranks draw from different RNG streams); the CLIP logit scale is clamped below its
    initial value, so the clamp acts (and must reach DeepSpeed's fp32 copy of the weights)."""
    return {
        "model": {"embed_dim": 16, "modalities": {
            "video": {"frames": 4, "size": 24, "tower": {"width": 32, "depth": 2, "heads": 2, "patch": 12}},
            "audio": {"n_mels": 32, "seconds": 3.0, "tower": {"width": 32, "depth": 1, "heads": 2, "patch": 16}},
            "text": {"tokenizer": str(data / "tokenizer.model"), "max_len": 24,
                     "tower": {"width": 32, "depth": 1, "heads": 2, "pooling": "mean"}},
        }},
        "objective": {"name": "clip", "max_logit_scale": 10.0},
        "data": {"train": str(data / f"train-{{000000..{shards - 1:06d}}}.tar"), "batch_size": B, "workers": 0,
                 "shuffle_buffer": 0, "shard_shuffle": True},
        "train": {"steps": STEPS, "lr": 1e-3, "warmup_steps": 3, "log_every": 1, "log_keys": True,
                  "checkpoint_every": CHECKPOINT_EVERY, "keep_last": 2, "progress": False, "threads": 1},
    }


def launch_command(launcher: str, mode: str, config: Path, out: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of ``launch/<launcher>.sh`` for ``mode`` (ddp | zero1..3)."""
    env = {**os.environ, "PYTHON": sys.executable, "NPROC": str(WORLD), "OMP_NUM_THREADS": "1"}
    train_args = [str(config), "--out", str(out), *args]
    stage = mode.removeprefix("zero") if mode != "ddp" else "0"
    if launcher == "torchrun":
        if mode != "ddp":
            train_args += ["--set", f"train.deepspeed={ROOT}/configs/deepspeed/{mode}.json"]
    elif launcher == "accelerate":
        env["ACCEL"] = mode
    elif launcher == "deepspeed":
        env["ZERO"] = stage
    else:
        raise ValueError(launcher)
    return ["bash", str(ROOT / "launch" / f"{launcher}.sh"), *train_args], env


def single_command(config: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mmcl.cli", "train", "--config", str(config), "--out", str(out), *args]


def check_run(r: subprocess.CompletedProcess, what: str) -> None:
    assert r.returncode == 0, f"{what} failed (rc {r.returncode}):\n{r.stdout[-4000:]}"


def read_log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def world_size(out: Path) -> int:
    return json.loads((out / "results.json").read_text())["train"]["world_size"]


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


class Runs:
    """The equivalence set-up under ``root`` (data, config) and its training runs, each launched once: a run
    whose ``results.json`` exists is reused."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        if not (self.data / "world.json").is_file():
            synth(self.data, train=SHARDS * B, test=B, per_shard=B, workers=2)
        self.config = root / "config.yaml"
        if not self.config.is_file():
            self.config.write_text(yaml.safe_dump(tiny_config(self.data)))

    def _run(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Path:
        out = self.root / name
        if not (out / "results.json").is_file():
            subprocess.run(["rm", "-rf", str(out)], check=True)
            r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=TIMEOUT, cwd=self.root)
            check_run(r, name)
        return out

    def single(self) -> Path:
        """One process on the global batch (2B)."""
        return self._run("single", single_command(self.config, self.root / "single",
                                                  "--set", f"data.batch_size={WORLD * B}"))

    def get(self, launcher: str, mode: str) -> Path:
        cmd, env = launch_command(launcher, mode, self.config, self.root / f"{launcher}-{mode}")
        return self._run(f"{launcher}-{mode}", cmd, env)


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.getbasetemp() / "equivalence"
    root.mkdir(exist_ok=True)
    return Runs(root)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_ranks_train_like_one_process(runs: Runs, launcher: str, mode: str) -> None:
    check_like_one_process(runs, launcher, mode)


def check_like_one_process(runs: Runs, launcher: str, mode: str) -> None:
    """``launcher`` with ``mode`` on 2 ranks: the single process's global batches, losses and weights."""
    ref_dir, out = runs.single(), runs.get(launcher, mode)
    assert world_size(ref_dir) == 1
    assert world_size(out) == WORLD, f"{launcher} {mode} did not start {WORLD} ranks"
    ref, log = read_log(ref_dir), read_log(out)
    assert [r["step"] for r in log] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(ref, log):
        assert len(b["keys"]) == WORLD * B
        assert sorted(b["keys"]) == sorted(a["keys"]), f"step {a['step']}: another global batch"
        assert abs(b["loss"] - a["loss"]) <= TOL, f"step {a['step']}: loss {b['loss']} vs {a['loss']}"
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-6)
        assert b["logit_scale"] <= 10.0 + 1e-4
    assert max_weight_diff(out / "final" / "model.safetensors", ref_dir / "final" / "model.safetensors") <= TOL
    # Every checkpoint is one fp32 safetensors file that from_pretrained loads (under ZeRO-3 gathered from
    # the ranks' partitions); the last one holds the final weights.
    last = out / "checkpoints" / f"step_{STEPS}"
    model = MultimodalModel.from_pretrained(last)
    final = load_file(str(out / "final" / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, final[k]), k
    if mode != "ddp":
        assert (last / "deepspeed").is_dir()


@pytest.mark.slow
def test_unsplittable_data_fails_before_training(runs: Runs, tmp_path: Path) -> None:
    """1 shard over 2 ranks: webdataset would starve a rank (and hang the collectives); refused up front."""
    cfg = tiny_config(runs.data)
    cfg["data"]["train"] = str(runs.data / "train-000000.tar")
    config = tmp_path / "one_shard.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd, env = launch_command("torchrun", "ddp", config, tmp_path / "out")
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    assert r.returncode != 0
    assert "1 shard(s) cannot be split over 2 rank(s) x 1 worker(s)" in r.stdout
    assert not (tmp_path / "out" / "log.jsonl").exists()


@pytest.mark.parametrize("launcher, env, message", [
    ("accelerate", {"ACCEL": "zero4"}, "unknown ACCEL=zero4 (allowed: ddp, zero1, zero2, zero3)"),
    ("deepspeed", {"ZERO": "5"}, "unknown ZERO=5 (allowed: 0 (DDP), 1, 2, 3)"),
    ("torchrun", {"NPROC": "two"}, "NPROC=two is not a positive integer"),
])
def test_bad_launcher_settings_fail_in_one_line(tmp_path: Path, launcher: str, env: dict[str, str],
                                                message: str) -> None:
    r = subprocess.run(["bash", str(ROOT / "launch" / f"{launcher}.sh"), "config.yaml", "--out", str(tmp_path)],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == f"launch/{launcher}.sh: {message}"
    assert list(tmp_path.iterdir()) == []
