"""AudioSet evaluation segments: ``eval_segments.csv`` + ``class_labels_indices.csv`` + clips named by
YouTube id; multi-label (mAP), the 527 classes read from the copy."""

from __future__ import annotations

from pathlib import Path

from mmcl.eval.benchmarks.base import Benchmark, Clip, Manifest, MediaIndex, register_benchmark


def start_names(ytid: str, start: str, end: str) -> list[str]:
    """The names a YouTube-sourced clip goes by: ``ID``, ``YID`` (PANNs), ``ID_30``, ``ID_000030``,
    ``ID_30.000``, ``ID_30_40``, ``ID_000030_000040``, ``ID_30000_40000`` (milliseconds)."""
    names = [ytid, f"Y{ytid}", f"{ytid}_{start}", f"{ytid}_{start}_{end}"]
    try:
        s, e = float(start), float(end) if end else float(start) + 10
    except ValueError:
        return names
    si, ei = int(s), int(e)
    names += [f"{ytid}_{si}", f"{ytid}_{si:06d}", f"{ytid}_{si}_{ei}", f"{ytid}_{si:06d}_{ei:06d}",
              f"{ytid}_{int(s * 1000)}_{int(e * 1000)}", f"{ytid}_{s:.3f}", f"Y{ytid}_{s:.3f}_{e:.3f}"]
    return names


@register_benchmark
class AudioSet(Benchmark):
    name = "audioset"
    layout = ("eval_segments.csv (comment lines, then YTID, start_seconds, end_seconds, positive_labels), "
              "class_labels_indices.csv (index, mid, display_name) and the clips named by YouTube id")

    def read(self, root: Path, protocol: str) -> Manifest:
        self.check_root(root)
        labels_path = self.find(root, "class_labels_indices.csv", "metadata/class_labels_indices.csv")
        classes = self.read_csv(labels_path, ["index", "mid", "display_name"])
        try:
            classes.sort(key=lambda r: int(r["index"]))
        except ValueError:
            raise self.not_a_copy(root, f"{labels_path.name} has an index that is not a number") from None
        name_of: dict[str, str] = {}
        for r in classes:  # a display name given twice keeps its mid, so the classifier's names stay distinct
            name = self.clean(r["display_name"])
            name_of[r["mid"]] = name if name not in name_of.values() else f"{name} ({r['mid']})"
        file = self.protocols[protocol]["file"]
        segments = self.read_csv(self.find(root, file, f"metadata/{file}"),
                                 ["YTID", "start_seconds", "end_seconds", "positive_labels"], header=False,
                                 skip_comments=True)
        index = MediaIndex(root)
        clips, missing = [], []
        for r in segments:
            mids = [m.strip() for m in r["positive_labels"].split(",") if m.strip()]
            unknown = [m for m in mids if m not in name_of]
            if unknown:
                raise self.not_a_copy(root, f"label {unknown[0]!r} of {r['YTID']} is not in {labels_path.name}")
            path = index.lookup(*start_names(r["YTID"], r["start_seconds"], r["end_seconds"]))
            if path is None:
                missing.append(r["YTID"])
            else:
                clips.append(Clip(r["YTID"], path, label=[name_of[m] for m in mids]))
        return Manifest(protocol, clips, missing, list(name_of.values()))
