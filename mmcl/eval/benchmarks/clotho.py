"""Clotho evaluation split: ``clotho_captions_evaluation.csv`` + ``evaluation/*.wav``; text <-> audio
retrieval with the five captions of each clip, mAP@10."""

from __future__ import annotations

from pathlib import Path

from mmcl.eval.benchmarks.base import Benchmark, Clip, Manifest, register_benchmark

CAPTION_COLUMNS = [f"caption_{i}" for i in range(1, 6)]


@register_benchmark
class Clotho(Benchmark):
    name = "clotho"
    layout = "clotho_captions_evaluation.csv (file_name, caption_1 .. caption_5) and evaluation/*.wav"

    def read(self, root: Path, protocol: str) -> Manifest:
        self.check_root(root)
        file = self.protocols[protocol]["file"]
        rows = self.read_csv(self.find(root, file), ["file_name", *CAPTION_COLUMNS])
        clips, missing = [], []
        for r in rows:
            path = root / "evaluation" / r["file_name"]
            if path.is_file():
                clips.append(Clip(Path(r["file_name"]).stem, str(path),
                                  captions=[r[c] for c in CAPTION_COLUMNS if r[c]]))
            else:
                missing.append(f"evaluation/{r['file_name']}")
        return Manifest(protocol, clips, missing)
