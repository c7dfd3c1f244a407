"""``mmcl shards inspect`` (what is in the shards, read without decoding media) and ``mmcl shards
validate`` (every sample decoded and transformed by the training modalities; bad ones listed by reason).

Both read any shard spec the loader reads (brace lists, ``pipe:`` URLs) with the standard library's
streaming tar reader, so a truncated or corrupt tar is reported where it breaks instead of ending the run.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import statistics
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
import yaml

from mmcl.config import CONFIG_DIR, ConfigError
from mmcl.data.shards import expand_shards

#: Members by the modality they carry (as the training modalities read them).
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg", "m4a")
TEXT_EXTS = ("txt", "text", "caption")


class ShardError(Exception):
    """A shard stops being readable (``reason``: ``unreadable_shard`` or ``corrupt_tar``)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard: ``{"__key__", "__url__", ext: bytes, ...}``, members grouped by key in tar
    order; a sample holding one extension twice has ``"__duplicate__": ext``. Raises :class:`ShardError`
    when the shard cannot be opened or breaks (the sample it interrupted is not yielded)."""
    try:
        stream = wds.gopen(url)
    except Exception as e:
        raise ShardError("unreadable_shard", f"{type(e).__name__}: {e}") from None
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                prefix, ext = wds.tariterators.base_plus_ext(member.name)
                if prefix is None:
                    continue
                data = tar.extractfile(member).read()
                if current is None or prefix != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": prefix, "__url__": url}
                ext = ext.lower()
                if ext in current:
                    current["__duplicate__"] = ext
                current[ext] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError("corrupt_tar", f"{type(e).__name__}: {e}") from None
    finally:
        with contextlib.suppress(Exception):
            stream.close()
    if current is not None:
        yield current


def _declared_sizes(urls: list[str]) -> dict[str, int | None]:
    """``{url: count in the sizes.json beside it}`` (None where there is none)."""
    out: dict[str, int | None] = {}
    cache: dict[Path, dict[str, int]] = {}
    for url in urls:
        p = Path(url)
        if url.startswith("pipe:") or "://" in url:
            out[url] = None
            continue
        sizes = p.parent / "sizes.json"
        if sizes not in cache:
            try:
                cache[sizes] = json.loads(sizes.read_text()) if sizes.is_file() else {}
            except ValueError:
                cache[sizes] = {}
        out[url] = cache[sizes].get(p.name)
    return out


def _has_audio_track(data: bytes) -> bool:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            return bool(container.streams.audio)
    except Exception:
        return False


def _meta(sample: dict[str, Any]) -> dict[str, Any] | None:
    try:
        meta = json.loads(sample["json"]) if "json" in sample else None
    except (ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "total": round(sum(values), 3), "min": round(min(values), 3),
            "mean": round(statistics.fmean(values), 3), "max": round(max(values), 3)}


def inspect_shards(spec: str, n_samples: int = 3) -> dict[str, Any]:
    """Counts, member sizes, modality presence, durations, caption lengths, ``sizes.json`` agreement and the
    first ``n_samples`` samples of the shards of ``spec`` (media are not decoded)."""
    urls = expand_shards(spec)
    declared = _declared_sizes(urls)
    members, member_bytes, modalities = Counter(), Counter(), Counter()
    durations: list[float] = []
    caption_chars: list[float] = []
    counts: dict[str, int] = {}
    problems: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    licenses = Counter()
    for url in urls:
        n = 0
        try:
            for sample in shard_samples(url):
                n += 1
                exts = [k for k in sample if not k.startswith("__")]
                members.update(exts)
                member_bytes.update({k: len(sample[k]) for k in exts})
                video = next((e for e in VIDEO_EXTS if e in sample), None)
                audio = next((e for e in AUDIO_EXTS if e in sample), None)
                text = next((e for e in TEXT_EXTS if e in sample), None)
                modalities["video"] += video is not None
                if audio is not None:
                    modalities["audio"] += 1
                elif video is not None and _has_audio_track(sample[video]):
                    modalities["audio"] += 1
                    modalities["audio_in_video"] += 1
                modalities["text"] += text is not None
                meta = _meta(sample)
                if meta is not None and isinstance(meta.get("duration"), (int, float)):
                    durations.append(float(meta["duration"]))
                if meta is not None and meta.get("license") is not None:
                    licenses[str(meta["license"])] += 1
                caption = sample[text].decode("utf-8", errors="replace") if text else None
                if caption is not None:
                    caption_chars.append(len(caption))
                if len(examples) < n_samples:
                    examples.append({"key": sample["__key__"], "shard": url,
                                     "members": {k: len(sample[k]) for k in exts},
                                     "text": caption[:200] if caption is not None else None, "meta": meta})
        except ShardError as e:
            problems.append({"shard": url, "reason": e.reason, "detail": e.detail})
        counts[url] = n
    mismatched = {u: {"declared": declared[u], "found": counts[u]} for u in urls
                  if declared[u] is not None and declared[u] != counts[u]}
    return {
        "shards": len(urls),
        "samples": sum(counts.values()),
        "bytes": sum(member_bytes.values()),
        "per_shard": counts,
        "sizes_json": {"listed": sum(d is not None for d in declared.values()), "mismatched": mismatched},
        "modalities": dict(modalities),
        "members": dict(members),
        "member_bytes": dict(member_bytes),
        "durations": _stats(durations),
        "caption_chars": _stats(caption_chars),
        "licenses": dict(licenses.most_common(10)),
        "problems": problems,
        "examples": examples,
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def format_inspection(info: dict[str, Any]) -> str:
    """The human-readable summary of :func:`inspect_shards`."""
    n = info["samples"]
    lines = [f"{info['shards']} shard(s), {n} samples, {_human_bytes(info['bytes'])}"]
    sj = info["sizes_json"]
    if sj["listed"]:
        state = "agrees" if not sj["mismatched"] else f"{len(sj['mismatched'])} shard(s) differ: {sj['mismatched']}"
        lines.append(f"sizes.json: {state}")
    mods = info["modalities"]
    parts = []
    for m in ("video", "audio", "text"):
        c = mods.get(m, 0)
        extra = f", {mods['audio_in_video']} in the video" if m == "audio" and mods.get("audio_in_video") else ""
        parts.append(f"{m} {c} ({100 * c / n if n else 0:.1f}%{extra})")
    lines.append("modalities: " + ", ".join(parts))
    d = info["durations"]
    if d:
        lines.append(f"durations: {d['total'] / 3600:.3f} h over {d['n']} samples; min {d['min']:g} s, "
                     f"mean {d['mean']:g} s, max {d['max']:g} s")
    c = info["caption_chars"]
    if c:
        lines.append(f"captions: {c['n']}, mean {c['mean']:g} characters, max {c['max']:g}")
    lines.append("members: " + ", ".join(f"{k} {v} ({_human_bytes(info['member_bytes'][k])})"
                                         for k, v in sorted(info["members"].items())))
    if info["licenses"]:
        lines.append("licenses: " + ", ".join(f"{k} ({v})" for k, v in info["licenses"].items()))
    for p in info["problems"]:
        lines.append(f"PROBLEM {p['shard']}: {p['reason']}: {p['detail']}")
    if info["examples"]:
        lines.append("samples:")
    for ex in info["examples"]:
        members = ", ".join(f"{k} {_human_bytes(v)}" for k, v in ex["members"].items())
        lines.append(f"  {ex['key']}  [{members}]")
        if ex["text"] is not None:
            lines.append(f"    text: {ex['text']!r}")
        if ex["meta"] is not None:
            lines.append(f"    json: {json.dumps(ex['meta'])[:300]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# validate


def model_modality_specs(model: str) -> dict[str, dict[str, Any]]:
    """``modalities`` of a model config: a name under ``configs/models`` or a YAML file."""
    path = Path(model)
    if not path.is_file():
        path = CONFIG_DIR / "models" / f"{model}.yaml"
    if not path.is_file():
        raise ConfigError(f"--model {model}: neither a YAML file nor a name under {CONFIG_DIR / 'models'}")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec.get("modalities"), dict):
        raise ConfigError(f"--model {path}: no modalities section")
    return spec["modalities"]


@dataclass
class _ShardCheck:
    url: str
    samples: int = 0
    keys: list[str] = field(default_factory=list)
    bad: list[dict[str, Any]] = field(default_factory=list)


_MODALITIES: dict[str, Any] = {}


def _modalities(specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The training modalities of ``specs``, built once per process."""
    key = json.dumps(specs, sort_keys=True)
    if key not in _MODALITIES:
        from mmcl.modalities import build_processor

        _MODALITIES.clear()
        _MODALITIES[key] = {name: build_processor(name, spec) for name, spec in specs.items()}
    return _MODALITIES[key]


