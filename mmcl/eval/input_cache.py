"""Decoded model inputs on disk, so that a warm eval run reads tensors instead of decoding media.

What a processor produces for a sample (decode, time window, transform, collate) depends on the data, the
processors' saved configs, the window and the view, never on the model's weights: successive checkpoints of
one run, or several models whose processors are configured alike, decode a benchmark once. An entry holds one
pass of :func:`mmcl.eval.suite.encode_dataset` (one view of the window) in the loader's batch order:
``<root>/<key>/part-NNNNN.safetensors`` (``inputs.<m>`` ``[rows, ...]`` and ``present.<m>`` ``[rows]``) and
``index.json`` (sample keys, metadata, skip counts, the loader's batch sizes, the parts). Reading is
memory-mapped (``safetensors.safe_open``, one batch sliced at a time), and a warm pass feeds the model the same
batches the loader made, so its embeddings are bit-identical to decoding again.

The cold pass writes while it encodes (a part per :data:`PART_BYTES`); an entry that would exceed
``max_bytes`` is dropped with one log line (estimated from the first batch and the dataset's size) and the
pass goes on decoding. Entries are written into a temporary folder and renamed into place, so a reader never
sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmcl.config import to_dict
from mmcl.data.window import WindowConfig
from mmcl.eval.data import data_fingerprint

log = logging.getLogger(__name__)

#: Rows of a part are flushed to disk once they hold this many bytes.
PART_BYTES = 256 * 2**20
#: ``max_bytes`` of the benchmarks' cache by default (``mmcl eval --input-cache-gb``).
DEFAULT_MAX_GB = 8.0
INDEX = "index.json"


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def processor_fingerprint(processor) -> dict[str, Any]:
    """A processor's saved config with each file it reads (tokenizer, feature extractor folder) replaced by
    the digest of its content: equal for two saved models whose processing is the same, wherever they are."""
    cfg = processor.to_dict()
    for dotted, path in processor.files().items():
        *parents, last = dotted.split(".")
        node = cfg
        for key in parents:
            node = node.get(key, {})
        if isinstance(node, dict) and Path(path).exists():
            node[last] = f"sha256:{_file_digest(Path(path))}"
    return cfg


def entry_key(spec: str, processors: dict[str, Any], clip: WindowConfig | None, view: int) -> str:
    """The entry of one pass: the data's files, the processors' fingerprints, the window and the view."""
    fields = {"data": data_fingerprint(spec),
              "processors": {m: processor_fingerprint(p) for m, p in sorted(processors.items())},
              "clip": to_dict(clip) if clip is not None else None, "view": view}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


class InputCache:
    """Decoded, transformed and collated model inputs by :func:`entry_key`, under ``root``."""

    def __init__(self, root: Path, max_bytes: float = DEFAULT_MAX_GB * 2**30):
        self.root = Path(root)
        self.max_bytes = max_bytes

    def batches(self, key: str, batch_size: int) -> tuple[dict[str, Any], Iterator[dict[str, Any]]] | None:
        """``(index, batches)`` of a stored entry (None when absent): the index's ``keys``, ``meta`` and
        ``skipped``, and the batches ``{"inputs": {m: [B, ...]}, "present": {m: [B]}}`` in the loader's order
        and sizes (another ``batch_size`` than the cold pass's: that many rows at a time, within each part),
        read from the memory-mapped parts."""
        entry = self.root / key
        try:
            index = json.loads((entry / INDEX).read_text())
        except (OSError, ValueError):
            return None
        if index["batch_size"] != batch_size:
            index["batch_sizes"] = [min(batch_size, p["rows"] - r) for p in index["parts"]
                                    for r in range(0, p["rows"], batch_size)]
        return index, self._read(entry, index)

    @staticmethod
    def _read(entry: Path, index: dict[str, Any]) -> Iterator[dict[str, Any]]:
        sizes = iter(index["batch_sizes"])
        for part in index["parts"]:
            with safe_open(str(entry / part["file"]), framework="pt") as f:
                slices = {name: f.get_slice(name) for name in f.keys()}
                row = 0
                while row < part["rows"]:
                    n = next(sizes)
                    batch: dict[str, Any] = {"inputs": {}, "present": {}}
                    for name, s in slices.items():
                        kind, m = name.split(".", 1)
                        batch[kind][m] = s[row:row + n]
                    row += n
                    yield batch

    def writer(self, key: str, batch_size: int, expected: int | None) -> InputWriter:
        """A writer of the entry ``key`` for a pass in batches of ``batch_size`` over ``expected`` samples
        (None: unknown)."""
        return InputWriter(self, key, batch_size, expected)


class InputWriter:
    """Collects a cold pass's batches into parts; :meth:`close` publishes the entry (unless it was dropped)."""

    def __init__(self, cache: InputCache, key: str, batch_size: int, expected: int | None):
        self.cache, self.key, self.batch_size, self.expected = cache, key, batch_size, expected
        self.tmp = cache.root / f".{key}.tmp-{os.getpid()}"
        self.pending: list[dict[str, Any]] = []
        self.pending_bytes = 0
        self.total_bytes = 0
        self.parts: list[dict[str, Any]] = []
        self.batch_sizes: list[int] = []
        self.dropped = False

    def add(self, inputs: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> None:
        """One loader batch (CPU tensors ``[B, ...]``, presence ``[B]``)."""
        if self.dropped:
            return
        n = len(next(iter(present.values())))
        size = sum(t.numel() * t.element_size() for t in inputs.values())
        limit = self.cache.max_bytes
        estimate = size / max(n, 1) * self.expected if self.expected and not self.batch_sizes else 0
        if max(estimate, self.total_bytes + size) > limit:
            log.info("decoded-input cache: this pass would take %.2f GB, over the %.2f GB limit "
                     "(--input-cache-gb); not cached", max(estimate, self.total_bytes + size) / 2**30, limit / 2**30)
            self.drop()
            return
        self.pending.append({**{f"inputs.{m}": t.contiguous() for m, t in inputs.items()},
                             **{f"present.{m}": t.contiguous() for m, t in present.items()}})
        self.batch_sizes.append(n)
        self.pending_bytes += size
        self.total_bytes += size
        if self.pending_bytes >= PART_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        self.tmp.mkdir(parents=True, exist_ok=True)
        name = f"part-{len(self.parts):05d}.safetensors"
        flat = {k: torch.cat([b[k] for b in self.pending]) for k in self.pending[0]}
        save_file(flat, str(self.tmp / name))
        rows = len(next(v for k, v in flat.items() if k.startswith("present.")))
        self.parts.append({"file": name, "rows": rows})
        self.pending, self.pending_bytes = [], 0

    def drop(self) -> None:
        self.dropped = True
        self.pending = []
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self, keys: list[str], meta: list[Any], skipped: dict[str, int]) -> None:
        """Publish the entry: the pass's sample keys, metadata and skip counts beside the parts."""
        if self.dropped:
            return
        try:
            self._flush()
            self.tmp.mkdir(parents=True, exist_ok=True)
            (self.tmp / INDEX).write_text(json.dumps({"keys": keys, "meta": meta, "skipped": skipped,
                                                      "batch_size": self.batch_size, "batch_sizes": self.batch_sizes,
                                                      "parts": self.parts}))
            final = self.cache.root / self.key
            if final.exists():  # written by another run meanwhile: the same content
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            os.replace(self.tmp, final)
        except OSError as e:
            log.info("decoded-input cache: could not write %s (%s); not cached", self.cache.root, e.strerror)
            self.drop()
