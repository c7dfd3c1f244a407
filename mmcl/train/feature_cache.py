"""The frozen-feature cache: the features of a fully locked tower, computed once per sample and reused.

A locked tower (``train.towers.<m>.lock`` without ``unlocked_blocks``; with a shared trunk, the modality's
embedder and the trunk both locked) is frozen in eval mode (:meth:`mmcl.model.MultimodalModel.train`), so its
features are a function of its input alone. Where that input is fixed by the sample as well
(:meth:`~mmcl.modalities.base.Processor.cache_window` is not None: no train-time augmentation, no random time
window), the features are computed the first time the sample is seen and read back afterwards: the step runs
only the head on them (``model(inputs, features)``, :meth:`~mmcl.model.MultimodalModel.encode`). Rows whose
input is drawn at random are computed every time, as without the cache.

- **Key**: the sample's key, joined with its window (``cache_window``: ``""`` while the window is the whole
  sample or a function of the processing alone; a time window's description once one applies: a processor
  with time windows returns it there and it becomes part of the key).
- **Stores**: in RAM on each rank (:class:`RamStore`), or on disk beside the run (:class:`DiskStore`:
  ``DIR/feature_cache/<modality>-<fingerprint>/``, per rank a float32 rows file and its keys; every rank reads
  every rank's rows at the start of each epoch, and a resumed run starts from them).
- **Invalidation**: the fingerprint hashes the tower's class and weights (with a shared trunk, the trunk's too)
  and the modality's processing config; a changed tower or processing gets a new directory, and the stale
  directories of the modality are removed.
- Not under DeepSpeed ZeRO-3 (its partitioned weights cannot be fingerprinted before the run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmcl.config import Config, to_dict
from mmcl.model import MultimodalModel
from mmcl.shared import TRUNK

log = logging.getLogger(__name__)

#: Between a sample's key and its window in a cache key.
SEP = "\t"


def tower_parts(model: MultimodalModel, name: str) -> list[nn.Module]:
    """The modules that make modality ``name``'s features: its tower, or its embedder and the shared trunk."""
    parts = [model.towers[name]]
    if model.model_cfg.shared_trunk is not None:
        parts.append(model.towers[TRUNK])
    return parts


def locked_modalities(model: MultimodalModel) -> list[str]:
    """The modalities whose features come from frozen parameters only (fully locked towers)."""
    return [m for m in model.processors
            if not any(p.requires_grad for part in tower_parts(model, m) for p in part.parameters())]


def fingerprint(model: MultimodalModel, name: str) -> str:
    """A hash of what modality ``name``'s features depend on: its processing config, the tower's classes and
    every weight (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    shared = model.model_cfg.shared_trunk
    h.update(json.dumps({"modality": name, "processor": model.processors[name].to_dict(),
                         "shared_trunk": to_dict(shared) if shared is not None else None},
                        sort_keys=True, default=str).encode())
    for part in tower_parts(model, name):
        h.update(type(part).__qualname__.encode())
        for key, value in part.state_dict().items():
            t = value.detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class RamStore:
    """Features by cache key, in this process's memory (CPU tensors ``[F]``)."""

    def __init__(self) -> None:
        self.rows: dict[str, torch.Tensor] = {}

    def get(self, keys: Sequence[str | None]) -> list[torch.Tensor | None]:
        return [self.rows.get(k) if k is not None else None for k in keys]

    def put(self, keys: Sequence[str], features: torch.Tensor) -> None:
        """``features [len(keys), F]`` (CPU)."""
        for k, row in zip(keys, features):
            self.rows[k] = row

    def refresh(self) -> None:
        """Nothing to read: only this process writes its rows."""

    def close(self) -> None:
        self.rows.clear()