def _check_sample(sample: dict[str, Any], modalities: dict[str, Any]) -> tuple[str, str] | None:
    """``(reason, detail)`` why the training pipeline would skip ``sample``, or None when it is good."""
    from mmcl.modalities import MissingModality, SampleError

    if "__duplicate__" in sample:
        return "duplicate_member", f"{sample['__duplicate__']} twice"
    if "json" in sample and _meta(sample) is None:
        return "bad_json", "not a UTF-8 JSON object"
    present = 0
    for name, mod in modalities.items():
        try:
            tensor = mod.transform(mod.decode(sample), False)
        except MissingModality:
            continue
        except SampleError as e:
            return e.reason, e.detail
        except Exception as e:
            return f"error_{name}", f"{type(e).__name__}: {e}"
        if tuple(tensor.shape) != tuple(mod.empty().shape):
            return f"bad_shape_{name}", f"{list(tensor.shape)} != {list(mod.empty().shape)}"
        present += 1
    return None if present else ("no_modality", "none of: " + ", ".join(modalities))


def _validate_shard(url: str, specs: dict[str, dict[str, Any]]) -> _ShardCheck:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-sample tensors are tiny: extra threads only contend
    check = _ShardCheck(url)
    modalities = _modalities(specs)
    try:
        for sample in shard_samples(url):
            check.samples += 1
            check.keys.append(sample["__key__"])
            problem = _check_sample(sample, modalities)
            if problem is not None:
                check.bad.append({"shard": url, "key": sample["__key__"], "reason": problem[0],
                                  "detail": " ".join(str(problem[1]).split())[:300]})
    except ShardError as e:
        check.bad.append({"shard": url, "key": None, "reason": e.reason, "detail": e.detail})
    finally:
        torch.set_num_threads(threads)
    return check


