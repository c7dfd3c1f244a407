"""What every benchmark shares: its data file (``configs/eval/benchmarks/<name>.yaml``: protocols, class-name
cleaning, prompt templates, the fixed class list where the community uses one, the tasks), the clips a
protocol lists (:class:`Manifest`), the registry, and the helpers that read a released layout.

A benchmark is one file in this package: a :class:`Benchmark` subclass that sets ``name`` and ``layout``
(the one line saying what a copy holds) and implements :meth:`Benchmark.read` (a local copy -> the clips
of a protocol, the files it lists but lacks counted, never fatal), registered with
:func:`register_benchmark`.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmcl.config import CONFIG_DIR
from mmcl.errors import ConfigError, DataError

#: The benchmarks' data files.
DATA_DIR = CONFIG_DIR / "eval" / "benchmarks"
#: Extensions a copy's clips may have (what ffmpeg reads; the build normalises them).
MEDIA_EXTS = frozenset({"wav", "flac", "mp3", "ogg", "m4a", "aac", "opus", "mp4", "mkv", "webm", "avi", "mov",
                        "m4v", "3gp", "flv", "mpg", "mpeg"})
_VIDEO_EXTS = frozenset({"mp4", "mkv", "webm", "avi", "mov", "m4v", "3gp", "flv", "mpg", "mpeg"})
_CAMEL = re.compile(r"[A-Z][a-z]*|[a-z]+|[0-9]+")


@dataclass
class Clip:
    """One clip a protocol lists and the copy holds: its media file and its label(s) or captions."""

    key: str
    path: str
    #: Cleaned class name (single-label), or names (multi-label).
    label: str | list[str] | None = None
    captions: list[str] = field(default_factory=list)

    @property
    def is_video(self) -> bool:
        return Path(self.path).suffix[1:].lower() in _VIDEO_EXTS


@dataclass
class Manifest:
    """The clips of one protocol of one copy; ``missing``: what it lists that the copy lacks."""

    protocol: str
    clips: list[Clip]
    missing: list[str]
    #: Cleaned class names in the classifier's order (classification benchmarks).
    classnames: list[str] = field(default_factory=list)

    @property
    def listed(self) -> int:
        return len(self.clips) + len(self.missing)


def clean_name(name: str, rules: Iterable[str], rename: dict[str, str] | None = None) -> str:
    """A class name as the community writes it in prompts. ``rename`` maps a raw name to its text first
    (exact match); then ``rules`` apply in order: ``underscores`` (``dog_bark`` -> ``dog bark``),
    ``camel_case`` (``ApplyEyeMakeup`` -> ``Apply Eye Makeup``), ``strip_quotes``, ``lower``; whitespace is
    collapsed."""
    if rename and name in rename:
        return rename[name]
    for rule in rules:
        if rule == "underscores":
            name = name.replace("_", " ")
        elif rule == "camel_case":
            name = " ".join(_CAMEL.findall(name))
        elif rule == "strip_quotes":
            name = name.strip().strip('"').strip("'")
        elif rule == "lower":
            name = name.lower()
        else:
            raise ConfigError(f"clean: unknown rule {rule!r} (allowed: underscores, camel_case, strip_quotes, lower)")
    return " ".join(name.split())


def load_spec(name: str) -> dict[str, Any]:
    """The data file of benchmark ``name``."""
    path = DATA_DIR / f"{name}.yaml"
    spec = yaml.safe_load(path.read_text())
    spec.setdefault("clean", [])
    spec.setdefault("rename", {})
    return spec


class Benchmark:
    """A community benchmark read from a local copy in its released layout."""

    #: Registry name (``mmcl eval --suite NAME``).
    name: str = ""
    #: What a copy holds, for the one-line error when a path is not one.
    layout: str = ""

    def __init__(self) -> None:
        self.spec = load_spec(self.name)

    # -- the data file --------------------------------------------------------------------------------

    @property
    def title(self) -> str:
        return self.spec.get("title", self.name)

    @property
    def protocols(self) -> dict[str, dict[str, Any]]:
        return self.spec["protocols"]

    def protocol(self, name: str | None) -> str:
        """``name``, or the default protocol; an unknown one is a :class:`ConfigError` listing them."""
        name = name or self.spec["default_protocol"]
        if name not in self.protocols:
            raise ConfigError(f"--protocol: {self.name} has no protocol {name!r} (allowed: "
                              f"{', '.join(self.protocols)})")
        return name

    def clean(self, raw: str) -> str:
        return clean_name(raw, self.spec["clean"], self.spec["rename"])

    @property
    def classes(self) -> list[str]:
        """The fixed raw class list shipped with the benchmark (empty: read from the copy)."""
        return list(self.spec.get("classes", []))

    @property
    def tasks(self) -> list[dict[str, Any]]:
        return self.spec["tasks"]

    # -- reading a copy -------------------------------------------------------------------------------

    def read(self, root: Path, protocol: str) -> Manifest:
        """The clips of ``protocol`` in the copy at ``root`` (raises :class:`DataError` naming the layout)."""
        raise NotImplementedError

    def not_a_copy(self, root: Path, what: str) -> DataError:
        """The one line for a path that is not this benchmark's layout."""
        return DataError(f"{root}: not a copy of {self.title} ({what}); expected {self.layout}")

    def check_root(self, root: Path) -> None:
        if not root.is_dir():
            raise DataError(f"{root}: not a directory; expected a copy of {self.title}: {self.layout}")

    def find(self, root: Path, *candidates: str) -> Path:
        """The first of ``candidates`` (paths relative to ``root``) that exists."""
        for c in candidates:
            if (root / c).is_file():
                return root / c
        raise self.not_a_copy(root, f"no {' or '.join(candidates)}")

    def read_csv(self, path: Path, columns: Iterable[str], header: bool = True,
                 skip_comments: bool = False) -> list[dict[str, str]]:
        """The rows of a metadata CSV as dicts; ``columns``: the names it must have (``header``) or the
        names of its columns in order (no header). Cells are stripped of surrounding spaces."""
        columns = list(columns)
        with open(path, newline="", encoding="utf-8") as f:
            lines = (ln for ln in f if not (skip_comments and ln.startswith("#")))
            reader = csv.reader(lines, skipinitialspace=True)
            rows = [[c.strip() for c in r] for r in reader if r and any(c.strip() for c in r)]
        if header:
            if not rows:
                raise self.not_a_copy(path.parent, f"{path.name} is empty")
            names = rows[0]
            lacking = [c for c in columns if c not in names]
            if lacking:
                raise self.not_a_copy(path.parent, f"{path.name} has no column {lacking[0]!r} "
                                                   f"(has: {', '.join(names)})")
            return [dict(zip(names, r)) for r in rows[1:] if len(r) >= len(names)]
        bad = next((r for r in rows if len(r) < len(columns)), None)
        if bad is not None:
            raise self.not_a_copy(path.parent, f"{path.name} has a row of {len(bad)} fields, expected "
                                               f"{len(columns)} ({', '.join(columns)})")
        return [dict(zip(columns, r)) for r in rows]

    def check_classes(self, rows: list[dict[str, str]], name: str, index: str, where: Path) -> None:
        """Every class (column ``name``) of the copy is in the shipped list, at the position its ``index``
        column gives (ESC-50's ``target``, UrbanSound8K's ``classID``)."""
        known = {c: i for i, c in enumerate(self.classes)}
        for r in rows:
            if r[name] not in known:
                raise self.not_a_copy(where, f"class {r[name]!r} is not one of the {len(self.classes)} "
                                             f"{self.title} classes")
            if r[index] != str(known[r[name]]):
                raise self.not_a_copy(where, f"class {r[name]!r} has {index} {r[index]}, the release's is "
                                             f"{known[r[name]]}")


