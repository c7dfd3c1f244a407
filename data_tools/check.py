"""``mmcl shards inspect`` (what is in the shards, read without decoding media) and ``mmcl shards
validate`` (every sample through the loader's own per-sample rules, :class:`mmcl.data.shards.SampleDecoder`,
with the training modalities; bad ones listed by reason).

Both read any shard spec the loader reads (brace lists, ``pipe:`` URLs) with the loader's tar reader
(:func:`mmcl.data.shards.read_samples`), so a truncated or corrupt tar is reported where it breaks instead of
ending the run, and a sample the loader would never see (a duplicated member, the one a break cut) is
reported, not read.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import statistics
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmcl.config import CONFIG_DIR, ConfigError
from mmcl.data.shards import SampleDecoder, declared_sizes, expand_shards, one_thread, read_samples

#: Members by the modality they carry (as the training modalities read them).
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg", "m4a")
TEXT_EXTS = ("txt", "text", "caption")


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
    declared = declared_sizes(urls)
    members, member_bytes, modalities = Counter(), Counter(), Counter()
    durations: list[float] = []
    caption_chars: list[float] = []
    counts = Counter({url: 0 for url in urls})
    problems: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    licenses = Counter()
    for url in urls:
        def report(reason: str, detail: str, key: str | None, url: str = url) -> None:
            problems.append({"shard": url, "key": key, "reason": reason, "detail": detail})
            counts[url] += key is not None  # a sample the reader drops (a duplicated member) is still there

        for sample in read_samples(url, report):
            counts[url] += 1
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
    mismatched = {u: {"declared": declared[u], "found": counts[u]} for u in urls
                  if declared[u] is not None and declared[u] != counts[u]}
    return {
        "shards": len(urls),
        "samples": sum(counts.values()),
        "bytes": sum(member_bytes.values()),
        "per_shard": dict(counts),
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
        lines.append(f"PROBLEM {p['shard']} {p['key'] or '(shard)'}: {p['reason']}: {p['detail']}")
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


_DECODERS: dict[str, SampleDecoder] = {}


def _decoder(specs: dict[str, dict[str, Any]], on_missing: Literal["skip", "mask"]) -> SampleDecoder:
    """The loader's per-sample rules over the training modalities of ``specs``, built once per process."""
    key = json.dumps([specs, on_missing], sort_keys=True)
    if key not in _DECODERS:
        from mmcl.modalities import build_processor

        _DECODERS.clear()
        processors = {name: build_processor(name, spec) for name, spec in specs.items()}
        _DECODERS[key] = SampleDecoder(processors, on_missing, with_meta=True)
    return _DECODERS[key]


def _validate_shard(url: str, specs: dict[str, dict[str, Any]], on_missing: Literal["skip", "mask"]) -> _ShardCheck:
    from mmcl.modalities import SampleError

    check = _ShardCheck(url)
    decoder = _decoder(specs, on_missing)

    def bad(reason: str, detail: str, key: str | None) -> None:
        check.bad.append({"shard": url, "key": key, "reason": reason, "detail": " ".join(detail.split())[:300]})

    def dropped(reason: str, detail: str, key: str | None) -> None:
        bad(reason, detail, key)
        if key is not None:  # a sample the reader drops (a duplicated member) is still one of the shard's
            check.samples += 1
            check.keys.append(key)

    with one_thread():
        for sample in read_samples(url, dropped):
            check.samples += 1
            check.keys.append(sample["__key__"])
            try:
                decoder.transform(*decoder.decode(sample), train=False)
            except SampleError as e:
                bad(e.reason, e.detail, sample["__key__"])
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


def validate_shards(spec: str, model: str = "tiny", tokenizer: str | None = None, workers: int = 0,
                    on_missing: Literal["skip", "mask"] = "skip") -> dict[str, Any]:
    """Read every sample of ``spec`` as the loader does (its tar reader, then :class:`SampleDecoder` with
    the modalities of ``model``, ``on_missing`` as ``data.on_missing``, and the ``json`` parsed as eval reads
    it); report the bad ones by reason, named as the loader counts them in ``data.skipped``. Also checks
    keys are unique across the shards and counts match ``sizes.json``."""
    urls = expand_shards(spec)
    specs = {name: dict(s) for name, s in model_modality_specs(model).items()}
    with tempfile.TemporaryDirectory(prefix="mmcl-validate-") as tmp:
        for name, s in specs.items():
            # A transformers text tower (type hf) brings its own tokenizer; the others read a sentencepiece file.
            if s.get("kind", name) == "text" and (s.get("tower") or {}).get("type", "bert") != "hf":
                s["tokenizer"] = _tokenizer(urls, tokenizer, Path(tmp))
        if workers > 1 and len(urls) > 1:
            with ProcessPoolExecutor(min(workers, len(urls)), mp_context=multiprocessing.get_context("spawn")) as pool:
                checks = list(pool.map(_validate_shard, urls, [specs] * len(urls), [on_missing] * len(urls)))
        else:
            checks = [_validate_shard(url, specs, on_missing) for url in urls]
    declared = declared_sizes(urls)
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
            "by_reason": dict(Counter(b["reason"] for b in bad).most_common()), "model": model,
            "on_missing": on_missing}


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
