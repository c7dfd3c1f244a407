"""``mmcl shards build``: inputs -> WebDataset shards of a target size, ``sizes.json`` and a JSON report.

Inputs (:mod:`data_tools.sources`) are encoded by a pool of worker processes (:func:`data_tools.media.process`)
and written in input order, so the shards do not depend on the number of workers. A shard closes before
the input that would take it over ``shard_size`` bytes (or ``shard_samples`` samples); the windows of one
input stay in one shard. Each shard is written to ``NAME.partial`` and renamed when complete (or streamed
to a ``pipe:`` command), then recorded in ``{prefix}-progress.jsonl`` with the input range it covers and
the rejections in that range: a re-run with the same inputs and options skips the recorded shards and
goes on from the first input after them.

Every input ends up either in the shards or in the report's ``rejections`` (with a reason), never both and
never neither: ``accepted + rejected == inputs``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import subprocess
import tarfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from data_tools.media import EncodeOptions, Outcome, process
from data_tools.sources import BuildError, Input, read_manifest, scan_folder

log = logging.getLogger(__name__)

_SHARD_DIGITS = 6
_STATE_VERSION = 1
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"512M"`` / ``"1G"`` / ``"64KiB"`` / ``"100000"`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 1G, 100000)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size < 1:
        raise ValueError(f"size must be > 0, got {text!r}")
    return size


@dataclass(frozen=True)
class ShardOptions:
    """How samples are grouped into shard files."""

    #: Shard file names: ``{prefix}-000000.tar``.
    prefix: str = "shard"
    #: Target bytes per shard (a shard closes before the input that would take it over).
    shard_size: int = 1 << 30
    #: Most samples per shard (0: no limit).
    shard_samples: int = 0

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: use letters, digits, '_', '-', '.'")
        if self.shard_size < 1 or self.shard_samples < 0:
            raise ValueError("shard size must be > 0 and shard samples >= 0")

    def name(self, index: int) -> str:
        return f"{self.prefix}-{index:0{_SHARD_DIGITS}d}.tar"

    def pattern(self, n: int) -> str:
        """Brace spec of ``n`` shards (``shard-{000000..000003}.tar``)."""
        if n == 1:
            return self.name(0)
        return f"{self.prefix}-{{{0:0{_SHARD_DIGITS}d}..{n - 1:0{_SHARD_DIGITS}d}}}.tar"


# ----------------------------------------------------------------------------------------------------
# Where files go


class LocalSink:
    """Files in a local folder, each written under ``NAME.partial`` and renamed when complete."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def describe(self, name: str) -> str:
        return str(self.root / name)

    def open(self, name: str) -> IO[bytes]:
        return open(self.root / f"{name}.partial", "wb")

    def commit(self, name: str, stream: IO[bytes]) -> None:
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        os.replace(self.root / f"{name}.partial", self.root / name)

    def abort(self, name: str, stream: IO[bytes]) -> None:
        stream.close()
        (self.root / f"{name}.partial").unlink(missing_ok=True)

    def has(self, name: str, size: int) -> bool:
        path = self.root / name
        return path.is_file() and path.stat().st_size == size

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open(name) as stream:
            stream.write(data)
            self.commit(name, stream)


class PipeSink:
    """Each file streamed into a shell command (``{name}`` replaced by the file name), e.g.
    ``pipe:aws s3 cp - s3://bucket/data/{name}``. Finished shards are known from the local progress file."""

    def __init__(self, command: str):
        if "{name}" not in command:
            raise BuildError(f"output pipe:{command}: the command needs {{name}}, replaced by each file name")
        self.command = command
        self._procs: dict[str, subprocess.Popen] = {}
        self._sizes: dict[str, int] = {}

    def describe(self, name: str) -> str:
        return f"pipe:{self.command.replace('{name}', name)}"

    def open(self, name: str) -> IO[bytes]:
        proc = subprocess.Popen(self.command.replace("{name}", name), shell=True, stdin=subprocess.PIPE)
        self._procs[name] = proc
        return _CountingWriter(proc.stdin, self._sizes, name)

    def commit(self, name: str, stream: IO[bytes]) -> None:
        stream.close()
        rc = self._procs.pop(name).wait()
        if rc != 0:
            raise BuildError(f"{self.describe(name)}: exited with status {rc}")

    def abort(self, name: str, stream: IO[bytes]) -> None:
        proc = self._procs.pop(name)
        proc.kill()  # an upload tool killed mid-stream leaves no object behind
        proc.wait()

    def has(self, name: str, size: int) -> bool:
        return True

    def size(self, name: str) -> int:
        return self._sizes[name]

    def write_bytes(self, name: str, data: bytes) -> None:
        stream = self.open(name)
        stream.write(data)
        self.commit(name, stream)


