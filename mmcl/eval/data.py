"""What an eval task reads, before and around the model: manifests turned into shards (once, cached),
the samples' JSON metadata scanned without decoding any media (so that label problems fail before
encoding starts), and a cache of encoded datasets keyed by the model's weights and the data's files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmcl.data.shards import DataError, expand_shards, parse_meta, read_samples
from mmcl.modalities import SampleError

log = logging.getLogger(__name__)

#: File suffixes read as a manifest (CSV / TSV / JSON lines, the columns of ``mmcl shards build``).
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")


def is_manifest(spec: str) -> bool:
    return Path(spec).suffix.lower() in MANIFEST_SUFFIXES


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/mmcl`` (``~/.cache/mmcl``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmcl"


def shards_from_manifest(manifest: str, cache_root: Path | None = None, workers: int = 1,
                         progress: bool = True) -> tuple[str, int]:
    """Build the media of a manifest into shards with ``data_tools`` (the same normalisation as for
    training data) under ``cache_root/manifests/<hash>/``; a later call with unchanged inputs reuses them.

    Returns (shard spec, number of rejected inputs).
    """
    from data_tools.build import build_shards, load_inputs

    if not Path(manifest).is_file():
        raise DataError(f"manifest not found: {manifest}")
    items = load_inputs(manifest=manifest)
    h = hashlib.sha256(Path(manifest).read_bytes())
    for item in items:
        for path in (item.video, item.audio, item.image):
            if path and Path(path).is_file():
                st = Path(path).stat()
                h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    out = (cache_root or default_cache_root()) / "manifests" / f"{Path(manifest).stem}-{h.hexdigest()[:16]}"
    report = build_shards(items, str(out), workers=max(1, workers), progress=progress)
    if not report["shards"]:
        raise DataError(f"manifest {manifest}: none of its {report['inputs']} inputs could be read "
                        f"(see {out}/shard-report.json)")
    if report["rejected"]:
        log.warning("manifest %s: %d of %d inputs rejected (%s); see %s", manifest, report["rejected"],
                    report["inputs"], report["by_reason"], out)
    return report["location"], report["rejected"]


def scan_metadata(spec: str, cache: Path | None = None) -> list[tuple[str, dict[str, Any]]] | None:
    """``(key, json metadata)`` of the samples of local shards the loader reads, in order, reading no media
    (the loader's tar reader skips over members other than ``json``). What the loader drops before decoding
    (a duplicated member, a sample a broken tar cut, a ``json`` that is not an object) is left out here too:
    the loader counts it. None when a shard is remote (it is not read twice; the checks run after encoding
    instead). ``cache``: a folder keeping the scan by :func:`data_fingerprint` (read back by a warm run)."""
    urls = expand_shards(spec)
    if any(url.startswith("pipe:") or "://" in url.removeprefix("file:") for url in urls):
        return None
    stored = Path(cache) / f"{data_fingerprint(spec)[:32]}.json" if cache is not None else None
    if stored is not None and stored.is_file():
        return [(k, m) for k, m in json.loads(stored.read_text())]
    out = _scan(urls)
    if stored is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        tmp = stored.with_name(f".{stored.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, stored)
    return out


def _scan(urls: list[str]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for url in urls:
        for sample in read_samples(url, lambda reason, detail, key: None, read=lambda ext: ext == "json"):
            try:
                out.append((sample["__key__"], parse_meta(sample)))
            except SampleError:
                continue
    return out


def model_fingerprint(model: torch.nn.Module, config: dict[str, Any]) -> str:
    """sha256 of the model's config and every weight (name, dtype, shape and bytes)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(spec: str) -> str:
    """sha256 of the shard list with each local file's size and modification time."""
    h = hashlib.sha256()
    for url in expand_shards(spec):
        p = Path(url[len("file:"):] if url.startswith("file:") else url)
        if p.is_file():
            st = p.stat()
            h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        else:
            h.update(f"{url}\n".encode())
    return h.hexdigest()


class EmbeddingCache:
    """Encoded datasets on disk: ``<root>/<key>.safetensors`` (embeddings and presence masks, never a
    pickle) beside ``<root>/<key>.json`` (sample keys, metadata, skip counts)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(model_fp: str, data_fp: str, modalities: list[str], batch_size: int, clip: Any = None) -> str:
        fields = {"model": model_fp, "data": data_fp, "modalities": sorted(modalities), "batch_size": batch_size}
        if clip is not None:  # the time windows read (data.clip); absent: the keys of before it existed
            fields["clip"] = clip
        text = json.dumps(fields)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def load(self, key: str) -> dict[str, Any] | None:
        tensors, info = self.root / f"{key}.safetensors", self.root / f"{key}.json"
        if not (tensors.is_file() and info.is_file()):
            return None
        flat = load_file(str(tensors))
        data = json.loads(info.read_text())
        data["emb"] = {m: flat[f"emb.{m}"] for m in data["modalities"]}
        data["present"] = {m: flat[f"present.{m}"] for m in data["modalities"]}
        return data

    def save(self, key: str, data: dict[str, Any]) -> None:
        """Write atomically: a reader never sees half a cache entry."""
        self.root.mkdir(parents=True, exist_ok=True)
        flat = {f"emb.{m}": t.contiguous() for m, t in data["emb"].items()}
        flat.update({f"present.{m}": t.contiguous() for m, t in data["present"].items()})
        tmp_t, tmp_i = self.root / f".{key}.safetensors.tmp", self.root / f".{key}.json.tmp"
        save_file(flat, str(tmp_t))
        tmp_i.write_text(json.dumps({"modalities": sorted(data["emb"]), "keys": data["keys"], "meta": data["meta"],
                                     "skipped": data["skipped"]}))
        os.replace(tmp_t, self.root / f"{key}.safetensors")
        os.replace(tmp_i, self.root / f"{key}.json")
