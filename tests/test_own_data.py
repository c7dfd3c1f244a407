"""A new user's path, through the real CLI in subprocesses: media made with ffmpeg -> ``mmcl shards build``
-> ``mmcl tokenizer`` -> ``mmcl train --config own_data`` -> ``mmcl eval``; shard specs as users type them
(globs, directories, list files) resolving to the shards of the brace form; the demo keeping its tokenizer
under ``--set model=NAME``; acc5 below 5 classes ("—" in tables, absent from the JSON) with the chance
level beside acc1; ``mmcl doctor`` on a good and a broken config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_distributed import tiny_config

from mmcl.config import load_config
from mmcl.data.shards import DataError, expand_shards
from mmcl.model import MultimodalModel

#: (colour, tone Hz) of the generated clips; captions and labels name them.
CLIPS = [("red", 330), ("green", 440), ("blue", 660)]


def mmcl(*args: str, cwd: Path, ok: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "mmcl.cli", *args], capture_output=True, text=True, timeout=timeout,
                       cwd=cwd)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _strict_json(path: Path) -> dict:
    """Parse refusing NaN / Infinity (not JSON; Python's json writes them)."""
    def refuse(name: str) -> None:
        raise AssertionError(f"{path}: {name} in JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def make_media(folder: Path, n: int, start: int = 0) -> None:
    """``n`` 2 s clips (64 px colour field + a sine tone, H.264/AAC), each with a caption and labels."""
    folder.mkdir(parents=True)
    for i in range(start, start + n):
        colour, hz = CLIPS[i % len(CLIPS)]
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"color=c={colour}:s=64x64:r=8:d=2",
                        "-f", "lavfi", "-i", f"sine=frequency={hz}:sample_rate=16000:duration=2",
                        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
                        str(folder / f"clip_{i:03d}.mp4")], check=True, timeout=60)
        (folder / f"clip_{i:03d}.txt").write_text(f"a {colour} picture with a {hz} hertz tone number {i}\n")
        (folder / f"clip_{i:03d}.json").write_text(json.dumps({"labels": {"colour": colour}}))


