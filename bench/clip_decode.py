"""Window decode against full decode: clips/s for one 2 s window (8 frames + its audio) of 10 s and 60 s
640x360 H.264 + AAC sources, through the processors the loader runs (the tiny model's video and audio).

    python bench/clip_decode.py [--clips 20] [--repeat 3] [--gop 250] [--decoder torchcodec|pyav]

- **full**: today's decode without ``data.clip``: the video's frames spread over the whole clip
  (torchcodec exact mode: a scan, then a seek to each frame) and the whole audio track decoded and
  resampled, the 2 s audio window cut afterwards;
- **window**: with ``data.clip: {seconds: 2}``: a random window per clip (drawn from its key), only the
  window decoded (torchcodec approximate seek, frames played at the 8 sampled times; the audio's span
  only).

The sources are made once with ffmpeg (``testsrc2`` + a sine, libx264 ``-g GOP``, AAC 48 kHz stereo) into
a temporary directory. Each row decodes ``--clips`` windows (different keys) of each source from bytes in
memory, rows interleaved ``--repeat`` times; clips/s is the best run (the machine is shared). Printed as
one JSON object with the ratios window / full.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from mmcl.data.context import SampleContext
from mmcl.data.shards import SampleDecoder
from mmcl.data.window import WindowConfig
from mmcl.modalities import build_processor


def make_source(path: Path, seconds: int, gop: int) -> bytes:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=25:duration={seconds}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
                    "-c:v", "libx264", "-preset", "veryfast", "-g", str(gop), "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-ac", "2", "-shortest", str(path)], check=True)
    return path.read_bytes()


def clips_per_s(decoder: SampleDecoder, sample: dict[str, bytes], clips: int, train: bool) -> float:
    t = time.perf_counter()
    for i in range(clips):
        decoder.decode({**sample, "__key__": f"clip{i}"}, SampleContext(f"clip{i}", 0, 0, train))
    return clips / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--gop", type=int, default=250, help="keyframe interval in frames (libx264's default: 250)")
    p.add_argument("--decoder", default="auto", choices=["auto", "torchcodec", "pyav"])
    args = p.parse_args()
    torch.set_num_threads(1)  # as in a loader worker
    procs = {"video": build_processor("video", {"frames": 8, "size": 64, "decoder": args.decoder}),
             "audio": build_processor("audio", {"seconds": 2.0})}
    full = SampleDecoder(procs)
    window = SampleDecoder(procs, clip=WindowConfig(seconds=2.0))
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # each sample with the json duration `mmcl shards build` writes (the window is drawn from it)
        sources = {f"{s}s": {"mp4": make_source(Path(tmp) / f"{s}.mp4", s, args.gop),
                             "json": json.dumps({"duration": float(s)}).encode()} for s in (10, 60)}
        for sample in sources.values():  # warm-up: the decoders' libraries load on first use
            full.decode({**sample, "__key__": "w"})
            window.decode({**sample, "__key__": "w"})
        best: dict[tuple[str, str], float] = {}
        for _ in range(args.repeat):
            for name, sample in sources.items():
                for mode, decoder in (("full", full), ("window", window)):
                    rate = clips_per_s(decoder, sample, args.clips, train=True)
                    best[name, mode] = max(best.get((name, mode), 0.0), rate)
        for name in sources:
            f, w = best[name, "full"], best[name, "window"]
            results[name] = {"full_clips_per_s": round(f, 2), "window_clips_per_s": round(w, 2),
                             "ratio": round(w / f, 2)}
    print(json.dumps({"decoder": args.decoder, "gop": args.gop, "clips": args.clips, "repeat": args.repeat,
                      **results}, indent=2))


if __name__ == "__main__":
    main()
