"""Kinetics-400: ``annotations/val.csv`` + the clips (``YTID_000059_000069.mp4``) anywhere under the copy;
the classes read from the annotations."""

from __future__ import annotations

from pathlib import Path

from mmcl.eval.benchmarks.audioset import start_names
from mmcl.eval.benchmarks.base import Benchmark, Clip, Manifest, MediaIndex, register_benchmark


@register_benchmark
class Kinetics400(Benchmark):
    name = "kinetics400"
    layout = ("annotations/val.csv (label, youtube_id, time_start, time_end, split) and the clips "
              "(YTID_000059_000069.mp4) under the copy")

    def read(self, root: Path, protocol: str) -> Manifest:
        self.check_root(root)
        file = self.protocols[protocol]["file"]
        columns = ["label", "youtube_id", "time_start", "time_end"]
        rows = self.read_csv(self.find(root, f"annotations/{file}", f"kinetics400/annotations/{file}"), columns)
        labels = {r["label"] for r in rows}
        if (root / "annotations" / "train.csv").is_file() and file != "train.csv":
            labels |= {r["label"] for r in self.read_csv(root / "annotations" / "train.csv", columns)}
        index = MediaIndex(root)
        clips, missing = [], []
        for r in rows:
            names = start_names(r["youtube_id"], r["time_start"], r["time_end"])
            path = index.lookup(*names)
            if path is None:
                missing.append(f"{r['youtube_id']}_{r['time_start']}_{r['time_end']}")
            else:
                clips.append(Clip(Path(path).stem, path, label=self.clean(r["label"])))
        return Manifest(protocol, clips, missing, sorted(self.clean(c) for c in labels))