def _tokenizer(urls: list[str], given: str | None, tmp: Path) -> str:
    """The tokenizer the text modality validates with: ``given``, else ``tokenizer.model`` beside the
    shards, else a throwaway one (any tokenizer exercises the text decoder's checks)."""
    if given is not None:
        if not Path(given).is_file():
            raise ConfigError(f"--tokenizer {given}: file not found")
        return given
    first = urls[0]
    if not (first.startswith("pipe:") or "://" in first):
        beside = Path(first).parent / "tokenizer.model"
        if beside.is_file():
            return str(beside)
    from mmcl.data.synthetic import train_tokenizer

    return str(train_tokenizer(["a small caption to train a tokenizer with"], tmp / "tokenizer.model"))


def validate_shards(spec: str, model: str = "tiny", tokenizer: str | None = None, workers: int = 0) -> dict[str, Any]:
    """Decode and transform every sample of ``spec`` with the training modalities of ``model``; report
    the bad ones by reason. Also checks keys are unique across the shards and counts match ``sizes.json``."""
    urls = expand_shards(spec)
    specs = {name: dict(s) for name, s in model_modality_specs(model).items()}
    with tempfile.TemporaryDirectory(prefix="mmcl-validate-") as tmp:
        for name, s in specs.items():
            # A transformers text tower (type hf) brings its own tokenizer; the others read a sentencepiece file.
            if s.get("kind", name) == "text" and (s.get("tower") or {}).get("type", "bert") != "hf":
                s["tokenizer"] = _tokenizer(urls, tokenizer, Path(tmp))
        if workers > 1 and len(urls) > 1:
            with ProcessPoolExecutor(min(workers, len(urls)), mp_context=multiprocessing.get_context("spawn")) as pool:
                checks = list(pool.map(_validate_shard, urls, [specs] * len(urls)))
        else:
            checks = [_validate_shard(url, specs) for url in urls]
    declared = _declared_sizes(urls)
    bad = [b for c in checks for b in c.bad]
    seen: dict[str, str] = {}
    for c in checks:
        for key in c.keys:
            if key in seen:
                bad.append({"shard": c.url, "key": key, "reason": "duplicate_key", "detail": f"also in {seen[key]}"})
            seen.setdefault(key, c.url)
        if declared[c.url] is not None and declared[c.url] != c.samples:
            bad.append({"shard": c.url, "key": None, "reason": "size_mismatch",
                        "detail": f"sizes.json says {declared[c.url]}, found {c.samples}"})
    samples = sum(c.samples for c in checks)
    bad_samples = len({(b["shard"], b["key"]) for b in bad if b["key"] is not None})
    return {"shards": len(urls), "samples": samples, "good": samples - bad_samples, "bad": bad,
            "by_reason": dict(Counter(b["reason"] for b in bad).most_common()), "model": model}


def format_validation(result: dict[str, Any], limit: int = 50) -> str:
    """The human-readable summary of :func:`validate_shards`."""
    lines = [f"{result['shards']} shard(s), {result['samples']} samples: {result['good']} good, "
             f"{len(result['bad'])} problem(s)"]
    for reason, n in result["by_reason"].items():
        lines.append(f"  {reason}: {n}")
    for b in result["bad"][:limit]:
        lines.append(f"BAD {b['shard']} {b['key'] or '(shard)'}: {b['reason']}: {b['detail']}")
    if len(result["bad"]) > limit:
        lines.append(f"... {len(result['bad']) - limit} more (--json lists all)")
    return "\n".join(lines)
