"""UCF101: ``UCF-101/<Class>/*.avi`` + ``ucfTrainTestlist/`` (classInd.txt, testlist0N.txt); the classes
read from classInd.txt, CamelCase split."""

from __future__ import annotations

from pathlib import Path

from mmcl.eval.benchmarks.base import Benchmark, Clip, Manifest, register_benchmark


@register_benchmark
class UCF101(Benchmark):
    name = "ucf101"
    layout = ("ucfTrainTestlist/ (classInd.txt, testlist01.txt .. testlist03.txt) and "
              "UCF-101/<Class>/v_<Class>_gXX_cYY.avi")

    def read(self, root: Path, protocol: str) -> Manifest:
        self.check_root(root)
        ind = self.find(root, "ucfTrainTestlist/classInd.txt")
        raw = []
        for line in filter(str.strip, ind.read_text().splitlines()):
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise self.not_a_copy(root, f"classInd.txt line {line!r} is not 'INDEX ClassName'")
            raw.append((int(parts[0]), parts[1]))
        classes = [name for _, name in sorted(raw)]
        test = self.find(root, f"ucfTrainTestlist/{self.protocols[protocol]['file']}")
        clips, missing = [], []
        for line in filter(str.strip, test.read_text().splitlines()):
            rel = line.split()[0]  # a train list adds the class index after the path
            folder = rel.split("/")[0]
            if folder not in classes:
                raise self.not_a_copy(root, f"{test.name} lists {rel!r}, whose class {folder!r} is not in "
                                            f"classInd.txt")
            path = root / "UCF-101" / rel
            if path.is_file():
                clips.append(Clip(Path(rel).stem, str(path), label=self.clean(folder)))
            else:
                missing.append(f"UCF-101/{rel}")
        return Manifest(protocol, clips, missing, [self.clean(c) for c in classes])
