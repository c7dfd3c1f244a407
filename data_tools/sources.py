"""What a build reads: a folder tree or a CSV / JSONL manifest, turned into a deterministic list of
:class:`Input` records (one per manifest row or per folder group of files sharing a stem).

Planning-time problems — a file named in the manifest that does not exist, a duplicate key, a row that
cannot be parsed, a file of an unknown kind, a group with nothing to encode — do not stop the build: the
input carries a :class:`Rejection` and is listed in the report like any input rejected while encoding.
A manifest or folder that cannot be read at all is a one-line :class:`BuildError`.

Manifest columns (names are case-insensitive; CSV cells that are empty count as absent):

``key`` (or ``id``)
    sample key; default: the media path relative to ``root`` without its extension
``video``, ``audio``, ``image``
    media paths, relative to ``root`` (default: the manifest's folder) or absolute
``text`` (or ``caption``)
    the caption
``start``, ``end``
    seconds: the row is that segment of its media (several rows may cut one file)
``captions``
    timed captions ``[{"start": s, "end": s, "text": "..."}]`` (a JSON string in a CSV cell); each
    window of the sample gets the captions whose midpoint falls inside it
``label`` / ``labels``
    ``labels`` in the sample's JSON (a ``label`` becomes ``{"label": value}``)
``license`` (or ``licence``)
    kept in the sample's JSON
anything else
    kept under ``extra`` in the sample's JSON
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcl.errors import DataError

#: Extensions read as video (any container ffmpeg reads; a still image in a video column works too).
VIDEO_EXTS = frozenset({"mp4", "m4v", "webm", "mkv", "avi", "mov", "ogv", "mpg", "mpeg", "ts", "mts", "m2ts",
                        "flv", "wmv", "3gp", "gif"})
#: Extensions read as audio.
AUDIO_EXTS = frozenset({"wav", "flac", "ogg", "oga", "opus", "mp3", "m4a", "aac", "wma", "aif", "aiff", "amr"})
#: Extensions read as still images (encoded as a still video of ``--image-seconds``).
IMAGE_EXTS = frozenset({"png", "jpg", "jpeg", "bmp", "webp", "tif", "tiff"})
#: Sidecar extensions of the folder layout: the caption and the metadata of the media with the same stem.
TEXT_EXT, META_EXT = "txt", "json"

_KIND_OF_EXT = {**{e: "video" for e in VIDEO_EXTS}, **{e: "audio" for e in AUDIO_EXTS},
                **{e: "image" for e in IMAGE_EXTS}, TEXT_EXT: "text", META_EXT: "meta"}
_ALIASES = {"id": "key", "caption": "text", "licence": "license"}
_KNOWN = ("key", "video", "audio", "image", "text", "start", "end", "captions", "label", "labels", "license")
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


class BuildError(DataError):
    """A build cannot start or go on: unreadable manifest or folder, unusable output (one line, naming the path)."""


@dataclass(frozen=True)
class Rejection:
    """Why an input produced no sample: ``reason`` is a short key (counted in the report), ``detail`` one line."""

    reason: str
    detail: str = ""


@dataclass
class Input:
    """One unit of work: a manifest row or a folder group. Media paths are absolute strings."""

    index: int
    key: str
    #: Where the input came from, for the report: ``manifest.jsonl:12`` or the folder group's relative stem.
    source: str
    video: str | None = None
    audio: str | None = None
    image: str | None = None
    #: Inline caption (manifest); may hold lone surrogates when the manifest bytes were not UTF-8.
    text: str | None = None
    #: Sidecar caption file (folder layout), read and checked by the worker.
    text_file: str | None = None
    #: Sidecar metadata file (folder layout): a JSON object with the manifest's optional columns.
    meta_file: str | None = None
    start: float | None = None
    end: float | None = None
    captions: list[dict[str, Any]] | None = None
    labels: Any = None
    license: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rejection: Rejection | None = None

    def media_path(self) -> str | None:
        """The main media file (video, else image, else audio)."""
        return self.video or self.image or self.audio


def sanitize_key(text: str) -> str:
    """A tar-safe sample key: path components kept (``/``), every other character outside
    ``[A-Za-z0-9_-]`` replaced by ``_`` (a dot would split the key from the member extension)."""
    parts = [_KEY_CHARS.sub("_", p) for p in text.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts) or "_"


def _rel_stem(path: str, root: Path) -> str:
    p = Path(path)
    try:
        rel = p.relative_to(root)
    except ValueError:
        rel = Path(*p.parts[1:]) if p.is_absolute() else p
    return str(rel.with_suffix(""))


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number") from None
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} {value!r} must be a finite number >= 0")
    return x


def parse_captions(value: Any) -> list[dict[str, Any]] | None:
    """Timed captions from a row (a list, or its JSON text in a CSV cell) -> ``[{"start", "end", "text"}]``.
    Raises ``ValueError`` on a malformed list."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("captions is not JSON") from None
    if not isinstance(value, list):
        raise ValueError("captions must be a list of {start, end, text}")
    out = []
    for i, c in enumerate(value):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise ValueError(f"captions[{i}] must be an object with a text string")
        start, end = _number(c.get("start"), f"captions[{i}].start"), _number(c.get("end"), f"captions[{i}].end")
        if start is None or end is None or end < start:
            raise ValueError(f"captions[{i}] needs start <= end")
        out.append({"start": start, "end": end, "text": c["text"]})
    return out