class _CountingWriter:
    """A write-only stream that counts the bytes passed to a pipe."""

    def __init__(self, pipe: IO[bytes], sizes: dict[str, int], name: str):
        self.pipe, self.sizes, self.name = pipe, sizes, name
        self.closed = False
        sizes[name] = 0

    def write(self, data: bytes) -> int:
        self.pipe.write(data)
        self.sizes[self.name] += len(data)
        return len(data)

    def flush(self) -> None:
        self.pipe.flush()

    def close(self) -> None:
        self.pipe.close()
        self.closed = True


def open_sink(out: str) -> LocalSink | PipeSink:
    """``pipe:COMMAND`` or a local folder."""
    return PipeSink(out[len("pipe:"):]) if out.startswith("pipe:") else LocalSink(Path(out))


# ----------------------------------------------------------------------------------------------------
# Shards being written


def _tar_bytes(sample: dict[str, Any]) -> int:
    """Bytes ``sample`` takes in a tar: a 512-byte header per member plus its data padded to 512."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if not k.startswith("__"))


def _modalities(sample: dict[str, Any]) -> list[str]:
    return [m for m, ext in (("video", "mp4"), ("audio", "flac"), ("text", "txt")) if ext in sample]


def _write_sample(tar: tarfile.TarFile, sample: dict[str, Any]) -> None:
    """The members of ``sample`` as ``KEY.EXT`` files, in sorted order, with fixed owner, mode and mtime
    (same samples, same bytes)."""
    for ext in sorted(k for k in sample if not k.startswith("__")):
        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(sample[ext]), 0, 0o444, "mmcl", "mmcl"
        tar.addfile(info, io.BytesIO(sample[ext]))


@dataclass
class _Shard:
    """The shard being filled: the inputs from ``first`` on, their samples and rejections."""

    first: int
    name: str | None = None
    stream: IO[bytes] | None = None
    writer: tarfile.TarFile | None = None
    samples: int = 0
    bytes: int = 0
    accepted: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    modalities: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)

    def add(self, outcome: Outcome) -> None:
        for sample in outcome.samples:
            _write_sample(self.writer, sample)
            self.samples += 1
            self.bytes += _tar_bytes(sample)
            duration = json.loads(sample["json"]).get("duration", 0.0)
            for m in _modalities(sample):
                self.modalities[m] += 1
                if m != "text":
                    self.seconds[m] += duration
        self.accepted += 1
        self.warnings += [{"input": outcome.index, "key": outcome.key, "source": outcome.source, "warning": w}
                          for w in outcome.warnings]

    def record(self, end: int, size: int) -> dict[str, Any]:
        return {"shard": self.name, "first": self.first, "end": end, "samples": self.samples, "bytes": size,
                "accepted": self.accepted, "rejected": self.rejected, "warnings": self.warnings,
                "modalities": dict(self.modalities), "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


# ----------------------------------------------------------------------------------------------------
# Progress (what a re-run skips)


def fingerprint(items: list[Input], opts: EncodeOptions, shard: ShardOptions) -> str:
    """Hash of everything that decides the shards' content: inputs (as planned), encode and shard options."""
    spec = {"version": _STATE_VERSION, "encode": {k: v for k, v in dataclasses.asdict(opts).items() if k != "timeout"},
            "shard": dataclasses.asdict(shard), "inputs": [dataclasses.asdict(i) for i in items]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode("utf-8", "surrogatepass")).hexdigest()


class _Progress:
    """``{state}/{prefix}-progress.jsonl``: a header line, then one line per finished shard."""

    def __init__(self, state: Path, prefix: str, fp: str):
        self.path = state / f"{prefix}-progress.jsonl"
        self.fp = fp

    def load(self, sink: LocalSink | PipeSink) -> list[dict[str, Any]]:
        """The records of finished shards still valid (same fingerprint, files in place), in order."""
        if not self.path.is_file():
            return []
        lines = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]
        if not lines or lines[0].get("fingerprint") != self.fp:
            raise BuildError(f"{self.path} records a build of other inputs or options: pass --overwrite to "
                             f"replace it, or use another --out / --prefix")
        records = []
        for rec in lines[1:]:
            if rec["shard"] is not None and not sink.has(rec["shard"], rec["bytes"]):
                log.warning("%s is missing or changed: rebuilding from input %d", rec["shard"], rec["first"])
                break
            records.append(rec)
        self._rewrite(records)
        return records

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".partial")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [{"fingerprint": self.fp}, *records]))
        os.replace(tmp, self.path)

    def start(self) -> None:
        self._rewrite([])

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------
# The build


