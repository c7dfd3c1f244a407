"""Build throughput: ``build_shards`` over generated media (H.264 + AAC stereo mp4 clips with a caption,
as a JSONL manifest) with 1 and 2 workers, in clips (samples written) per second.

    python bench/build.py [--clips 24] [--seconds 4] [--source 480x360] [--workers 1 2] [--repeat 1]
                          [--fps 8] [--size 256] [--window 10]

Every run builds from scratch into a fresh folder. Wall-clock clips/s is what a user sees; CPU seconds per
clip (the build process, its workers and their ffmpeg processes) is the number to trust on a shared
machine. Runs are interleaved so that drifting load hits every row alike; the best wall time is shown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from data_tools.build import build_shards, load_inputs
from data_tools.media import EncodeOptions


def cpu_seconds() -> float:
    """User + system CPU of this process and of its finished (waited-for) descendants."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_clips(folder: Path, n: int, seconds: float, size: str) -> Path:
    """``n`` distinct clips (moving test pattern, a tone of its own pitch) and their manifest."""
    patterns = ("testsrc2", "testsrc", "smptebars", "rgbtestsrc")
    rows = []
    for i in range(n):
        path = folder / f"clip{i:04d}.mp4"
        subprocess.run(
            ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y",
             "-f", "lavfi", "-i", f"{patterns[i % len(patterns)]}=size={size}:rate=25:duration={seconds}",
             "-f", "lavfi", "-i", f"sine=frequency={220 + 20 * i}:sample_rate=44100:duration={seconds}",
             "-ac", "2", "-c:v", "libx264", "-preset", "veryfast", "-c:a", "aac", str(path)], check=True)
        rows.append({"video": path.name, "text": f"test pattern {i} with a {220 + 20 * i} Hz tone",
                     "license": "CC0-1.0"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=24, help="source clips to generate")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each source clip")
    parser.add_argument("--source", default="480x360", help="source frame size")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs per row")
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--window", type=float, default=10.0)
    args = parser.parse_args()

    opts = EncodeOptions(fps=args.fps, size=args.size, window=args.window)
    with tempfile.TemporaryDirectory(prefix="mmcl-bench-build-") as tmp:
        start = time.perf_counter()
        manifest = make_clips(Path(tmp), args.clips, args.seconds, args.source)
        print(f"generated {args.clips} clips of {args.seconds:g} s at {args.source} "
              f"in {time.perf_counter() - start:.1f} s")
        items = load_inputs(manifest=str(manifest))
        results: dict[int, list[tuple[int, float, float]]] = {w: [] for w in args.workers}
        for r in range(args.repeat):
            for w in args.workers:
                out = Path(tmp) / f"out-{w}-{r}"
                cpu = cpu_seconds()
                report = build_shards(items, str(out), workers=w, options=opts, progress=False)
                results[w].append((report["samples"], report["run"]["seconds"], cpu_seconds() - cpu))
                if report["rejected"]:
                    raise SystemExit(f"unexpected rejections: {report['by_reason']}")
                shutil.rmtree(out)

    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; output H.264 {args.fps:g} fps, "
          f"{args.size} px, 16 kHz flac; {args.repeat} run(s) per row")
    print(f"{'workers':>7} {'clips':>6} {'best s':>7} {'clips/s':>8} {'CPU s/clip':>11}")
    for w, runs in results.items():
        clips, seconds, _ = min(runs, key=lambda x: x[1])
        cpu = min(c / n for n, _, c in runs)
        print(f"{w:>7} {clips:>6} {seconds:>7.2f} {clips / seconds:>8.2f} {cpu:>11.3f}")


if __name__ == "__main__":
    main()