def apply_fields(item: Input, row: dict[str, Any]) -> None:
    """Set the optional columns (``text``, ``start``, ``end``, ``captions``, labels, licence, extra) of
    ``item`` from ``row`` (normalised names, absent values dropped). Raises ``ValueError`` on bad values."""
    if row.get("text") is not None:
        item.text = row["text"] if isinstance(row["text"], str) else json.dumps(row["text"])
    item.start = _number(row.get("start"), "start") if "start" in row else item.start
    item.end = _number(row.get("end"), "end") if "end" in row else item.end
    if item.start is not None and item.end is not None and item.end <= item.start:
        raise ValueError(f"end {item.end} <= start {item.start}")
    if "captions" in row:
        item.captions = parse_captions(row["captions"])
    if "labels" in row:
        item.labels = row["labels"] if isinstance(row["labels"], dict) else {"label": row["labels"]}
    if "label" in row:
        item.labels = {**(item.labels or {}), "label": row["label"]}
    if "license" in row:
        item.license = str(row["license"])
    item.extra.update({k: v for k, v in row.items() if k not in _KNOWN})


def normalise_row(row: dict[Any, Any]) -> dict[str, Any]:
    """Lower-case column names with their aliases resolved; empty and null values dropped."""
    out = {}
    for name, value in row.items():
        name = str(name).strip().lower()
        name = _ALIASES.get(name, name)
        if value is None or (isinstance(value, str) and value == ""):
            continue
        out[name] = value
    return out


def _check_media(row: dict[str, Any], root: Path) -> dict[str, str]:
    """``{kind: absolute path}`` for the row's media columns; ``FileNotFoundError`` names a missing one."""
    media = {}
    for kind in ("video", "audio", "image"):
        if kind in row:
            path = Path(str(row[kind])).expanduser()
            path = path if path.is_absolute() else root / path
            if not path.is_file():
                raise FileNotFoundError(f"{kind} file not found: {path}")
            media[kind] = str(path)
    return media


def _manifest_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """``(line number, normalised row or None, error)`` for each data row of a CSV/TSV or JSONL manifest.

    Bytes that are not UTF-8 are kept as lone surrogates (``surrogateescape``): a caption holding them is
    rejected later as ``caption_not_utf8``, a path holding them still names the same file on disk.
    """
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            if not reader.fieldnames:
                raise BuildError(f"manifest {path}: no header row")
            names = {_ALIASES.get(n.strip().lower(), n.strip().lower()) for n in reader.fieldnames}
            if not names & {"video", "audio", "image", "text"}:
                raise BuildError(f"manifest {path}: needs at least one of the columns video, audio, image, text "
                                 f"(has: {', '.join(reader.fieldnames)})")
            for row in reader:
                if None in row:
                    yield reader.line_num, None, (f"{len(reader.fieldnames) + len(row[None])} fields, "
                                                  f"the header has {len(reader.fieldnames)}")
                else:
                    yield reader.line_num, normalise_row(row), ""
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8", errors="surrogateescape"))
                except ValueError as e:
                    yield i, None, f"not JSON: {e}"
                    continue
                if not isinstance(row, dict):
                    yield i, None, f"a row must be a JSON object, got {type(row).__name__}"
                    continue
                yield i, normalise_row(row), ""
    else:
        raise BuildError(f"manifest {path}: unknown format {suffix or '(no extension)'!r} "
                         f"(allowed: .csv, .tsv, .jsonl, .ndjson)")