def load_inputs(manifest: str | None = None, folder: str | None = None, root: str | None = None,
                exclude: list[str] | None = None) -> list[Input]:
    """The inputs of a manifest or of a folder tree (``exclude``: folders to leave out, e.g. the output)."""
    if (manifest is None) == (folder is None):
        raise BuildError("give exactly one of a manifest and a folder")
    if manifest is not None:
        return read_manifest(manifest, root)
    return scan_folder(folder, exclude or [])


def _outcomes(items: list[Input], opts: EncodeOptions, workers: int) -> Iterator[Outcome]:
    """Outcomes in input order; ``workers`` processes encode ahead (at most 4 inputs each)."""
    if workers <= 1:
        for item in items:
            yield process(item, opts)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        ahead: deque[Future | Input] = deque()
        todo = iter(items)

        def submit() -> None:
            item = next(todo, None)
            if item is not None:  # inputs rejected while planning need no worker
                ahead.append(item if item.rejection is not None else pool.submit(process, item, opts))

        for _ in range(4 * workers):
            submit()
        try:
            while ahead:
                head = ahead.popleft()
                submit()
                yield head.result() if isinstance(head, Future) else process(head, opts)
        finally:
            for f in ahead:
                if isinstance(f, Future):
                    f.cancel()


def _prepare_out(sink: LocalSink | PipeSink, shard: ShardOptions, overwrite: bool, progress: _Progress) -> None:
    """Refuse to mix with shards of another build; with ``overwrite``, remove this prefix's old files."""
    if not isinstance(sink, LocalSink):
        if overwrite:
            progress.path.unlink(missing_ok=True)
        return
    ours = re.compile(re.escape(shard.prefix) + r"-\d{%d}\.tar(\.partial)?$" % _SHARD_DIGITS)
    old = [p for p in sink.root.iterdir() if ours.match(p.name)]
    if overwrite:
        for p in old:
            p.unlink()
        progress.path.unlink(missing_ok=True)
    elif old and not progress.path.is_file():
        raise BuildError(f"{sink.root} already holds {shard.prefix}-*.tar shards of another build: pass "
                         f"--overwrite to replace them, or use another --out / --prefix")


def _write_sizes(sink: LocalSink | PipeSink, sizes: dict[str, int], prefix: str) -> None:
    """``sizes.json``: a local one keeps the entries of other prefixes whose shards still exist."""
    if isinstance(sink, LocalSink):
        path = sink.root / "sizes.json"
        ours = re.compile(re.escape(prefix) + r"-\d{%d}\.tar$" % _SHARD_DIGITS)
        old = json.loads(path.read_text()) if path.is_file() else {}
        sizes = {**{k: v for k, v in old.items() if not ours.match(k) and (sink.root / k).is_file()}, **sizes}
    sink.write_bytes("sizes.json", (json.dumps(dict(sorted(sizes.items())), indent=1) + "\n").encode())


def _report(records: list[dict[str, Any]], n_inputs: int, shard: ShardOptions, opts: EncodeOptions,
            run: dict[str, Any], sink: LocalSink | PipeSink) -> dict[str, Any]:
    shards = {r["shard"]: r["samples"] for r in records if r["shard"]}
    rejections = [x for r in records for x in r["rejected"]]
    modalities, seconds = Counter(), Counter()
    for r in records:
        modalities.update(r["modalities"])
        seconds.update(r["seconds"])
    accepted = sum(r["accepted"] for r in records)
    return {
        "inputs": n_inputs,
        "accepted": accepted,
        "rejected": len(rejections),
        "samples": sum(shards.values()),
        "shards": shards,
        "pattern": shard.pattern(len(shards)) if shards else None,
        "location": sink.describe(shard.pattern(len(shards))) if shards else None,
        "bytes": sum(r["bytes"] for r in records),
        "modalities": dict(modalities),
        "hours": {k: round(v / 3600, 4) for k, v in seconds.items()},
        "by_reason": dict(Counter(x["reason"] for x in rejections).most_common()),
        "rejections": rejections,
        "warnings": [x for r in records for x in r["warnings"]],
        # Inputs kept although FFmpeg logged decode errors for them (within --max-loss, or --lenient).
        "warned": len({x["input"] for r in records for x in r["warnings"]}),
        "run": run,
        "options": {**dataclasses.asdict(opts), **dataclasses.asdict(shard)},
    }


