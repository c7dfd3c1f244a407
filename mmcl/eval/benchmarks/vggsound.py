"""VGGSound: ``vggsound.csv`` (no header) + the clips; the classes read from the csv; audio, and video
and video+audio when the model and the clips have video."""

from __future__ import annotations

from pathlib import Path

from mmcl.eval.benchmarks.audioset import start_names
from mmcl.eval.benchmarks.base import Benchmark, Clip, Manifest, MediaIndex, register_benchmark


@register_benchmark
class VGGSound(Benchmark):
    name = "vggsound"
    layout = "vggsound.csv (no header: YouTube id, start second, label, train|test) and the clips (YTID_000030.mp4)"

    def read(self, root: Path, protocol: str) -> Manifest:
        self.check_root(root)
        rows = self.read_csv(self.find(root, "vggsound.csv", "data/vggsound.csv", "metadata/vggsound.csv"),
                             ["ytid", "start", "label", "split"], header=False)
        splits = {r["split"] for r in rows}
        if not splits <= {"train", "test"}:
            raise self.not_a_copy(root, f"split {sorted(splits - {'train', 'test'})[0]!r} in vggsound.csv "
                                        f"(expected train or test)")
        classnames = sorted({self.clean(r["label"]) for r in rows})
        index = MediaIndex(root)
        clips, missing = [], []
        for r in rows:
            if r["split"] != self.protocols[protocol]["split"]:
                continue
            path = index.lookup(*start_names(r["ytid"], r["start"], ""))
            key = f"{r['ytid']}_{r['start']}"
            if path is None:
                missing.append(key)
            else:
                clips.append(Clip(key, path, label=self.clean(r["label"])))
        return Manifest(protocol, clips, missing, classnames)
