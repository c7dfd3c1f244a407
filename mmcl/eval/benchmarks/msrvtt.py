"""MSR-VTT 1k-A: ``MSRVTT_JSFUSION_test.csv`` + ``videos/``; text <-> video retrieval with the one test
sentence per video, or (``1k-A-20``) every caption of ``MSRVTT_data.json``."""

from __future__ import annotations

import json
from pathlib import Path

from mmcl.eval.benchmarks.base import Benchmark, Clip, Manifest, MediaIndex, register_benchmark


@register_benchmark
class MSRVTT(Benchmark):
    name = "msrvtt"
    layout = ("MSRVTT_JSFUSION_test.csv (key, vid_key, video_id, sentence) and videos/ (video7010.mp4, or "
              "videos/all/); MSRVTT_data.json for the 20-caption protocol")

    def read(self, root: Path, protocol: str) -> Manifest:
        self.check_root(root)
        rows = self.read_csv(self.find(root, "MSRVTT_JSFUSION_test.csv", "msrvtt_data/MSRVTT_JSFUSION_test.csv"),
                             ["key", "vid_key", "video_id", "sentence"])
        captions = {r["video_id"]: [r["sentence"]] for r in rows}
        if protocol == "1k-A-20":
            path = self.find(root, "MSRVTT_data.json", "msrvtt_data/MSRVTT_data.json")
            try:
                sentences = json.loads(path.read_text())["sentences"]
                every = {}
                for s in sentences:
                    every.setdefault(s["video_id"], []).append(s["caption"])
            except (ValueError, KeyError, TypeError):
                raise self.not_a_copy(root, f"{path.name} has no 'sentences' list of {{video_id, caption}}") from None
            captions = {v: every.get(v, caps) for v, caps in captions.items()}
        if not (root / "videos").is_dir():
            raise self.not_a_copy(root, "no videos/ folder")
        index = MediaIndex(root / "videos")
        clips, missing = [], []
        for video_id, caps in captions.items():
            path = index.lookup(video_id)
            if path is None:
                missing.append(video_id)
            else:
                clips.append(Clip(video_id, path, captions=caps))
        return Manifest(protocol, clips, missing)