def build_shards(items: list[Input], out: str, *, workers: int = 1, options: EncodeOptions | None = None,
                 shard: ShardOptions | None = None, state: str | None = None, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Encode ``items`` into shards at ``out`` (a folder, or ``pipe:COMMAND`` with ``{name}``) and return
    the report, also written as ``{prefix}-report.json`` beside the shards (and in ``state``).

    ``state`` is the local folder of the progress file (default: ``out``; required for a ``pipe:`` output).
    A re-run with the same inputs and options resumes after the shards already finished.
    """
    opts, shard = options or EncodeOptions(), shard or ShardOptions()
    for o in (opts, shard):
        try:
            o.validate()
        except ValueError as e:
            raise BuildError(str(e)) from None
    if workers < 1:
        raise BuildError(f"workers must be >= 1, got {workers}")
    if not items:
        raise BuildError("no inputs")
    sink = open_sink(out)
    if state is None and isinstance(sink, PipeSink):
        raise BuildError("a pipe: output needs --state DIR, the local folder that records finished shards")
    state_dir = Path(state) if state is not None else Path(out)
    state_dir.mkdir(parents=True, exist_ok=True)
    tracker = _Progress(state_dir, shard.prefix, fingerprint(items, opts, shard))
    _prepare_out(sink, shard, overwrite, tracker)
    records = tracker.load(sink)
    if not records:
        tracker.start()
    resumed = len(records)
    start_at = records[-1]["end"] if records else 0
    index = sum(1 for r in records if r["shard"])
    t0 = time.perf_counter()
    written = 0
    current = _Shard(first=start_at)
    bar = tqdm(total=len(items), initial=start_at, unit="input", disable=not progress, dynamic_ncols=True,
               desc=f"building {shard.prefix}")

    def close(end: int) -> None:
        nonlocal index
        if current.writer is not None:
            current.writer.close()
            sink.commit(current.name, current.stream)
            size = sink.size(current.name)
            index += 1
        elif current.rejected or end > current.first:
            size = 0
        else:
            return
        rec = current.record(end, size)
        tracker.append(rec)
        records.append(rec)

    try:
        for outcome in _outcomes(items[start_at:], opts, workers):
            bar.update(1)
            if outcome.rejection is not None:
                current.rejected.append({"input": outcome.index, "key": outcome.key, "source": outcome.source,
                                         "reason": outcome.rejection.reason, "detail": outcome.rejection.detail})
                continue
            size = sum(_tar_bytes(s) for s in outcome.samples)
            if current.samples and (current.bytes + size > shard.shard_size or (
                    shard.shard_samples and current.samples + len(outcome.samples) > shard.shard_samples)):
                close(outcome.index)
                current = _Shard(first=outcome.index)
            if current.writer is None:
                current.name = shard.name(index)
                current.stream = sink.open(current.name)
                current.writer = tarfile.open(fileobj=current.stream, mode="w|", format=tarfile.PAX_FORMAT)
            current.add(outcome)
            written += len(outcome.samples)
            bar.set_postfix(samples=sum(r["samples"] for r in records) + current.samples,
                            rejected=sum(len(r["rejected"]) for r in records) + len(current.rejected))
        close(len(items))
    except BaseException:
        if current.stream is not None and not current.stream.closed:
            sink.abort(current.name, current.stream)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    processed = len(items) - start_at
    run = {"seconds": round(seconds, 3), "workers": workers, "resumed_shards": resumed, "inputs": processed,
           "samples": written, "inputs_per_s": round(processed / seconds, 3) if seconds else None,
           "samples_per_s": round(written / seconds, 3) if seconds else None}
    report = _report(records, len(items), shard, opts, run, sink)
    _write_sizes(sink, report["shards"], shard.prefix)
    text = (json.dumps(report, indent=1) + "\n").encode("ascii")
    sink.write_bytes(f"{shard.prefix}-report.json", text)
    if isinstance(sink, PipeSink):
        (state_dir / f"{shard.prefix}-report.json").write_bytes(text)
    return report
