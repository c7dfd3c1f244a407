"""ESC-50: ``meta/esc50.csv`` + ``audio/*.wav``; the 50 shipped classes; all 2000 clips or fold 1."""

from __future__ import annotations

from pathlib import Path

from mmcl.eval.benchmarks.base import Benchmark, Clip, Manifest, register_benchmark


def folds_of(bench: Benchmark, rows: list[dict[str, str]], where: Path) -> list[int]:
    """The ``fold`` column as integers (a copy whose folds are not numbers is not the release)."""
    try:
        return [int(r["fold"]) for r in rows]
    except ValueError:
        raise bench.not_a_copy(where, "a fold that is not a number") from None


@register_benchmark
class ESC50(Benchmark):
    name = "esc50"
    layout = "meta/esc50.csv (filename, fold, target, category, esc10, src_file, take) and audio/*.wav"

    def read(self, root: Path, protocol: str) -> Manifest:
        self.check_root(root)
        csv_path = self.find(root, "meta/esc50.csv")
        rows = self.read_csv(csv_path, ["filename", "fold", "target", "category"])
        self.check_classes(rows, "category", "target", csv_path)
        folds = set(self.protocols[protocol]["folds"])
        clips, missing = [], []
        for r, fold in zip(rows, folds_of(self, rows, csv_path)):
            if fold not in folds:
                continue
            path = root / "audio" / r["filename"]
            if path.is_file():
                clips.append(Clip(Path(r["filename"]).stem, str(path), label=self.clean(r["category"])))
            else:
                missing.append(f"audio/{r['filename']}")
        return Manifest(protocol, clips, missing, [self.clean(c) for c in self.classes])
