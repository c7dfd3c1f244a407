"""Encoding throughput of the standard benchmarks through the eval path, shard cache cold and warm, against
the model's own forward on the same batches, in clips/s.

    python bench/eval_throughput.py [--model DIR] [--data NAME=PATH ...] [--clips 256] [--seconds 5]
                                    [--batch 32] [--workers 1] [--device cpu|cuda] [--repeat 2]
                                    [--input-cache-gb 8]

Per benchmark: ``cold`` is ``run_benchmark`` with an empty cache (the copy's clips built into shards with
ffmpeg, decoded, encoded, scored; the decoded inputs stored in the cache); ``warm`` the same call again (the
shards and the decoded inputs are reused; the embedding cache is off in both, so every clip is encoded again;
both include the prompts, the scoring and the reports); ``encode`` is the eval path's clip encoding alone
(``encode_dataset`` over the warm decoded-input cache: reading the inputs, ``model.encode``); ``decode`` the
same without that cache (shard reading, decoding, collating, ``model.encode``: what every run paid before it,
and what ``--input-cache-gb 0`` measures as warm); ``forward`` is ``model.encode`` alone over the same batches
(the benchmark's window), read once into memory beforehand. ``encode / forward`` is the eval path's share of
the model's own speed (the goal: >= 0.9); ``warm / forward`` adds the fixed costs of a run (prompts, scoring,
reports and plots). Without ``--data``, an ESC-50 copy (``--clips`` tones of ``--seconds`` s) and
an MSR-VTT 1k-A copy (``--clips / 8`` videos, 64x64 with audio) are synthesised in the released layouts into
a temporary directory; without ``--model``, the tiny model of ``configs/models/tiny.yaml`` (untrained, its
tokenizer trained on the synthetic world's captions). ``warm`` and ``forward`` are the best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import yaml

from mmcl.config import load_config
from mmcl.data.shards import build_loader
from mmcl.data.window import WindowConfig
from mmcl.eval.benchmarks import get_benchmark, run_benchmark
from mmcl.eval.benchmarks.runner import benchmark_suite, benchmark_window, modality_names, read_copy
from mmcl.eval.input_cache import InputCache
from mmcl.eval.suite import encode_dataset
from mmcl.model import MultimodalModel, load_model

TINY = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny.yaml"
CLASSES = ["dog", "rooster", "rain", "siren", "engine"]


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def synth_esc50(root: Path, clips: int, seconds: float) -> None:
    """``meta/esc50.csv`` + ``audio/*.wav``: ``clips`` tones over five classes and five folds."""
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    esc = get_benchmark("esc50")
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for i in range(clips):
        cat = CLASSES[i % len(CLASSES)]
        target, fold = esc.classes.index(cat), 1 + i % 5
        name = f"{fold}-{100000 + i}-A-{target}.wav"
        ffmpeg("-f", "lavfi", "-i", f"sine=frequency={200 + 37 * i}:duration={seconds}:sample_rate=44100",
               "-ac", "1", str(root / "audio" / name))
        rows.append(f"{name},{fold},{target},{cat},False,{100000 + i},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")


def synth_msrvtt(root: Path, clips: int, seconds: float) -> None:
    """``MSRVTT_JSFUSION_test.csv`` + ``videos/all/*.mp4`` (64x64 test pattern with a tone)."""
    (root / "videos" / "all").mkdir(parents=True)
    rows = ["key,vid_key,video_id,sentence"]
    for i in range(clips):
        vid = f"video{7000 + i}"
        ffmpeg("-f", "lavfi", "-i", f"testsrc=s=64x64:d={seconds}:r=25", "-f", "lavfi", "-i",
               f"sine=frequency={300 + 50 * i}:duration={seconds}", "-shortest", "-c:v", "libx264",
               "-pix_fmt", "yuv420p", "-c:a", "aac", str(root / "videos" / "all" / f"{vid}.mp4"))
        rows.append(f"ret{i},msr{7000 + i},{vid},a test pattern number {i} with a tone")
    (root / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(rows) + "\n")


def tiny_model(tmp: Path) -> MultimodalModel:
    from mmcl.data.synthetic import synth

    synth(tmp / "world", train=16, test=8, per_shard=8, workers=1)
    spec = yaml.safe_load(TINY.read_text())
    spec["modalities"]["text"]["tokenizer"] = str(tmp / "world" / "tokenizer.model")
    cfg = load_config(base={"model": spec})
    torch.manual_seed(0)
    return MultimodalModel(cfg.model, cfg.objective)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def forward_only(model: MultimodalModel, spec: str, mods: list[str], batch: int, device: torch.device,
                 clip: WindowConfig | None) -> tuple[int, float]:
    """(clips, seconds) of ``model.encode`` over the eval path's batches, read into memory first."""
    loader = build_loader(spec, {m: model.processors[m] for m in mods}, batch, train=False, workers=0,
                          on_missing="mask", clip=clip)
    batches = [{m: b["inputs"][m].to(device) for m in mods} for b in loader]
    model.encode(batches[0])  # warm-up (kernels, allocator)
    _sync(device)
    start = time.perf_counter()
    for inputs in batches:
        model.encode(inputs)
    _sync(device)
    return sum(next(iter(b.values())).shape[0] for b in batches), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a save_pretrained directory (default: the untrained tiny model)")
    ap.add_argument("--data", action="append", default=[], help="NAME=PATH of a benchmark copy (repeatable)")
    ap.add_argument("--clips", type=int, default=256, help="clips of the synthesised ESC-50 copy")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each synthesised clip")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="eval loader processes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--input-cache-gb", type=float, default=8.0, help="decoded-input cache limit (0: off)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_text:
        tmp = Path(tmp_text)
        device = torch.device(args.device)
        model = (load_model(args.model) if args.model else tiny_model(tmp)).to(device).eval()
        data = dict(d.split("=", 1) for d in args.data)
        if not data:
            synth_esc50(tmp / "ESC-50-master", args.clips, args.seconds)
            synth_msrvtt(tmp / "MSRVTT", max(8, args.clips // 8), args.seconds)
            data = {"esc50": str(tmp / "ESC-50-master"), "msrvtt": str(tmp / "MSRVTT")}
        rows = []
        for name, root in data.items():
            bench = get_benchmark(name)
            manifest = read_copy(bench, root, None)
            cache = tmp / "cache" / name
            common = dict(cache_dir=cache, batch_size=args.batch, workers=args.workers, cache_embeddings=False,
                          progress=False, manifest=manifest, input_cache_gb=args.input_cache_gb)
            start = time.perf_counter()
            results = run_benchmark(model, name, root, tmp / "out" / name, **common)
            cold = time.perf_counter() - start
            warm = min(_timed(lambda: run_benchmark(model, name, root, tmp / "out" / name, **common))
                       for _ in range(args.repeat))
            spec = results["benchmark"]["shards"]
            clip = benchmark_window(model)[0]
            suite = benchmark_suite(bench, manifest, modality_names(model), spec, {}, args.batch, clip)
            mods = sorted({m for t in suite.tasks for m in t.encoded})
            inputs = InputCache(cache / "inputs", args.input_cache_gb * 2**30) if args.input_cache_gb > 0 else None
            enc_s = min(_timed(lambda: encode_dataset(model, spec, mods, args.batch, args.workers, progress=False,
                                                      clip=clip, inputs=inputs)) for _ in range(args.repeat))
            dec_s = min(_timed(lambda: encode_dataset(model, spec, mods, args.batch, args.workers, progress=False,
                                                      clip=clip)) for _ in range(args.repeat))
            fwd = [forward_only(model, spec, mods, args.batch, device, clip) for _ in range(args.repeat)]
            clips, fwd_s = fwd[0][0], min(s for _, s in fwd)
            row = {"benchmark": name, "clips": clips, "modalities": mods, "device": str(device),
                   "workers": args.workers, "batch": args.batch, "window_s": clip.seconds if clip else None,
                   "cold_clips_per_s": round(clips / cold, 1), "warm_clips_per_s": round(clips / warm, 1),
                   "encode_clips_per_s": round(clips / enc_s, 1), "decode_clips_per_s": round(clips / dec_s, 1),
                   "forward_clips_per_s": round(clips / fwd_s, 1), "encode_over_forward": round(fwd_s / enc_s, 3),
                   "decode_over_forward": round(fwd_s / dec_s, 3), "warm_over_forward": round(fwd_s / warm, 3)}
            rows.append(row)
            print(json.dumps(row))
        print("\n| benchmark | clips | modalities | cold clips/s | warm clips/s | encode clips/s | decode clips/s "
              "| forward clips/s | encode / forward | decode / forward | warm / forward |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['benchmark']} | {r['clips']} | {'+'.join(r['modalities'])} | {r['cold_clips_per_s']} "
                  f"| {r['warm_clips_per_s']} | {r['encode_clips_per_s']} | {r['decode_clips_per_s']} "
                  f"| {r['forward_clips_per_s']} | {r['encode_over_forward']} | {r['decode_over_forward']} "
                  f"| {r['warm_over_forward']} |")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
