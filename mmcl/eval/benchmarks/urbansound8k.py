"""UrbanSound8K: ``metadata/UrbanSound8K.csv`` + ``audio/foldN/*.wav``; the 10 shipped classes; all folds
or one."""

from __future__ import annotations

from pathlib import Path

from mmcl.eval.benchmarks.base import Benchmark, Clip, Manifest, register_benchmark
from mmcl.eval.benchmarks.esc50 import folds_of


@register_benchmark
class UrbanSound8K(Benchmark):
    name = "urbansound8k"
    layout = ("metadata/UrbanSound8K.csv (slice_file_name, fsID, start, end, salience, fold, classID, class) "
              "and audio/fold1..fold10/*.wav")

    def read(self, root: Path, protocol: str) -> Manifest:
        self.check_root(root)
        csv_path = self.find(root, "metadata/UrbanSound8K.csv")
        rows = self.read_csv(csv_path, ["slice_file_name", "fold", "classID", "class"])
        self.check_classes(rows, "class", "classID", csv_path)
        folds = set(self.protocols[protocol]["folds"])
        clips, missing = [], []
        for r, fold in zip(rows, folds_of(self, rows, csv_path)):
            if fold not in folds:
                continue
            rel = f"audio/fold{fold}/{r['slice_file_name']}"
            if (root / rel).is_file():
                clips.append(Clip(Path(r["slice_file_name"]).stem, str(root / rel), label=self.clean(r["class"])))
            else:
                missing.append(rel)
        return Manifest(protocol, clips, missing, [self.clean(c) for c in self.classes])
