"""AudioCaps test split: ``test.csv`` (five caption rows per clip) + the clips under the copy; text <->
audio retrieval with every caption, mAP@10."""

from __future__ import annotations

from pathlib import Path

from mmcl.eval.benchmarks.audioset import start_names
from mmcl.eval.benchmarks.base import Benchmark, Clip, Manifest, MediaIndex, register_benchmark


@register_benchmark
class AudioCaps(Benchmark):
    name = "audiocaps"
    layout = ("test.csv (audiocap_id, youtube_id, start_time, caption) and the clips (YTID_START.wav, "
              "YYTID.wav, YTID.wav or AUDIOCAP_ID.wav) under the copy")

    def read(self, root: Path, protocol: str) -> Manifest:
        self.check_root(root)
        file = self.protocols[protocol]["file"]
        rows = self.read_csv(self.find(root, file, f"dataset/{file}", f"data/{file}"),
                             ["audiocap_id", "youtube_id", "start_time", "caption"])
        groups: dict[tuple[str, str], dict] = {}
        for r in rows:
            g = groups.setdefault((r["youtube_id"], r["start_time"]), {"ids": [], "captions": []})
            g["ids"].append(r["audiocap_id"])
            g["captions"].append(r["caption"])
        index = MediaIndex(root)
        clips, missing = [], []
        for (ytid, start), g in groups.items():
            path = index.lookup(*start_names(ytid, start, ""), *g["ids"])
            if path is None:
                missing.append(f"{ytid}_{start}")
            else:
                clips.append(Clip(f"{ytid}_{start}", path, captions=g["captions"]))
        return Manifest(protocol, clips, missing)