def read_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Input]:
    """The inputs of a CSV/TSV/JSONL manifest, in row order (see the module docstring for the columns).
    Relative media paths resolve against ``root`` (default: the manifest's folder)."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"manifest not found: {path}")
    base = Path(root).resolve() if root is not None else path.resolve().parent
    if not base.is_dir():
        raise BuildError(f"--root {base}: not a directory")
    items: list[Input] = []
    for line, row, error in _manifest_rows(path):
        index = len(items)
        source = f"{path.name}:{line}"
        item = Input(index=index, key=f"row{index:08d}", source=source)
        items.append(item)
        if row is None:
            item.rejection = Rejection("bad_manifest_row", error)
            continue
        if "key" in row:
            item.key = sanitize_key(str(row["key"]))
        try:
            media = _check_media(row, base)
        except FileNotFoundError as e:
            item.rejection = Rejection("missing_file", str(e))
            continue
        item.video, item.audio, item.image = media.get("video"), media.get("audio"), media.get("image")
        if item.video and item.image:
            item.rejection = Rejection("bad_manifest_row", "a row has a video or an image, not both")
            continue
        try:
            apply_fields(item, row)
        except ValueError as e:
            item.rejection = Rejection("bad_manifest_row", str(e))
            continue
        if "key" not in row and item.media_path():
            key = sanitize_key(_rel_stem(item.media_path(), base))
            item.key = key if item.start is None else f"{key}_s{round(item.start * 1000)}"
        if not (media or item.text is not None or item.captions):
            item.rejection = Rejection("no_media", "the row names no video, audio, image or text")
    if not items:
        raise BuildError(f"manifest {path}: no rows")
    return mark_duplicates(items)


def _walk(root: Path, exclude: Iterable[Path]) -> Iterator[Path]:
    """Files under ``root`` in sorted order, skipping the ``exclude`` folders (e.g. the build output)."""
    skip = {p.resolve() for p in exclude}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() not in skip)
        for name in sorted(filenames):
            yield here / name


def scan_folder(root: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> list[Input]:
    """The inputs of a folder tree: files sharing a path and stem form one input (``clip.mp4`` +
    ``clip.txt`` caption + ``clip.json`` metadata + optionally ``clip.wav`` as its audio). A lone
    ``.txt`` is a text-only sample. Unknown extensions, two media of one kind (or a video and an image)
    under one stem, and metadata with no media are rejected and reported. Order: sorted relative paths."""
    root = Path(root)
    if not root.is_dir():
        raise BuildError(f"folder not found: {root}")
    root = root.resolve()
    groups: dict[str, dict[str, list[Path]]] = {}
    unknown: list[Path] = []
    for path in _walk(root, [Path(p) for p in exclude]):
        ext = path.suffix[1:].lower()
        kind = _KIND_OF_EXT.get(ext) if path.stem and not path.name.startswith(".") else None
        if kind is None:
            unknown.append(path)
            continue
        stem = str(path.relative_to(root).with_suffix(""))
        groups.setdefault(stem, {}).setdefault(kind, []).append(path)
    entries: list[tuple[str, dict[str, list[Path]] | None, Path | None]] = [(s, g, None) for s, g in groups.items()]
    entries += [(str(p.relative_to(root)), None, p) for p in unknown]
    entries.sort(key=lambda e: e[0])
    items: list[Input] = []
    for stem, group, odd in entries:
        item = Input(index=len(items), key=sanitize_key(stem), source=stem)
        items.append(item)
        if group is None:
            item.rejection = Rejection("unsupported_file",
                                       f"{odd.name}: not a known media, caption or metadata extension")
            continue
        media = {k: v for k, v in group.items() if k in ("video", "audio", "image")}
        if any(len(v) > 1 for v in group.values()) or ("video" in media and "image" in media):
            names = sorted(p.name for v in group.values() for p in v)
            item.rejection = Rejection("duplicate_key", f"{', '.join(names)} share the key {item.key!r}")
            continue
        item.video, item.audio, item.image = (str(media[k][0]) if k in media else None
                                              for k in ("video", "audio", "image"))
        item.text_file = str(group["text"][0]) if "text" in group else None
        item.meta_file = str(group["meta"][0]) if "meta" in group else None
        if not media and item.text_file is None:
            item.rejection = Rejection("no_media", f"{group['meta'][0].name}: metadata without media or caption")
    if not items:
        raise BuildError(f"folder {root}: no files")
    return mark_duplicates(items)


def mark_duplicates(items: list[Input]) -> list[Input]:
    """Reject every input whose key an earlier input already holds (the first one keeps it)."""
    first: dict[str, Input] = {}
    for item in items:
        holder = first.setdefault(item.key, item)
        if holder is not item and item.rejection is None:
            item.rejection = Rejection("duplicate_key", f"key {item.key!r} is already used by {holder.source}")
    return items
