"""Exact mid-epoch resume after a real SIGKILL of a real training process (tree), single-process and
2-rank ZeRO-2 and ZeRO-3, and with the RAM cache (``data.cache``) killed in a cached epoch, 1 process (with and without a
loader worker) and 2 DDP ranks: the logged sample keys equal the uninterrupted run's (no sample repeated or skipped within
an epoch) and the final weights are equal. A SIGKILL in the middle of a checkpoint write leaves the previous
checkpoint loadable and ``--resume latest`` picks it."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from test_distributed import (
    CHECKPOINT_EVERY,
    B,
    STEPS,
    TIMEOUT,
    WORLD,
    Runs,
    check_run,
    launch_command,
    max_weight_diff,
    read_log,
    runs,  # noqa: F401  (the session's equivalence runs: the uninterrupted 2-rank ZeRO-2 run)
    single_command,
    tiny_config,
    world_size,
)

from mmcl.model import MultimodalModel
from mmcl.train.checkpoint import TMP_PREFIX, load_checkpoint, resolve_resume

SAMPLES = 64  # the equivalence data set


def start(cmd: list[str], env: dict[str, str] | None, out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"console-{time.monotonic_ns()}.txt", "w") as console:
        return subprocess.Popen(cmd, env=env, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)


def signal_tree(proc: subprocess.Popen, sig: signal.Signals) -> None:
    """``sig`` to the launched process and every process below it (torchrun puts its ranks in sessions of
    their own, so a process-group signal would miss them)."""
    try:
        parent = psutil.Process(proc.pid)
        tree = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def sigkill(proc: subprocess.Popen) -> None:
    signal_tree(proc, signal.SIGKILL)
    proc.wait(timeout=60)


def last_logged_step(out: Path) -> int:
    path = out / "log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except json.JSONDecodeError:  # a line being written
            continue
    return 0


def kill_at_step(proc: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while last_logged_step(out) < step:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"step {step} not reached in {TIMEOUT} s"
        time.sleep(0.02)
    sigkill(proc)


def kill_during_checkpoint_write(proc: subprocess.Popen, ckpt_root: Path) -> int:
    """Freeze the run as soon as a checkpoint's temporary directory appears; if it is still being written
    (not yet renamed), SIGKILL it and return that step, else let it go on to the next checkpoint."""
    stale = {p.name for p in ckpt_root.glob(f"{TMP_PREFIX}*")}
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) without a checkpoint write caught"
        assert time.monotonic() < deadline
        fresh = [p for p in ckpt_root.glob(f"{TMP_PREFIX}*") if p.name not in stale]
        if fresh:
            signal_tree(proc, signal.SIGSTOP)
            step = int(fresh[0].name.removeprefix(TMP_PREFIX).split("_")[0])
            if fresh[0].exists() and not (ckpt_root / f"step_{step}").exists():
                sigkill(proc)
                return step
            signal_tree(proc, signal.SIGCONT)
            stale.add(fresh[0].name)
        time.sleep(0.001)


def check_same_history(out: Path, reference: Path, samples_per_step: int) -> None:
    """The resumed run's log (its history up to its final weights) against the uninterrupted run's."""
    log, ref = read_log(out), read_log(reference)
    assert [r["step"] for r in log] == [r["step"] for r in ref]
    for a, b in zip(ref, log):
        assert b["keys"] == a["keys"], f"step {a['step']}: other samples"
        assert b["loss"] == a["loss"], f"step {a['step']}: loss {b['loss']} vs {a['loss']}"
    by_epoch: dict[int, list[str]] = {}
    for r in log:
        assert len(r["keys"]) == samples_per_step
        by_epoch.setdefault(r["epoch"], []).extend(r["keys"])
    for epoch, keys in by_epoch.items():
        assert len(set(keys)) == len(keys), f"epoch {epoch}: a sample repeated"
    assert len(by_epoch[0]) == SAMPLES  # the first epoch complete: none skipped
    assert max_weight_diff(out / "final" / "model.safetensors", reference / "final" / "model.safetensors") <= 1e-6


@pytest.mark.slow
def test_sigkill_and_resume_single_process(runs: Runs, tmp_path: Path) -> None:  # noqa: F811
    """Sample shuffle buffer, per-epoch shard shuffle, a loader worker and random audio crops: the data
    stream and every RNG must come back exactly."""
    cfg: dict[str, Any] = tiny_config(runs.data)
    cfg["data"].update(batch_size=8, shuffle_buffer=16, workers=1)
    cfg["model"]["modalities"]["audio"]["seconds"] = 1.0  # random 1 s crops of the 2 s clips
    cfg["train"].update(steps=16, checkpoint_every=2)  # 2 epochs of 8 steps
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    reference, out = tmp_path / "uninterrupted", tmp_path / "run"
    r = subprocess.run(single_command(config, reference), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=TIMEOUT)
    check_run(r, "uninterrupted run")

    kill_step = random.randint(3, 13)
    kill_at_step(start(single_command(config, out), None, out), out, kill_step)
    ckpt_root = out / "checkpoints"
    before = resolve_resume("latest", ckpt_root)
    assert before is not None, f"killed at step {kill_step}: no checkpoint"

    torn = kill_during_checkpoint_write(start(single_command(config, out, "--resume", "latest"), None, out),
                                        ckpt_root)
    assert list(ckpt_root.glob(f"{TMP_PREFIX}{torn}_*")) and not (ckpt_root / f"step_{torn}").exists()
    latest = resolve_resume("latest", ckpt_root)
    assert latest == ckpt_root / f"step_{torn - 2}", (kill_step, torn, latest)
    _, state = load_checkpoint(latest)
    assert state["step"] == torn - 2
    MultimodalModel.from_pretrained(latest)

    r = subprocess.run(single_command(config, out, "--resume", "latest"), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    check_run(r, f"resume after kills at step {kill_step} and in the write of step {torn}")
    assert f"resumed from {latest}" in r.stdout
    assert not list(ckpt_root.glob(f"{TMP_PREFIX}*"))  # the torn write cleaned up
    check_same_history(out, reference, samples_per_step=8)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_sigkill_and_resume_two_ranks_zero(runs: Runs, tmp_path: Path, mode: str) -> None:  # noqa: F811
    """ZeRO-3 too: its model is partitioned while built, and the resumed run's weights come back from the
    DeepSpeed checkpoint into the partitions."""
    reference = runs.get("torchrun", mode)
    out = tmp_path / "run"
    kill_step = random.randint(CHECKPOINT_EVERY + 1, STEPS - 1)
    cmd, env = launch_command("torchrun", mode, runs.config, out)
    kill_at_step(start(cmd, env, out), out, kill_step)
    latest = resolve_resume("latest", out / "checkpoints")
    assert latest is not None and (latest / "deepspeed").is_dir(), kill_step

    cmd, env = launch_command("torchrun", mode, runs.config, out, "--resume", "latest")
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    check_run(r, f"resume after a kill at step {kill_step}")
    assert world_size(out) == WORLD
    check_same_history(out, reference, samples_per_step=WORLD * B)


def cached_config(data: Path, tmp_path: Path, workers: int, batch: int, steps: int) -> Path:
    """The equivalence data with ``data.cache`` on, a sample shuffle buffer, random 1 s audio crops and the
    augmentation on (their draws must come back too, also in a persistent loader worker), ``steps`` running
    into the fourth epoch."""
    cfg: dict[str, Any] = tiny_config(data)
    cfg["model"]["modalities"]["audio"]["seconds"] = 1.0
    cfg["data"].update(batch_size=batch, shuffle_buffer=16, workers=workers, cache=True,
                       augment={"video": {"scale": [0.4, 1.0], "flip": True, "saturation": 0.3},
                                "audio": {"time_masks": 2, "freq_masks": 2}})
    cfg["train"].update(steps=steps, checkpoint_every=2)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def resume_in_epoch_two(cmd: Any, out: Path, steps_per_epoch: int) -> tuple[int, Path]:
    """Kill a run (``cmd(out, *args) -> (argv, env)``) at a random step of its third epoch such that its latest
    checkpoint lies in that epoch too, then resume it to the end."""
    kill_step = random.randint(2 * steps_per_epoch + 3, 3 * steps_per_epoch - 1)
    argv, env = cmd(out)
    kill_at_step(start(argv, env, out), out, kill_step)
    latest = resolve_resume("latest", out / "checkpoints")
    assert latest is not None
    _, state = load_checkpoint(latest)
    assert state["epoch"] == 2 and state["batch_in_epoch"] > 0, (kill_step, latest)
    argv, env = cmd(out, "--resume", "latest")
    r = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    check_run(r, f"resume after a kill at step {kill_step}")
    assert f"resumed from {latest}" in r.stdout and "another order" not in r.stdout
    return kill_step, latest


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_sigkill_and_resume_with_the_cache_in_epoch_two(runs: Runs, tmp_path: Path, workers: int) -> None:  # noqa: F811
    """``data.cache: true``: a run killed in its third epoch (read from the RAM cache, which the resumed process
    does not have) resumes into the uninterrupted run's keys, losses and weights."""
    config = cached_config(runs.data, tmp_path, workers, batch=8, steps=28)  # 8 steps per epoch
    reference = tmp_path / "uninterrupted"
    r = subprocess.run(single_command(config, reference), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=TIMEOUT)
    check_run(r, "uninterrupted run")
    resume_in_epoch_two(lambda out, *args: (single_command(config, out, *args), None), tmp_path / "run",
                        steps_per_epoch=8)
    check_same_history(tmp_path / "run", reference, samples_per_step=8)


@pytest.mark.slow
def test_sigkill_and_resume_with_the_cache_two_ranks(runs: Runs, tmp_path: Path) -> None:  # noqa: F811
    config = cached_config(runs.data, tmp_path, workers=0, batch=B, steps=28)  # 8 steps of 2 x B per epoch
    reference = tmp_path / "uninterrupted"
    cmd, env = launch_command("torchrun", "ddp", config, reference)
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    check_run(r, "uninterrupted run")
    assert world_size(reference) == WORLD
    out = tmp_path / "run"
    resume_in_epoch_two(lambda o, *args: launch_command("torchrun", "ddp", config, o, *args), out, steps_per_epoch=8)
    assert world_size(out) == WORLD
    check_same_history(out, reference, samples_per_step=WORLD * B)