class MediaIndex:
    """The media files under a folder by stem (``clip`` of ``a/b/clip.wav``), found once; ``lookup`` takes
    the names a release may give one clip (``abc_000030``, ``abc``, ``Yabc``) and returns the first found."""

    def __init__(self, root: Path, exclude: Iterable[Path] = ()):
        self.by_stem: dict[str, str] = {}
        skip = {p.resolve() for p in exclude}
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in skip)
            for name in sorted(filenames):
                stem, _, ext = name.rpartition(".")
                if stem and ext.lower() in MEDIA_EXTS:
                    self.by_stem.setdefault(stem, str(here / name))

    def lookup(self, *stems: str) -> str | None:
        return next((self.by_stem[s] for s in stems if s in self.by_stem), None)

    def __len__(self) -> int:
        return len(self.by_stem)


_REGISTRY: dict[str, type[Benchmark]] = {}


def register_benchmark(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: ``mmcl eval --suite <cls.name>`` runs it."""
    _REGISTRY[cls.name] = cls
    return cls


def benchmark_names() -> list[str]:
    return list(_REGISTRY)


def get_benchmark(name: str) -> Benchmark:
    if name not in _REGISTRY:
        raise ConfigError(f"benchmark {name!r} is not known (allowed: {', '.join(_REGISTRY)}, standard)")
    return _REGISTRY[name]()
