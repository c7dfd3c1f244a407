"""The streaming pipeline: WebDataset shards -> decoded, transformed, collated batches.

``webdataset`` does the reading (shard lists, ``pipe:`` URLs, member names, the shuffle buffer); this
module adds what it does not: the one tar reader of mmcl (:func:`read_samples`: members grouped into samples,
never a partial or duplicated sample through; ``mmcl shards inspect | validate`` and the eval suite's metadata
scan read with it too), the per-sample rules (:class:`SampleDecoder`: decode each modality, the
``on_missing`` rule, the skip reasons, the transform; ``mmcl shards validate`` applies the same), every bad
sample skipped and *counted by reason* (counts travel with the batches out of the loader workers, so none is
lost), deterministic per-epoch shard order (same on every rank), splitting by rank and worker with a clear
error when there are too few shards, and an optional RAM cache of decoded samples for small datasets.

A batch is a dict::

    {"keys": [N] sample keys, "inputs": {modality: tensor [N, ...]},
     "present": {modality: bool [N]}, "skipped": {reason: count since the previous batch},
     "adjusted": {reason: count of samples changed to fit, e.g. short_source},
     "windows": [N] [start, end] seconds (with data.clip only),
     "cache_windows": {modality: [N] str | None}}

``cache_windows`` say per sample what fixes the input besides the key (:meth:`ShardStream._cache_window`;
None: drawn at random), for the trainer's frozen-feature cache.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import multiprocessing as mp
import os
import random
import tarfile
from collections import Counter
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmcl.data.augment import AugmentConfig
from mmcl.data.context import SampleContext
from mmcl.data.window import Window, WindowConfig, draw_window, sample_duration
from mmcl.errors import DataError
from mmcl.modalities.base import MissingModality, Processor, SampleError

log = logging.getLogger(__name__)


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


#: File names the loader reads as tar shards (webdataset decompresses the compressed ones).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: Specs already resolved in this process (their list is logged once).
_logged_specs: set[str] = set()


def _local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def _shards_in_dir(folder: Path) -> list[str]:
    shards = sorted(str(p) for p in folder.iterdir() if p.is_file() and p.name.endswith(TAR_SUFFIXES))
    if not shards:
        raise DataError(f"no shards ({', '.join(TAR_SUFFIXES)} files) in directory {folder}")
    return shards


def _shards_in_list(path: Path) -> list[str]:
    """One shard per line (blank lines and ``#`` comments skipped), relative paths from the list's folder."""
    urls: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: neither a tar shard nor a UTF-8 list of shards") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for url in wds.shardlists.expand_urls(line):
            local = _local_path(url)
            if _is_local(local) and not Path(local).is_absolute():
                url = str(path.parent / local)
            urls.extend(_resolve_part(url, in_list=f"{path}:{number}"))
    if not urls:
        raise DataError(f"shard list {path} names no shards")
    return urls


def _resolve_part(url: str, in_list: str = "") -> list[str]:
    """One brace-expanded part of a spec -> its shard URLs (a glob, a directory or a list file expanded)."""
    if not _is_local(url):
        return [url]
    path = _local_path(url)
    where = f" (listed at {in_list})" if in_list else ""
    if any(c in path for c in "*?["):
        matches = sorted(p for p in glob.glob(os.path.expanduser(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"shard pattern {path} matches no files{where}")
        return matches
    p = Path(path).expanduser()
    if p.is_dir():
        return _shards_in_dir(p)
    if not p.is_file():
        raise DataError(f"shard not found: {path}{where}")
    if p.name.endswith(TAR_SUFFIXES) or tarfile.is_tarfile(p):
        return [url]
    if in_list:
        raise DataError(f"{in_list}: {path} is a list of shards; lists cannot name other lists")
    return _shards_in_list(p)


def expand_shards(spec: str) -> list[str]:
    """Resolve a shard spec to the list of shard URLs the loader reads.

    ``spec`` is one or more parts separated by ``::``; each is brace-expanded (``a-{000000..000009}.tar``,
    ``{a,b}``) and each result is then

    - a URL (``pipe:COMMAND``, ``s3://...``): kept as it is;
    - a shell-style glob (``data/*.tar``, ``data/**/train-*.tar``; quote it so the shell leaves it): the
      matching files, sorted;
    - a directory: its ``.tar`` / ``.tar.gz`` / ``.tgz`` files, sorted (``sizes.json`` there gives epochs a
      known length);
    - a file that is not a tar: a list of shards, one per line (any of the forms above except another
      list; blank lines and ``#`` comments skipped; relative paths start from the list's folder);
    - otherwise a local shard, which must exist.

    An empty result is an error. The resolved list is logged once per spec and process.
    """
    if not spec or not spec.strip():
        raise DataError("no shards given (empty shard spec)")
    urls = [shard for part in wds.shardlists.expand_urls(spec.strip()) for shard in _resolve_part(part)]
    if not urls:
        raise DataError(f"shard spec {spec!r} expands to no shards")
    if spec not in _logged_specs:
        _logged_specs.add(spec)
        shown = ", ".join(urls) if len(urls) <= 4 else f"{urls[0]}, {urls[1]}, ..., {urls[-1]}"
        log.info("shards %s: %d shard(s): %s", spec, len(urls), shown)
        log.debug("shards %s: %s", spec, urls)
    return urls


def declared_sizes(urls: list[str]) -> dict[str, int | None]:
    """``{url: number of samples the sizes.json beside it lists}`` (None where unknown: a remote shard, no
    readable ``sizes.json``, or the shard not in it)."""
    out: dict[str, int | None] = {}
    cache: dict[Path, dict[str, int]] = {}
    for url in urls:
        if not _is_local(url):
            out[url] = None
            continue
        p = Path(url)
        sizes = p.parent / "sizes.json"
        if sizes not in cache:
            try:
                cache[sizes] = json.loads(sizes.read_text()) if sizes.is_file() else {}
            except ValueError:
                cache[sizes] = {}
        count = cache[sizes].get(p.name)
        out[url] = int(count) if count is not None else None
    return out


def dataset_size(urls: list[str]) -> int | None:
    """Number of samples from ``sizes.json`` beside the shards (None when unknown for any of them)."""
    sizes = declared_sizes(urls).values()
    return None if None in sizes else sum(sizes)


#: ``report(reason, detail, key)``: where :func:`read_samples` sends a problem of its shard (``key`` None:
#: the shard's own; ``detail`` does not repeat the shard's URL).
Report = Callable[[str, str, str | None], None]


def read_samples(url: str, report: Report, read: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard, ``{"__key__", "__url__", ext: bytes, ...}``, members grouped by key in tar order
    (extensions lower-cased). Problems go to ``report`` and end at most this shard:

    - ``unreadable_shard``: it cannot be opened (``wds.gopen``: files, URLs, ``pipe:`` commands);
    - ``corrupt_tar``: it breaks (truncated, corrupt), reported where it breaks; the samples before are
      yielded, the one it interrupted is not (never a partial sample);
    - ``duplicate_member`` (with the key): a sample holds an extension twice; the sample is dropped.

    ``read(ext)`` false: the member's bytes are skipped over, not read (its sample is still yielded, without
    it). A sample is complete once a member of another key starts, so it is yielded before that member is read.
    The members are iterated here rather than with ``wds.tariterators.tar_file_iterator``, which drops an
    unselected member with its name and so loses the keys of samples whose members are all skipped.
    """
    try:
        stream = wds.gopen(url)
    except Exception as e:  # whatever the opener raises (missing file, failed command, network)
        report("unreadable_shard", f"{type(e).__name__}: {e}", None)
        return
    current: dict[str, Any] | None = None
    seen: set[str] = set()
    bad = False
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                tar.members = []  # a streamed TarFile keeps every header it read: drop them, as webdataset does
                if not member.isreg():
                    continue
                key, ext = wds.tariterators.base_plus_ext(member.name)
                if key is None:
                    continue
                if current is None or key != current["__key__"]:
                    if current is not None and not bad:
                        yield current
                    current, seen, bad = {"__key__": key, "__url__": url}, set(), False
                ext = ext.lower()
                if ext in seen:
                    if not bad:
                        report("duplicate_member", f"{ext} twice", key)
                    bad = True
                seen.add(ext)
                if not bad and (read is None or read(ext)):
                    current[ext] = tar.extractfile(member).read()
    except Exception as e:  # whatever breaks a tar stream (tarfile, a compressor, a pipe) ends the shard
        cut = f" (sample {current['__key__']} cut)" if current is not None and not bad else ""
        report("corrupt_tar", f"{type(e).__name__}: {str(e)[:200]}{cut}", None)
        return
    finally:
        with contextlib.suppress(Exception):
            stream.close()
    if current is not None and not bad:
        yield current


def parse_meta(raw: dict[str, Any]) -> dict[str, Any]:
    """The ``json`` member of a raw sample as a dict (``{}`` without one); ``SampleError("bad_json")`` when it
    is not a UTF-8 JSON object."""
    if raw.get("json") is None:
        return {}
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError("bad_json", str(e)) from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json", f"not a JSON object: {type(meta).__name__}")
    return meta


class SampleDecoder:
    """The per-sample rules of the loader, which ``mmcl shards validate`` applies too: a raw sample (tar
    members by extension) -> decoded modalities (:meth:`decode`, what a RAM cache keeps) -> one tensor per
    modality (:meth:`transform`). A sample that cannot be used raises :class:`SampleError` whose ``reason`` is
    the key it is counted under in ``data.skipped``.

    Args:
        processors: ``{name: processor}`` (``find_member`` / ``decode`` / ``transform`` / ``empty``).
        on_missing: a sample lacking a modality is skipped (``skip``, counted ``missing_<name>``) or keeps it
            masked (``mask``; a sample with none is ``no_modality``).
        with_meta: also parse the ``json`` member (:func:`parse_meta`).
        clip: ``data.clip``: one window per sample (:func:`~mmcl.data.window.draw_window`) handed to every
            time-based modality as ``ctx.window``, and kept as ``decoded["__window__"]``.
        view: which of ``clip.eval_clips`` evaluation windows to draw.
    """

    def __init__(self, processors: dict[str, Processor], on_missing: Literal["skip", "mask"] = "skip",
                 with_meta: bool = False, clip: WindowConfig | None = None, view: int = 0):
        self.processors = processors
        self.on_missing = on_missing
        self.with_meta = with_meta
        self.clip = clip
        self.view = view
        if clip is not None:
            for proc in processors.values():
                proc.check_window(clip.seconds, "data.clip")
        #: The placeholders of absent modalities; their shapes are the ones a transform must give.
        self.empty = {name: proc.empty() for name, proc in processors.items()}

    def decode(self, raw: dict[str, Any], ctx: SampleContext | None = None) -> tuple[dict[str, Any], dict[str, bool]]:
        """-> (decoded data by modality, plus ``__meta__`` with ``with_meta`` and ``__adjusted__``: the sorted
        reasons it was changed to fit, when it was; presence by modality). ``ctx`` is handed to every processor
        (outside the loader: a fresh one of the sample's key)."""
        decoded: dict[str, Any] = {}
        present: dict[str, bool] = {}
        ctx = ctx or SampleContext(raw["__key__"])
        window = self.window(raw, ctx) if self.clip is not None else None
        if window is not None:
            ctx = replace(ctx, window=window)
            decoded["__window__"] = window
            if window.short:
                ctx.adjusted.append("short_source")
        for name, proc in self.processors.items():
            try:
                decoded[name] = proc.decode(raw, ctx)
                present[name] = True
            except MissingModality:
                if self.on_missing == "skip":
                    raise
                present[name] = False
            except SampleError:
                raise
            except Exception as e:  # a decoder bug must not end a long run: count it under its own reason
                raise SampleError(f"error_{name}", f"{type(e).__name__}: {e}") from None
        if not any(present.values()):
            raise SampleError("no_modality", "none of: " + ", ".join(self.processors))
        if ctx.adjusted:
            decoded["__adjusted__"] = sorted(set(ctx.adjusted))
        if self.with_meta:
            decoded["__meta__"] = parse_meta(raw)
        return decoded, present

    def window(self, raw: dict[str, Any], ctx: SampleContext | None) -> Window | None:
        """The sample's window from its duration (metadata, else a probe of its time-based media); None when
        it has none of them."""
        members = []
        for proc in self.processors.values():
            if proc.timed:
                try:
                    members.append(proc.find_member(raw)[1])
                except MissingModality:
                    continue
        if not members:
            return None
        duration = sample_duration(raw, members)
        return draw_window(self.clip, duration, ctx or SampleContext(raw["__key__"]), self.view)

    def transform(self, decoded: dict[str, Any], present: dict[str, bool], train: bool,
                  ctx: SampleContext | None = None) -> dict[str, torch.Tensor]:
        """-> ``{name: tensor}`` for every modality (the placeholder where absent), each of its placeholder's
        shape (``bad_shape_<name>`` otherwise)."""
        if ctx is not None and decoded.get("__window__") is not None:
            ctx = replace(ctx, window=decoded["__window__"])
        out: dict[str, torch.Tensor] = {}
        for name, proc in self.processors.items():
            if not present[name]:
                out[name] = self.empty[name]
                continue
            try:
                tensor = proc.transform(decoded[name], train, ctx)
            except SampleError:
                raise
            except Exception as e:
                raise SampleError(f"error_{name}", f"{type(e).__name__}: {e}") from None
            if tensor.shape != self.empty[name].shape:
                raise SampleError(f"bad_shape_{name}", f"{list(tensor.shape)} != {list(self.empty[name].shape)}")
            out[name] = tensor
        return out


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
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


class WorkerSeed:
    """The per-epoch seed of persistent loader workers. A fresh DataLoader iterator draws a base seed from the
    main process's torch RNG and seeds each new worker from it; persistent workers are seeded once. So that
    they draw exactly what fresh workers would (and a resumed run, whose workers are fresh, matches), the
    :class:`Loader` draws the base seed the same way at each later epoch and every worker applies it at the
    start of its epoch as the DataLoader does (``random`` and torch: base + worker id; numpy from both)."""

    def __init__(self) -> None:
        self.value = mp.Array("q", [0, 0])  # [generation, base seed]; generation 0: nothing to apply
        self.applied = 0

    def set(self, base: int) -> None:
        self.value[:] = [self.value[0] + 1, base]

    def apply(self) -> None:
        info = torch.utils.data.get_worker_info()
        generation, base = self.value[:]
        if info is None or generation in (0, self.applied):
            return
        import numpy as np
        from torch.utils.data._utils.worker import _generate_state

        random.seed(base + info.id)
        torch.manual_seed(base + info.id)
        np.random.seed(_generate_state(base, info.id))
        self.applied = generation


class ShardStream(IterableDataset):
    """Iterable of batches from shards. One instance per split; iterate once per epoch.

    Args:
        urls: expanded shard list (see :func:`expand_shards`).
        processors: ``{modality: Processor}`` to decode with (e.g. ``model.processors``); a sample must
            provide each (or, with ``on_missing="mask"``, at least one) of them.
        batch_size: samples per batch; the last batch of a worker may be smaller (dropped with ``drop_last``).
        train: shuffle shards and samples and allow augmentation.
        drop_last: drop each worker's last partial batch (training only: ignored when ``train`` is False).
        split_by_node: give each rank its own shards (training); off for eval on one rank.
        clip: ``data.clip``, one time window per sample (see :class:`SampleDecoder`); ``view``: which of its
            evaluation windows. With a window and ``cache`` in training, the cache keeps the raw sample
            (its compressed bytes) rather than the decoded one, and each epoch decodes that epoch's window
            from it: windows move every epoch, and the RAM held is the shards' size, not every frame's.
        augment: ``data.augment``: each processor of a kind it names augments when ``train`` (see
            :mod:`mmcl.data.augment`).
    """

    def __init__(self, urls: list[str], processors: dict[str, Processor], batch_size: int, *,
                 train: bool = True, shuffle_buffer: int = 1000, shard_shuffle: bool = True,
                 resample: bool = False, seed: int = 0, on_missing: str = "skip", cache: bool = False,
                 split_by_node: bool = True, with_meta: bool = False, clip: WindowConfig | None = None,
                 view: int = 0, augment: AugmentConfig | None = None, drop_last: bool = False):
        super().__init__()
        self.urls = list(urls)
        if train and augment is not None:
            processors = {name: proc if getattr(augment, proc.kind, None) is None
                          else proc.with_augment(getattr(augment, proc.kind)) for name, proc in processors.items()}
        self.processors = processors
        self.batch_size = batch_size
        self.train = train
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.shard_shuffle = shard_shuffle and train
        self.resample = resample
        self.seed = seed
        self.cache = cache
        self.split_by_node = split_by_node
        self.with_meta = with_meta
        self.drop_last = drop_last and train
        self.decoder = SampleDecoder(processors, on_missing, with_meta, clip, view)
        self.epoch = SharedEpoch()
        self.worker_seed = WorkerSeed()
        #: The cache keeps raw samples (decoded again each epoch: a new window) instead of decoded ones.
        self._cache_raw = clip is not None and train
        self._cache: dict[str, Any] = {}
        self._cache_complete = False
        #: The reasons of the samples (and shard problems) the cached pass skipped, counted again every
        #: cached epoch as a pass over the shards would count them.
        self._cache_skips: list[str] = []
        self._skipped: Counter = Counter()
        #: Samples used but changed to fit, by reason (``short_source``: shorter than the window, padded).
        self._adjusted: Counter = Counter()
        self._warned = 0

    # -- bookkeeping -------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def _skip(self, reason: str, detail: str = "", key: str | None = None) -> None:
        self._skipped[reason] += 1
        if self._warned < 20:
            self._warned += 1
            log.warning("skipped %s: %s %s", f"sample {key}" if key else "shard", reason, detail)

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

    def _raw_samples(self, epoch: int, skips: list[str] | None = None) -> Iterator[dict]:
        urls = self._shards_for_me(epoch)
        if self.resample:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            rng = random.Random(hash((self.seed, epoch, rank, worker)))
            mine = urls  # (the generator must not look up its own name)
            urls = (rng.choice(mine) for _ in iter(int, 1))
        return (sample for url in urls for sample in self._read(url, skips))

    def _read(self, url: str, skips: list[str] | None = None) -> Iterator[dict]:
        def report(reason: str, detail: str, key: str | None) -> None:
            self._skip(reason, f"{url}: {detail}", key)
            if skips is not None:
                skips.append(reason)

        return read_samples(url, report)

    def _decode(self, sample: dict, epoch: int, skips: list[str] | None = None) -> tuple[dict, dict] | None:
        """(decoded, presence) of a raw sample read in ``epoch``, or None when it is skipped (counted, and its
        reason added to ``skips``)."""
        key = sample["__key__"]
        try:
            out = self.decoder.decode(sample, SampleContext(key, epoch, self.seed, self.train))
        except SampleError as e:
            self._skip(e.reason, e.detail, key)
            if skips is not None:
                skips.append(e.reason)
            return None
        return out

    def _fill_cache(self) -> None:
        """Decode every sample of the shards this rank and worker read in epoch 0 into the cache, as that
        epoch would have (its contexts): a run resumed in a later epoch starts with an empty cache, and a
        cached epoch's order needs all of its keys."""
        skips: list[str] = []
        for sample in self._raw_samples(0, skips):
            if sample["__key__"] not in self._cache:
                out = self._decode(sample, 0, skips)
                if out is not None:
                    self._cache[sample["__key__"]] = sample if self._cache_raw else out
        self._cache_skips, self._cache_complete = skips, True

    def _decoded_samples(self, epoch: int) -> Iterator[tuple[str, dict, dict]]:
        """(key, decoded, presence) of each usable sample of ``epoch`` for this rank and worker.

        With ``cache`` (and no ``resample``) epoch 0 reads the shards and keeps every decoded sample; every
        later epoch is a permutation of the sorted cached keys drawn from (seed, epoch, rank, worker) alone,
        whether the cache was filled by epoch 0 of this process or, after a resume into a later epoch, is
        filled first (:meth:`_fill_cache`), so a resumed run reads the uninterrupted run's order. The
        samples epoch 0 skipped are counted again each cached epoch, as a pass over the shards counts them.
        """
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(hash((self.seed, epoch, rank, worker)))
        cached = self.cache and not self.resample
        if cached and epoch > 0 and not self._cache_complete:
            self._fill_cache()  # counts what it skips
        elif self._cache_complete:
            self._skipped.update(self._cache_skips)
        if self._cache_complete:
            keys = sorted(self._cache)
            if self.train:
                rng.shuffle(keys)
            for k in keys:
                out = self._decode(self._cache[k], epoch) if self._cache_raw else self._cache[k]
                if out is not None:
                    yield (k, *out)
            return
        skips: list[str] | None = [] if cached else None
        raw = self._raw_samples(epoch, skips)
        if self.shuffle_buffer > 1:
            raw = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(raw)
        for sample in raw:
            out = self._decode(sample, epoch, skips)
            if out is None:
                continue
            if self.cache:
                self._cache[sample["__key__"]] = sample if self._cache_raw else out
            yield (sample["__key__"], *out)
        if cached:
            self._cache_skips, self._cache_complete = skips, True

    def _samples(self, epoch: int) -> Iterator[tuple[str, dict, dict, Any, Window | None, dict]]:
        """(key, {modality: tensor}, presence, metadata, window, {modality: cache window}) of each usable
        sample (the cache window: :meth:`_cache_window`)."""
        for key, decoded, present in self._decoded_samples(epoch):
            self._adjusted.update(decoded.get("__adjusted__", ()))  # each epoch that reads it, cached or not
            ctx = SampleContext(key, epoch, self.seed, self.train)
            try:
                inputs = self.decoder.transform(decoded, present, self.train, ctx)
            except SampleError as e:
                self._skip(e.reason, e.detail, key)
                continue
            cache_windows = {name: self._cache_window(proc, decoded, present[name], ctx)
                             for name, proc in self.processors.items()}
            yield key, inputs, present, decoded.get("__meta__"), decoded.get("__window__"), cache_windows

    def _cache_window(self, proc: Processor, decoded: dict, present: bool, ctx: SampleContext) -> str | None:
        """What fixes a modality's input besides the sample key (``""`` for an absent one): None (never
        cached) when training augments it or draws its shared time window at random; the window's span when
        it has one; else the processor's own :meth:`Processor.cache_window`."""
        if not present:
            return ""
        if self.train and proc.augment is not None:
            return None
        window = decoded.get("__window__")
        if window is not None and proc.timed:
            if self.train and self.decoder.clip.train == "random" and window.duration > window.seconds:
                return None
            return f"{window.start:.6f}+{window.seconds:g}"
        return proc.cache_window(decoded[proc.name], self.train, ctx)

    def _collate(self, items: list[tuple[str, dict, dict, Any, Window | None, dict]]) -> dict[str, Any]:
        batch: dict[str, Any] = {"keys": [k for k, *_ in items], "inputs": {}, "present": {}, "cache_windows": {}}
        if self.with_meta:
            batch["meta"] = [item[3] for item in items]
        if self.decoder.clip is not None:
            batch["windows"] = [[w.start, w.end] if w is not None else None for w in (item[4] for item in items)]
        for name, mod in self.processors.items():
            batch["inputs"][name] = mod.collate([item[1][name] for item in items])
            batch["present"][name] = torch.tensor([item[2][name] for item in items], dtype=torch.bool)
            batch["cache_windows"][name] = [item[5][name] for item in items]
        return batch

    def _take_skipped(self) -> dict[str, int]:
        out = dict(self._skipped)
        self._skipped.clear()
        return out

    def _take_adjusted(self) -> dict[str, int]:
        out = dict(self._adjusted)
        self._adjusted.clear()
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.worker_seed.apply()
        batches = self._batches()
        while True:
            with one_thread():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def _seed_persistent_worker(self, epoch: int) -> None:
        """A persistent loader worker (``data.cache`` keeps its cache in it) outlives epochs, so its global
        RNGs would carry every earlier epoch's draws (a processor drawing from ``torch``'s global RNG), which a
        run resumed in a later epoch, whose worker starts there, cannot replay. From the second epoch on they
        are reseeded from (seed, epoch, rank, worker), as a worker that is not persistent is seeded anew every
        epoch from the epoch's RNG state; the first epoch keeps the DataLoader's seeding."""
        if epoch == 0 or not self.cache or get_worker_info() is None:
            return
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        seed = SampleContext(f"loader-worker-{rank}-{worker}", epoch, self.seed).seed_for("global_rng")
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def _batches(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch.get()
        self._seed_persistent_worker(epoch)
        pending: list = []
        for item in self._samples(epoch):
            pending.append(item)
            if len(pending) == self.batch_size:
                batch = self._collate(pending)
                batch["skipped"], batch["adjusted"] = self._take_skipped(), self._take_adjusted()
                pending = []
                yield batch
        if self.drop_last:
            pending = []
        if pending or self._skipped or self._adjusted:
            batch = self._collate(pending) if pending else {"keys": [], "inputs": {}, "present": {},
                                                            "cache_windows": {}, "meta": []}
            batch["skipped"], batch["adjusted"] = self._take_skipped(), self._take_adjusted()
            yield batch


class Loader:
    """A ``DataLoader`` over a :class:`ShardStream` that adds up the skip (``skipped``) and adjust
    (``adjusted``) counts from every worker and drops the count-only (empty) batches. Iterate it once per
    epoch after :meth:`set_epoch`.

    ``pin_memory``: batches in page-locked memory (training on CUDA: the copies to the GPU are then
    asynchronous); ``persistent``: workers live across epochs (always with ``stream.cache``, which lives in
    them); they are seeded per epoch as fresh ones would be (:class:`WorkerSeed`), or with the cache from
    (seed, epoch, rank, worker) by the stream itself; ``prefetch_factor``: batches each worker prepares ahead."""

    def __init__(self, stream: ShardStream, workers: int = 0, *, pin_memory: bool = False, persistent: bool = True,
                 prefetch_factor: int = 4):
        self.stream = stream
        self.workers = workers
        self.skipped: Counter = Counter()
        self.adjusted: Counter = Counter()
        persistent = workers > 0 and (persistent or stream.cache)
        # With the RAM cache the stream reseeds its workers itself (ShardStream._seed_persistent_worker).
        self.reseed = persistent and not stream.cache
        self.iterated = False
        self.loader = DataLoader(
            stream, batch_size=None, num_workers=workers, persistent_workers=persistent,
            prefetch_factor=prefetch_factor if workers > 0 else None, pin_memory=pin_memory,
        )
        self.size = dataset_size(stream.urls)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.reseed and self.iterated:  # the draw a fresh DataLoader iterator makes
            self.stream.worker_seed.set(int(torch.empty((), dtype=torch.int64).random_()))
        self.iterated = True
        for batch in self.loader:
            self.skipped.update(batch.pop("skipped"))
            self.adjusted.update(batch.pop("adjusted"))
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
                 world: int = 1, pin_memory: bool = False, persistent_workers: bool = True, prefetch_factor: int = 4,
                 **kwargs: Any) -> Loader:
    """Expand ``spec``, check it can be split over ``world`` ranks x ``workers``, and build the loader (the
    :class:`Loader` options, the rest for :class:`ShardStream`)."""
    urls = expand_shards(spec)
    if train:
        check_shard_split(urls, world, workers, kwargs.get("resample", False))
    stream = ShardStream(urls, processors, batch_size, train=train, split_by_node=train, **kwargs)
    return Loader(stream, workers, pin_memory=pin_memory, persistent=persistent_workers,
                  prefetch_factor=prefetch_factor)
