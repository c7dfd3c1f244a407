"""The frozen-feature cache on a LiT-style run: samples/s per epoch of the same training run with
``train.feature_cache`` ``none`` and ``ram`` (or ``disk``), and whether their losses agree.

    python bench/feature_cache.py [--out DIR] [--train 256] [--batch 32] [--epochs 3] [--threads 2]
                                  [--caches none ram disk] [--repeat 2] [--width 256] [--layers 4]

The run: audio (a Whisper-style transformers encoder, random weights built from ``WhisperConfig`` and saved
with ``save_pretrained`` beside its ``WhisperFeatureExtractor``: 2 s windows, 80 mels) and text (this
project's BERT tower over the synthetic world's sentencepiece tokenizer) both locked, their heads and the
objective trained; the synthetic world's 2 s clips (no random window: the audio input is fixed per sample) in
batches of ``--batch``, decoded samples kept in RAM (``data.cache``) in every row, so the rows differ in the
towers' forward alone. ``DIR/config.yaml`` is the run's config (fields today's main also reads; the cache is
set with ``--set train.feature_cache=...``), for before/after runs with the ``mmcl train`` CLI.

Samples/s per epoch = samples / summed step windows of the epoch (``log.jsonl``, one record per step: the
loader's time included), the best of ``--repeat`` interleaved runs. The loss column: the largest
|loss - loss of the first row's run| over all steps and repeats.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml

from mmcl.config import load_config
from mmcl.data.synthetic import synth
from mmcl.train.loop import train


def whisper_dir(path: Path, width: int, layers: int) -> Path:
    """A random-weight Whisper encoder-decoder for 2 s windows of 80 mels (the tower keeps the encoder)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    WhisperModel(WhisperConfig(
        d_model=width, encoder_layers=layers, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=4 * width, decoder_ffn_dim=4 * width, num_mel_bins=80, max_source_positions=100,
        max_target_positions=16, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80, chunk_length=2).save_pretrained(path)
    return path


def run_config(data: Path, whisper: Path, batch: int, epochs: int, threads: int) -> dict[str, Any]:
    return {
        "model": {"embed_dim": 128, "modalities": {
            "audio": {"seconds": 2.0, "tower": {"type": "hf", "path": str(whisper)}},
            "text": {"tokenizer": str(data / "tokenizer.model"), "max_len": 32,
                     "tower": {"width": 256, "depth": 4, "heads": 4, "pooling": "mean"}},
        }},
        "objective": {"name": "clip"},
        "data": {"train": str(data / "train-{000000..000001}.tar"), "batch_size": batch, "shuffle_buffer": 0,
                 "cache": True},
        "train": {"epochs": epochs, "lr": 1e-3, "warmup_steps": 2, "log_every": 1, "progress": False,
                  "threads": threads, "towers": {"audio": {"lock": True}, "text": {"lock": True}}},
    }


def per_epoch(log: list[dict[str, Any]]) -> dict[int, float]:
    """Samples/s of each epoch from the per-step records."""
    seconds: dict[int, float] = defaultdict(float)
    samples: dict[int, int] = defaultdict(int)
    previous = 0
    for r in log:
        n = r["samples"] - previous
        previous = r["samples"]
        seconds[r["epoch"]] += n / r["samples_per_s"]
        samples[r["epoch"]] += n
    return {e: samples[e] / seconds[e] for e in sorted(seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--width", type=int, default=256, help="the Whisper encoder's width")
    ap.add_argument("--layers", type=int, default=4, help="the Whisper encoder's layers")
    ap.add_argument("--caches", nargs="+", default=["none", "ram"])
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repeats; samples/s is the best")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_feature_cache_"))
    data = out / "data"
    if not (data / "world.json").is_file():
        synth(data, train=args.train, test=16, per_shard=(args.train + 1) // 2)
    whisper = out / "whisper"
    if not (whisper / "config.json").is_file():
        whisper_dir(whisper, args.width, args.layers)
    base = run_config(data, whisper, args.batch, args.epochs, args.threads)
    (out / "config.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    best: dict[str, dict[int, float]] = {}
    diff: dict[str, float] = defaultdict(float)
    for repeat in range(args.repeat):  # interleaved: on a shared machine the wall clock swings with other jobs
        logs = {}
        for cache in args.caches:
            run = out / f"run_{cache}_{repeat}"
            train(load_config(base=base, overrides=[f"train.feature_cache={cache}"]), run)
            logs[cache] = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            sps = per_epoch(logs[cache])
            best[cache] = {e: max(v, best.get(cache, {}).get(e, 0.0)) for e, v in sps.items()}
            ref = logs[args.caches[0]]
            diff[cache] = max(diff[cache], *(abs(a["loss"] - b["loss"]) for a, b in zip(ref, logs[cache], strict=True)))
    first = best[args.caches[0]]
    print(f"{'cache':<6}" + "".join(f"{'epoch ' + str(e + 1):>18}" for e in first) + f"{'max |dloss|':>14}")
    rows = {}
    for cache, sps in best.items():
        cells = "".join(f"{v:>10.1f} ({v / first[e]:4.1f}x)" for e, v in sps.items())
        print(f"{cache:<6}{cells}{diff[cache]:>14.2e}")
        rows[cache] = {"samples_per_s": {str(e + 1): round(v, 2) for e, v in sps.items()},
                       "speedup": {str(e + 1): round(v / first[e], 2) for e, v in sps.items()},
                       "max_abs_loss_diff": diff[cache]}
    (out / "bench_feature_cache.json").write_text(json.dumps(rows, indent=2))
    print(f"written: {out / 'bench_feature_cache.json'}")


if __name__ == "__main__":
    main()