@pytest.mark.slow
def test_own_media_build_tokenizer_train_eval(tmp_path: Path) -> None:
    make_media(tmp_path / "raw", 12)
    make_media(tmp_path / "raw_heldout", 6, start=12)
    # The README's three commands, verbatim apart from small shards and a few steps.
    mmcl("shards", "build", "--folder", "raw", "--out", "data/mine", "--workers", "1", "--shard-samples", "4",
         "--size", "112", "--no-progress", cwd=tmp_path)
    r = mmcl("tokenizer", "--shards", "data/mine", "--out", "data/mine/tokenizer.model", "--vocab-size", "200",
             cwd=tmp_path)
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith("12 captions read (12 samples in 3 shard(s)): unigram tokenizer of "), summary
    assert "character coverage 100.00 % -> data/mine/tokenizer.model" in summary
    mmcl("shards", "build", "--folder", "raw_heldout", "--out", "data/heldout", "--workers", "1", "--size", "112",
         "--no-progress", cwd=tmp_path)
    r = mmcl("train", "--config", "own_data", "--data", "data/mine", "--eval-data", "data/heldout/*.tar",
             "--out", "runs/mine", "--set", "train.steps=3", "--set", "data.batch_size=4", "--set", "data.workers=0",
             "--set", "train.log_every=1", "--set", "train.warmup_steps=1", "--set", "train.progress=false",
             cwd=tmp_path)
    assert "| text->video |" in r.stdout, r.stdout
    run = tmp_path / "runs" / "mine"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["train"] == "data/mine" and config["data"]["test"] == "data/heldout/*.tar"
    assert config["model"]["modalities"]["text"]["tokenizer"] == "data/mine/tokenizer.model"
    assert config["eval"]["suite"] == "retrieval"
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [s["step"] for s in steps] == [1, 2, 3]
    results = _strict_json(run / "results.json")
    assert results["retrieval"]["text->video"]["n"] == 6 and results["data"]["skipped"] == {}

    # Eval with labels of 3 classes: acc5 is undefined ("—", no key), chance 1/3 beside acc1.
    (tmp_path / "colour.yaml").write_text(yaml.safe_dump({"tasks": [
        {"name": "video->colour", "type": "zeroshot_classification", "query": ["video"], "label": "colour",
         "classnames": ["red", "green", "blue"], "templates": ["a {} picture"]},
        {"name": "audio->text", "type": "retrieval", "query": ["audio"], "candidates": ["text"]}]}))
    r = mmcl("eval", "--suite", "colour.yaml", "--model", "runs/mine/final", "--data", "data/heldout",
             "--out", "evals/colour", "--no-progress", cwd=tmp_path)
    row = next(line for line in r.stdout.splitlines() if line.startswith("| video->colour |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == ["0.333", "—"] and cells[-2:] == ["6", "3"], row
    assert "nan" not in r.stdout
    metrics = _strict_json(tmp_path / "evals" / "colour" / "results.json")["zeroshot_classification"]["video->colour"]
    assert "acc5" not in metrics and metrics["n_classes"] == 3
    assert "acc5" not in _strict_json(tmp_path / "evals" / "colour" / "zeroshot_classification_video_to_colour.json")[
        "metrics"]
    assert "| video->colour |" in (tmp_path / "evals" / "colour" / "summary.md").read_text()


def test_globs_directories_and_list_files_resolve_to_the_brace_shards(synthetic_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("sizes.json", *(f"train-00000{i}.tar" for i in range(4))):
        shutil.copy(synthetic_data / name, data / name)
    brace = expand_shards(str(data / "train-{000000..000003}.tar"))
    assert len(brace) == 4
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "train.txt"
    listing.write_text("# the training shards\n" + "\n".join(f"../data/{Path(u).name}" for u in brace[:2])
                       + f"\n\n{data}/train-00000[23].tar\n")
    for spec in (str(data / "*.tar"), str(data / "train-*.tar"), str(data), str(data) + "/", str(listing),
                 f"{data}/train-00000[0-1].tar::{data}/train-{{000002..000003}}.tar"):
        assert [str(Path(u).resolve()) for u in expand_shards(spec)] == brace, spec

    for spec, message in ((str(data / "nope-*.tar"), "matches no files"), (str(tmp_path / "lists"), "no shards"),
                          (str(tmp_path / "missing"), "shard not found")):
        with pytest.raises(DataError, match=message):
            expand_shards(spec)
    (tmp_path / "lists" / "outer.txt").write_text("train.txt\n")
    with pytest.raises(DataError, match="lists cannot name other lists"):
        expand_shards(str(tmp_path / "lists" / "outer.txt"))

    # Through the CLI: `mmcl shards inspect` of each form counts the same samples; a glob nothing matches
    # is one line naming the pattern.
    counts = set()
    for spec in ("data/train-{000000..000003}.tar", "data/*.tar", "data", "lists/train.txt"):
        r = mmcl("shards", "inspect", spec, "--json", cwd=tmp_path)
        counts.add(json.loads(r.stdout)["samples"])
    assert counts == {64}
    r = mmcl("shards", "inspect", "data/nope-*.tar", cwd=tmp_path, ok=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "mmcl shards: error: shard pattern data/nope-*.tar matches no files")


def test_named_model_override_keeps_paths_set_before_it() -> None:
    cfg = load_config("demo", ["model.modalities.text.tokenizer=/data/tok.model", "model=tiny_shared",
                               "model.embed_dim=64"])
    assert cfg.model.shared_trunk is not None and cfg.model.embed_dim == 64
    assert cfg.model.modalities["text"]["tokenizer"] == "/data/tok.model"
    assert load_config("demo", ["model=tiny_shared", "model.modalities.text.tokenizer=b"]).model.modalities[
        "text"]["tokenizer"] == "b"


@pytest.mark.slow
def test_demo_with_another_named_model_keeps_its_tokenizer_and_trains(tmp_path: Path) -> None:
    mmcl("demo", "--quick", "--out", "demo", "--set", "model=tiny_shared", "--set", "train.steps=2",
         "--set", "train.progress=false", cwd=tmp_path)
    config = yaml.safe_load((tmp_path / "demo" / "run" / "config.yaml").read_text())
    assert config["model"]["shared_trunk"] is not None
    assert config["model"]["modalities"]["text"]["tokenizer"] == str((tmp_path / "demo" / "data" / "tokenizer.model"))
    results = _strict_json(tmp_path / "demo" / "results.json")
    assert results["train"]["steps"] == 2 and "video->direction" in results["zeroshot_classification"]


def test_eval_tables_show_chance_and_no_acc5_below_5_classes(synthetic_data: Path, tmp_path: Path) -> None:
    cfg = load_config(base=tiny_config(synthetic_data))
    MultimodalModel(cfg.model, cfg.objective).save_pretrained(tmp_path / "model")
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({"tasks": [
        {"name": "video->shape", "type": "zeroshot_classification", "query": ["video"], "label": "shape",
         "classnames": ["circle", "square", "triangle", "cross"]},
        {"name": "video->colour", "type": "zeroshot_classification", "query": ["video"], "label": "colour",
         "classnames": ["red", "green", "blue", "yellow", "magenta", "cyan"]}]}))
    r = mmcl("eval", "--suite", "suite.yaml", "--model", "model", "--data", str(synthetic_data / "test-*.tar"),
             "--out", "out", "--no-progress", cwd=tmp_path)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in r.stdout.splitlines() if line.startswith("| video->")}
    assert "| zero-shot task | acc1 | chance | acc5 |" in r.stdout
    assert rows["video->shape"][2:4] == ["0.250", "—"]
    assert rows["video->colour"][2] == "0.167" and rows["video->colour"][3] not in ("—", "nan")
    results = _strict_json(tmp_path / "out" / "results.json")["zeroshot_classification"]
    assert "acc5" not in results["video->shape"] and 0 <= results["video->colour"]["acc5"] <= 1


def test_doctor_passes_a_good_config_and_lists_each_problem_of_a_broken_one(synthetic_data: Path,
                                                                              tmp_path: Path) -> None:
    shutil.copy(synthetic_data / "tokenizer.model", tmp_path / "tok.model")
    good = ["--config", "own_data", "--set", f"data.train={synthetic_data}", "--set",
            "model.modalities.text.tokenizer=tok.model", "--set", f"data.test={synthetic_data}/test-*.tar",
            "--set", "eval.suite=retrieval"]
    r = mmcl("doctor", *good, cwd=tmp_path)
    for name in ("torch", "devices", "torchcodec", "PyAV", "soundfile", "ffmpeg", "DeepSpeed"):
        assert any(line[2:].startswith(name) for line in r.stdout.splitlines()), (name, r.stdout)
    assert "video: decodes 8 frames" in r.stdout
    assert f"{synthetic_data}: 6 shard(s), 96 samples (sizes.json)" in r.stdout
    assert "tok.model exists" in r.stdout

    r = mmcl("doctor", "--config", "own_data", "--set", "data.train=data/nope-*.tar", "--set", "eval.suite=retrieval",
             "--set", "train.deepspeed=missing.json", cwd=tmp_path, ok=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "mmcl doctor: model.modalities.text.tokenizer: not found: data/mine/tokenizer.model",
        "mmcl doctor: data.train: shard pattern data/nope-*.tar matches no files",
        "mmcl doctor: eval.suite: retrieval evaluates data.test, which is empty (mmcl train --eval-data SPEC, "
        "or --set eval.suite='')",
        "mmcl doctor: train.deepspeed: not found: missing.json"]
    assert "! data.train" in r.stdout


def test_train_refuses_up_front_an_eval_suite_without_held_out_data(synthetic_data: Path, tmp_path: Path) -> None:
    r = mmcl("train", "--config", "own_data", "--data", str(synthetic_data), "--out", "run", "--set",
             "eval.suite=retrieval", cwd=tmp_path, ok=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "mmcl train: error: eval.suite: retrieval evaluates data.test, which is empty (give --eval-data SPEC, "
        "or --set eval.suite='')")
    assert not (tmp_path / "run").exists()