class DiskStore:
    """Features on disk: ``directory/rank<r>.f32`` (float32 rows of ``dim``, appended) and
    ``directory/rank<r>.keys`` (their keys, one per line, in the same order), written by rank ``r`` and read
    by every rank. A torn end (a crash mid-write) is cut back to the last complete row when the rank opens
    its files again."""

    def __init__(self, directory: Path, rank: int, dim: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.dim = directory, dim
        self.row_bytes = 4 * dim
        rows, keys = self._files(rank)
        n = self._complete(rows, keys)
        with open(rows, "ab") as f:
            f.truncate(n * self.row_bytes)
        lines = keys.read_text().split("\n")[:n] if keys.is_file() else []
        keys.write_text("".join(f"{k}\n" for k in lines))
        self.own_rows, self.own_keys = open(rows, "ab"), open(keys, "a")
        self.own_count, self.own = n, rows
        self.readers: dict[Path, Any] = {}
        self.index: dict[str, tuple[Path, int]] = {}
        self.refresh()

    def _files(self, rank: int) -> tuple[Path, Path]:
        return self.directory / f"rank{rank}.f32", self.directory / f"rank{rank}.keys"

    def _complete(self, rows: Path, keys: Path) -> int:
        """Rows that have both their bytes and their key line."""
        if not rows.is_file() or not keys.is_file():
            return 0
        lines = keys.read_text().count("\n")
        return min(lines, rows.stat().st_size // self.row_bytes)

    def refresh(self) -> None:
        """Read every rank's keys (what the other ranks wrote since)."""
        for rows in sorted(self.directory.glob("rank*.f32")):
            keys = rows.with_suffix(".keys")
            n = self._complete(rows, keys)
            for row, key in enumerate(keys.read_text().split("\n")[:n]):
                self.index.setdefault(key, (rows, row))

    def _reader(self, path: Path) -> Any:
        if path not in self.readers:
            self.readers[path] = open(path, "rb")
        return self.readers[path]

    def get(self, keys: Sequence[str | None]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for k in keys:
            where = self.index.get(k) if k is not None else None
            if where is None:
                out.append(None)
                continue
            f = self._reader(where[0])
            f.seek(where[1] * self.row_bytes)
            out.append(torch.from_numpy(np.frombuffer(f.read(self.row_bytes), dtype=np.float32).copy()))
        return out

    def put(self, keys: Sequence[str], features: torch.Tensor) -> None:
        """``features [len(keys), dim]`` appended to this rank's files (as float32)."""
        if not keys:
            return
        self.own_rows.write(features.float().numpy().astype(np.float32, copy=False).tobytes())
        self.own_rows.flush()
        self.own_keys.write("".join(f"{k}\n" for k in keys))
        self.own_keys.flush()
        for i, k in enumerate(keys):
            self.index.setdefault(k, (self.own, self.own_count + i))
        self.own_count += len(keys)

    def close(self) -> None:
        self.own_rows.close()
        self.own_keys.close()
        for f in self.readers.values():
            f.close()


class FeatureCache:
    """``cache(group)``: the micro-batches with each cached modality's input replaced by its tower's
    features (``batch["features"][m]``, ``[N, F]`` on ``device``): hits read from the store, the rest computed
    (one forward of the tower on those rows, without gradient) and stored where the input is fixed."""

    def __init__(self, model: MultimodalModel, stores: dict[str, RamStore | DiskStore], device: torch.device):
        self.model = model
        self.stores = stores
        self.device = device
        #: Rows read from the store and rows computed, since the last :meth:`take_counts`.
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_run(cls, cfg: Config, model: MultimodalModel, out: Path, rank: int, device: torch.device,
                size: int | None, zero_stage: int = 0) -> FeatureCache | None:
        """The cache of a run per ``train.feature_cache`` (None: ``none``, or no fully locked tower)."""
        mode = cfg.train.feature_cache
        locked = locked_modalities(model) if mode != "none" else []
        if not locked:
            return None
        if zero_stage == 3:
            log.info("train.feature_cache: off under DeepSpeed ZeRO-3 (locked towers %s run every step)",
                     ", ".join(locked))
            return None
        dims = {m: model.heads[m].in_features for m in locked}
        if mode == "auto":
            need = size * sum(dims.values()) * 4 if size is not None and not cfg.data.resample else None
            mode = "ram" if need is not None and need <= cfg.train.feature_cache_ram_gb * 2**30 else "disk"
        stores: dict[str, RamStore | DiskStore] = {}
        for m in locked:
            if mode == "ram":
                stores[m] = RamStore()
                continue
            root = out / "feature_cache"
            directory = root / f"{m}-{fingerprint(model, m)}"
            if rank == 0 and root.is_dir():
                for stale in root.glob(f"{m}-*"):
                    if stale != directory and stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
            stores[m] = DiskStore(directory, rank, dims[m])
        log.info("train.feature_cache: %s: the locked towers of %s run once per sample (inputs drawn at random "
                 "are encoded every time)", mode, ", ".join(locked))
        return cls(model, stores, device)

    def __call__(self, group: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.batch(b) for b in group]

    def batch(self, b: dict[str, Any]) -> dict[str, Any]:
        """One batch with ``features`` for the cached modalities (their ``inputs`` removed)."""
        inputs, features = dict(b["inputs"]), dict(b.get("features", {}))
        n = len(b["keys"])
        for m, store in self.stores.items():
            windows = b.get("cache_windows", {}).get(m) or [None] * n
            keys = [None if w is None else f"{k}{SEP}{w}" if w else k for k, w in zip(b["keys"], windows)]
            rows = store.get(keys)
            miss = [i for i, row in enumerate(rows) if row is None]
            x = inputs.pop(m)
            if miss:
                with torch.no_grad():
                    fresh = self.model.tower_features(m, x[miss].to(self.device, non_blocking=True))
                on_cpu = fresh.detach().cpu()
                store.put([keys[i] for i in miss if keys[i] is not None],
                          on_cpu[[j for j, i in enumerate(miss) if keys[i] is not None]])
                for j, i in enumerate(miss):
                    rows[i] = fresh[j]
            self.hits += n - len(miss)
            self.misses += len(miss)
            features[m] = fresh if len(miss) == n else torch.stack([r.to(self.device) for r in rows])
        return {**b, "inputs": inputs, "features": features}

    def take_counts(self) -> dict[str, int]:
        """``{"hits", "misses"}`` since the last call (rows, summed over the cached modalities)."""
        out = {"hits": self.hits, "misses": self.misses}
        self.hits = self.misses = 0
        return out

    def refresh(self) -> None:
        """At an epoch's start: read what the other ranks stored."""
        for store in self.stores.values():
            store.refresh()

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
