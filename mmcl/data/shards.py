"""The streaming pipeline: WebDataset shards -> decoded, transformed, collated batches.

``webdataset`` does the reading (shard lists, ``pipe:`` URLs, tar members, the shuffle buffer); this
module adds what it does not: grouping members into samples that never lets a partial or duplicated
sample through, decoding through the modalities' processors with every bad sample skipped
and *counted by reason* (counts travel with the batches out of the loader workers, so none is lost),
deterministic per-epoch shard order (same on every rank), splitting by rank and worker with a clear
error when there are too few shards, and an optional RAM cache of decoded samples for small datasets.

A batch is a dict::

    {"keys": [N] sample keys, "inputs": {modality: tensor [N, ...]},
     "present": {modality: bool [N]}, "skipped": {reason: count since the previous batch}}
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from mmcl.config import ConfigError
from mmcl.modalities.base import MissingModality, Processor, SampleError

log = logging.getLogger(__name__)


class DataError(ConfigError):
    """The data specification cannot be used (one-line message naming the path)."""


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def expand_shards(spec: str) -> list[str]:
    """Brace-expand a shard spec (``a-{000..009}.tar``, ``::``-separated lists, ``pipe:`` URLs).

    Local paths must exist; an empty list is an error.
    """
    if not spec or not spec.strip():
        raise DataError("no shards given (empty shard spec)")
    urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise DataError(f"shard spec {spec!r} expands to no shards")
    for url in urls:
        path = url[len("file:"):] if url.startswith("file:") else url
        if _is_local(path) and not Path(path).is_file():
            raise DataError(f"shard not found: {path}")
    return urls


def dataset_size(urls: list[str]) -> int | None:
    """Number of samples from ``sizes.json`` beside the shards (None when unknown)."""
    total = 0
    sizes_cache: dict[Path, dict] = {}
    for url in urls:
        if not _is_local(url):
            return None
        p = Path(url)
        sizes_file = p.parent / "sizes.json"
        if sizes_file not in sizes_cache:
            if not sizes_file.is_file():
                return None
            sizes_cache[sizes_file] = json.loads(sizes_file.read_text())
        if p.name not in sizes_cache[sizes_file]:
            return None
        total += int(sizes_cache[sizes_file][p.name])
    return total


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the per-sample data work on one intra-op thread, as DataLoader workers do: on tensors this
    small, thread hand-offs cost more than they save (10-40x slower on a busy 2-core machine). The
    caller's setting (the model's, between batches) is restored."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


class SharedEpoch:
    """The epoch number, visible to persistent loader workers (a shared memory value)."""

    def __init__(self, epoch: int = 0):
        self.value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        self.value.value = epoch

    def get(self) -> int:
        return self.value.value


class ShardStream(IterableDataset):
    """Iterable of batches from shards. One instance per split; iterate once per epoch.

    Args:
        urls: expanded shard list (see :func:`expand_shards`).
        processors: ``{modality: Processor}`` to decode with (e.g. ``model.processors``); a sample must
            provide each (or, with ``on_missing="mask"``, at least one) of them.
        batch_size: samples per batch; the last batch of a worker may be smaller.
        train: shuffle shards and samples and allow augmentation.
        split_by_node: give each rank its own shards (training); off for eval on one rank.
    """

    def __init__(self, urls: list[str], processors: dict[str, Processor], batch_size: int, *,
                 train: bool = True, shuffle_buffer: int = 1000, shard_shuffle: bool = True,
                 resample: bool = False, seed: int = 0, on_missing: str = "skip", cache: bool = False,
                 split_by_node: bool = True, with_meta: bool = False):
        super().__init__()
        self.urls = list(urls)
        self.processors = processors
        self.batch_size = batch_size
        self.train = train
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.shard_shuffle = shard_shuffle and train
        self.resample = resample
        self.seed = seed
        self.on_missing = on_missing
        self.cache = cache
        self.split_by_node = split_by_node
        self.with_meta = with_meta
        self.epoch = SharedEpoch()
        self._cache: dict[str, tuple[dict, dict]] = {}
        self._cache_complete = False
        self._skipped: Counter = Counter()
        self._warned = 0

    # -- bookkeeping -------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def _skip(self, reason: str, detail: str = "", key: str = "") -> None:
        self._skipped[reason] += 1
        if self._warned < 20:
            self._warned += 1
            log.warning("skipped sample %s: %s %s", key, reason, detail)

    def _shard_samples(self, url: str) -> Iterator[dict]:
        """Samples of one shard, grouped by key. A shard that cannot be opened counts once as
        ``unreadable_shard``; a truncated or corrupt tar counts once as ``corrupt_tar``, ends the shard and
        drops the sample it interrupted (never a partial sample); a sample with a member twice is skipped
        and counted once as ``duplicate_member``."""
        try:
            stream = wds.gopen(url)
        except Exception as e:
            self._skip("unreadable_shard", f"{url}: {type(e).__name__}: {e}")
            return
        errors: list[Exception] = []
        current: dict | None = None

        def stop(exn: Exception) -> bool:
            errors.append(exn)
            return False

        try:
            for member in wds.tariterators.tar_file_iterator(stream, handler=stop):
                prefix, suffix = wds.tariterators.base_plus_ext(member["fname"])
                if prefix is None:
                    continue
                if current is None or prefix != current["__key__"]:
                    if current is not None and not current.get("__bad__"):
                        yield current
                    current = {"__key__": prefix, "__url__": url}
                suffix = suffix.lower()
                if suffix in current:
                    if not current.get("__bad__"):
                        current["__bad__"] = True
                        self._skip("duplicate_member", f"{suffix} twice in {url}", prefix)
                    continue
                current[suffix] = member["data"]
        except Exception as e:
            errors.append(e)
        finally:
            with contextlib.suppress(Exception):
                stream.close()
        if errors:
            self._skip("corrupt_tar", f"{url}: {type(errors[0]).__name__}: {str(errors[0])[:200]}")
        elif current is not None and not current.get("__bad__"):
            yield current

    # -- the pipeline ------------------------------------------------------------------------------------
    def _shards_for_me(self, epoch: int) -> list[str]:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        if not self.split_by_node:
            rank, world = 0, 1
        urls = list(self.urls)
        if self.shard_shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(urls)
        urls = urls[rank::world][worker::workers]
        return urls

    def _raw_samples(self, epoch: int) -> Iterator[dict]:
        urls = self._shards_for_me(epoch)
        if self.resample:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            rng = random.Random(hash((self.seed, epoch, rank, worker)))
            urls = (rng.choice(urls) for _ in iter(int, 1))
        return (sample for url in urls for sample in self._shard_samples(url))

    def _decode(self, raw: dict) -> tuple[dict, dict] | None:
        key = raw.get("__key__", "?")
        decoded, present = {}, {}
        for name, mod in self.processors.items():
            try:
                decoded[name] = mod.decode(raw)
                present[name] = True
            except MissingModality as e:
                if self.on_missing == "skip":
                    self._skip(e.reason, key=key)
                    return None
                present[name] = False
            except SampleError as e:
                self._skip(e.reason, e.detail, key)
                return None
            except Exception as e:  # a decoder bug must not end a long run: count it under its own reason
                self._skip(f"error_{name}", f"{type(e).__name__}: {e}", key)
                return None
        if not any(present.values()):
            self._skip("no_modality", key=key)
            return None
        if self.with_meta:
            try:
                decoded["__meta__"] = json.loads(raw["json"]) if raw.get("json") is not None else {}
            except (ValueError, UnicodeDecodeError) as e:
                self._skip("bad_json", str(e), key)
                return None
        return decoded, present

    def _decoded_samples(self, epoch: int) -> Iterator[tuple[str, dict, dict]]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(hash((self.seed, epoch, rank, worker)))
        if self._cache_complete:
            keys = sorted(self._cache)
            if self.train:
                rng.shuffle(keys)
            for k in keys:
                yield (k, *self._cache[k])
            return
        raw = self._raw_samples(epoch)
        if self.shuffle_buffer > 1:
            raw = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(raw)
        for sample in raw:
            out = self._decode(sample)
            if out is None:
                continue
            key = sample["__key__"]
            if self.cache:
                self._cache[key] = out
            yield (key, *out)
        if self.cache and not self.resample:
            self._cache_complete = True

    def _collate(self, items: list[tuple[str, dict, dict]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"keys": [k for k, _, _ in items], "inputs": {}, "present": {}}
        if self.with_meta:
            batch["meta"] = [d["__meta__"] for _, d, _ in items]
        for name, mod in self.processors.items():
            tensors = [mod.transform(d[name], self.train) if p[name] else mod.empty() for _, d, p in items]
            batch["inputs"][name] = mod.collate(tensors)
            batch["present"][name] = torch.tensor([p[name] for _, _, p in items], dtype=torch.bool)
        return batch

    def _take_skipped(self) -> dict[str, int]:
        out = dict(self._skipped)
        self._skipped.clear()
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = self._batches()
        while True:
            with _one_thread():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def _batches(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch.get()
        pending: list = []
        for item in self._decoded_samples(epoch):
            pending.append(item)
            if len(pending) == self.batch_size:
                batch = self._collate(pending)
                batch["skipped"] = self._take_skipped()
                pending = []
                yield batch
        if pending or self._skipped:
            batch = self._collate(pending) if pending else {"keys": [], "inputs": {}, "present": {}, "meta": []}
            batch["skipped"] = self._take_skipped()
            yield batch


class Loader:
    """A ``DataLoader`` over a :class:`ShardStream` that adds up the skip counts from every worker and
    drops the count-only (empty) batches. Iterate it once per epoch after :meth:`set_epoch`."""

    def __init__(self, stream: ShardStream, workers: int = 0):
        self.stream = stream
        self.workers = workers
        self.skipped: Counter = Counter()
        self.loader = DataLoader(
            stream, batch_size=None, num_workers=workers,
            persistent_workers=workers > 0 and stream.cache,
            prefetch_factor=4 if workers > 0 else None,
        )
        self.size = dataset_size(stream.urls)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.skipped.update(batch.pop("skipped"))
            if batch["keys"]:
                yield batch


def check_shard_split(urls: list[str], world: int, workers: int, resample: bool) -> None:
    """webdataset hangs or starves a rank when a worker gets no shard: refuse up front."""
    need = world * max(workers, 1)
    if not resample and len(urls) < need:
        raise DataError(f"{len(urls)} shard(s) cannot be split over {world} rank(s) x {max(workers, 1)} "
                        f"worker(s): need at least {need} shards (write smaller shards, use fewer workers, "
                        f"or set data.resample=true)")


def build_loader(spec: str, processors: dict[str, Processor], batch_size: int, *, train: bool, workers: int = 0,
                 world: int = 1, **kwargs: Any) -> Loader:
    """Expand ``spec``, check it can be split over ``world`` ranks x ``workers``, and build the loader."""
    urls = expand_shards(spec)
    if train:
        check_shard_split(urls, world, workers, kwargs.get("resample", False))
    stream = ShardStream(urls, processors, batch_size, train=train, split_by_node=train, **kwargs)
    return Loader(stream, workers)
