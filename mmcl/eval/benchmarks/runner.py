"""A benchmark from its local copy to its reports: check the model has the modalities, read the copy's
layout into the clips of a protocol (:class:`~mmcl.eval.benchmarks.base.Manifest`), build them into shards
once with ``data_tools`` (cached beside the copy, or under ``cache_dir``), and run the tasks through the eval
suite (:func:`mmcl.eval.suite.run_suite`). ``run_standard`` does it for every benchmark given a path and
writes one table across them and the model card's ``model-index``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from mmcl.data.window import WindowConfig
from mmcl.errors import ConfigError, DataError, EvalError
from mmcl.eval.benchmarks.base import Benchmark, Manifest, get_benchmark
from mmcl.eval.input_cache import DEFAULT_MAX_GB
from mmcl.eval.suite import SuiteConfig, TaskConfig, run_suite, task_file_stem

log = logging.getLogger(__name__)

#: Clips per shard of a built benchmark: enough shards for several loader workers (the loader splits shards,
#: not samples, between them).
SHARD_CLIPS = 256

#: The cross-benchmark table's metric columns: (header, metric key).
TABLE_COLUMNS = [("acc@1", "acc1"), ("acc@5", "acc5"), ("mean per-class recall", "mean_per_class_recall"),
                 ("mAP", "mAP"), ("R@1", "R@1"), ("R@5", "R@5"), ("R@10", "R@10"), ("median rank", "median_rank"),
                 ("mAP@10", "mAP@10")]


def modality_names(model) -> dict[str, str]:
    """``{kind: the model's modality of that kind}`` (the first of each kind; ``text``: one that tokenizes)."""
    out: dict[str, str] = {}
    for name, proc in model.processors.items():
        kind = getattr(proc, "kind", name)
        if kind == "text" and not hasattr(proc, "tokenize"):
            continue
        out.setdefault(kind, name)
    return out


def _task_kinds(task: dict[str, Any]) -> list[str]:
    return list(task["query"]) + list(task.get("candidates", [])) + ["text"]


def check_model(bench: Benchmark, model) -> dict[str, str]:
    """The model's modality for each kind the benchmark's required tasks use; the one line otherwise."""
    mods = modality_names(model)
    for task in bench.tasks:
        lacking = [k for k in _task_kinds(task) if k not in mods]
        if lacking and not task.get("optional"):
            raise EvalError(f"{bench.name}: the model has no {lacking[0]} modality (has: "
                            f"{', '.join(model.processors)}); {bench.title} needs "
                            f"{' and '.join(dict.fromkeys(_task_kinds(task)))}")
    return mods


def benchmark_window(model, seconds: float | None = None, eval_clips: int | None = None) -> tuple[WindowConfig | None, str]:
    """The time window a benchmark reads its clips in, and where it comes from: ``seconds`` (``--clip-seconds``;
    0: whole clips), else the window the model was trained with (``model.data_clip``, saved with it), else
    the centred ``seconds`` of the model's audio modality, else whole clips (None). ``eval_clips``
    (``--eval-clips``) K evenly spaced windows, their embeddings averaged, replaces the source's own."""
    if seconds is not None and not (seconds >= 0 and math.isfinite(seconds)):
        raise ConfigError(f"--clip-seconds: must be >= 0 (0: whole clips), got {seconds:g}")
    if eval_clips is not None and eval_clips < 1:
        raise ConfigError(f"--eval-clips: must be >= 1, got {eval_clips}")
    audio = next((p for p in model.processors.values() if getattr(p, "kind", "") == "audio"), None)
    if seconds:
        clip, source = WindowConfig(seconds=float(seconds)), "--clip-seconds"
    elif seconds is None and getattr(model, "data_clip", None) is not None:
        clip, source = dataclasses.replace(model.data_clip), "the model's data.clip"
    elif seconds is None and audio is not None:
        clip, source = WindowConfig(seconds=float(audio.cfg.seconds)), f"{audio.name}.seconds"
    else:
        if (eval_clips or 1) > 1:
            raise ConfigError(f"--eval-clips: {eval_clips} windows need a window length (give --clip-seconds S > 0; "
                              f"the model records none and has no audio modality)")
        return None, "whole clips"
    if eval_clips is not None:
        clip.eval_clips = eval_clips
    for proc in model.processors.values():
        try:
            proc.check_window(clip.seconds, "window")
        except ConfigError as e:
            raise ConfigError(str(e).replace("window.seconds: ", "--clip-seconds ")) from None
    return clip, source


def window_info(clip: WindowConfig | None, source: str) -> dict[str, Any]:
    """The window of a benchmark's results: ``{"seconds": S | None (whole clips), "eval_clips": K, "source"}``."""
    return {"seconds": clip.seconds if clip else None, "eval_clips": clip.eval_clips if clip else 1, "source": source}


def window_text(window: dict[str, Any]) -> str:
    """``3 s`` / ``3 s x 4`` (K windows averaged) / ``whole``: the table's window column."""
    if window["seconds"] is None:
        return "whole"
    return f"{window['seconds']:g} s" + (f" x {window['eval_clips']}" if window["eval_clips"] > 1 else "")


def default_cache(root: Path) -> Path:
    """The cache beside a copy: ``<copy>.mmcl-cache`` next to its folder."""
    root = Path(root).resolve()
    return root.parent / f"{root.name}.mmcl-cache"


def runnable_tasks(bench: Benchmark, manifest: Manifest, mods: dict[str, str]) -> list[dict[str, Any]]:
    """The benchmark's tasks (its data file's entries) that run: optional ones only where the model has
    their modalities and, for video, the copy's clips are videos."""
    has_video = any(c.is_video for c in manifest.clips)
    return [t for t in bench.tasks if all(k in mods for k in _task_kinds(t))
            and not ("video" in _task_kinds(t) and not has_video)]


def _shard_dir(cache: Path, bench: Benchmark, manifest: Manifest, options: Any, video: bool) -> Path:
    h = hashlib.sha256(json.dumps([dataclasses.asdict(options), video, SHARD_CLIPS], sort_keys=True).encode())
    for c in manifest.clips:
        st = Path(c.path).stat()
        h.update(json.dumps([c.key, c.path, st.st_size, st.st_mtime_ns, c.label, c.captions]).encode())
    return cache / "shards" / f"{bench.name}-{manifest.protocol}-{h.hexdigest()[:16]}"


def build_benchmark_shards(bench: Benchmark, manifest: Manifest, cache: Path, workers: int = 1,
                           progress: bool = True, options: Any = None, video: bool = True) -> tuple[str, dict[str, Any]]:
    """The manifest's clips as shards under ``cache/shards/`` (built once: a re-run with the same clips and
    options reuses them). Each clip is one sample (no windowing); labels under ``json["labels"]["label"]``,
    captions under ``json["extra"]["captions"]``. ``video=False`` (no task reads video): a video clip gives
    only its audio track. Returns (shard spec, build report)."""
    from data_tools.build import ShardOptions, build_shards
    from data_tools.media import EncodeOptions
    from data_tools.sources import Input, sanitize_key

    options = options or EncodeOptions(window=0.0)
    out = _shard_dir(cache, bench, manifest, options, video)
    done = out / f"{ShardOptions().prefix}-report.json"  # written last, by a finished build of this folder's inputs
    if done.is_file():
        report = json.loads(done.read_text())
        if report["shards"]:
            return report["location"], report
    items, seen = [], set()
    for i, c in enumerate(manifest.clips):
        key = sanitize_key(c.key)
        while key in seen:  # two names that sanitise alike
            key = f"{key}_{i}"
        seen.add(key)
        kind = "video" if c.is_video and video else "audio"
        item = Input(index=i, key=key, source=c.path, **{kind: c.path})
        if c.label is not None:
            item.labels = {"label": c.label}
        if c.captions:
            item.extra = {"captions": c.captions}
        items.append(item)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write the shard cache {out} ({e.strerror}); give --cache DIR") from None
    report = build_shards(items, str(out), workers=max(1, workers), options=options,
                          shard=ShardOptions(shard_samples=SHARD_CLIPS), progress=progress)
    if not report["shards"]:
        raise DataError(f"{bench.name}: none of the {len(items)} clips could be read (see {out}/shard-report.json)")
    return report["location"], report


def benchmark_suite(bench: Benchmark, manifest: Manifest, mods: dict[str, str], spec: str,
                    report: dict[str, Any], batch_size: int, clip: WindowConfig | None = None) -> SuiteConfig:
    """The eval-suite tasks of a benchmark on its built shards (:func:`runnable_tasks`)."""
    tasks = []
    for t in runnable_tasks(bench, manifest, mods):
        common = dict(name=f"{bench.name} {t['name']}", type=t["type"], query=[mods[k] for k in t["query"]],
                      data=spec, dataset=bench.name, text=mods["text"], report=report)
        if t["type"] == "retrieval":
            task = TaskConfig(**common, candidates=[mods[k] for k in t["candidates"]], captions="extra.captions",
                              map_k=int(t.get("map_k", 0)))
        else:
            task = TaskConfig(**common, label="label", classnames=list(manifest.classnames),
                              templates=list(t.get("templates", bench.spec["templates"])),
                              multilabel=bool(t.get("multilabel", False)), require_every_class=False)
        task.validate(f"{bench.name}.tasks[{t['name']}]")
        tasks.append(task)
    return SuiteConfig(tasks=tasks, batch_size=batch_size, clip=clip)


def read_copy(bench: Benchmark, root: str | Path, protocol: str | None) -> Manifest:
    """The clips of the protocol in the copy; an empty result is the one line naming what was looked for."""
    protocol = bench.protocol(protocol)
    manifest = bench.read(Path(root).expanduser(), protocol)
    if not manifest.clips:
        example = f" (looked for e.g. {manifest.missing[0]})" if manifest.missing else ""
        raise DataError(f"{root}: none of the {manifest.listed} clips of {bench.name} protocol {protocol} is in "
                        f"the copy{example}; expected {bench.layout}")
    return manifest


def run_benchmark(model, name: str, root: str | Path, out_dir: str | Path, *, protocol: str | None = None,
                  cache_dir: str | Path | None = None, model_name: str = "", workers: int = 0,
                  batch_size: int = 64, cache_embeddings: bool = True, progress: bool = True,
                  options: Any = None, manifest: Manifest | None = None, clip_seconds: float | None = None,
                  eval_clips: int | None = None, input_cache_gb: float = DEFAULT_MAX_GB,
                  build_workers: int | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on benchmark ``name`` from its copy at ``root`` and write the reports to ``out_dir``
    (``results.json``, one CLIP_benchmark-style JSON per task with ``language``, ``protocol``, ``window``, ``n``
    clips listed, ``missing`` and ``rejected`` counts, ``summary.md``, ``missing.txt``).

    The clips are read in the time window of :func:`benchmark_window` (``clip_seconds``, ``eval_clips``); the
    shards keep whole clips, so one build serves every window; ``build_workers`` ffmpeg processes build them
    (default: ``workers``, at least 1). The decoded model inputs are kept in the cache
    too, up to ``input_cache_gb`` (0: off), keyed by the processing and the window, not the weights
    (:mod:`mmcl.eval.input_cache`); ``cache_embeddings``: the embeddings, keyed by the weights.

    Returns ``run_suite``'s results plus ``"benchmark": {name, protocol, window, n, missing, rejected, shards}``.
    """
    bench = get_benchmark(name)
    mods = check_model(bench, model)
    clip, source = benchmark_window(model, clip_seconds, eval_clips)
    manifest = manifest or read_copy(bench, root, protocol)
    cache = Path(cache_dir) if cache_dir is not None else default_cache(Path(root))
    video = any("video" in _task_kinds(t) for t in runnable_tasks(bench, manifest, mods))
    build_workers = workers if build_workers is None else build_workers
    spec, build = build_benchmark_shards(bench, manifest, cache, workers=max(1, build_workers), progress=progress,
                                         options=options, video=video)
    info = {"benchmark": bench.name, "language": bench.spec.get("language", "en"), "protocol": manifest.protocol,
            "protocol_description": bench.protocols[manifest.protocol]["description"],
            "window": window_info(clip, source), "n": manifest.listed, "missing": len(manifest.missing),
            "rejected": build["rejected"]}
    suite = benchmark_suite(bench, manifest, mods, spec, info, batch_size, clip)
    out = Path(out_dir)
    results = run_suite(model, suite, out_dir=out, model_name=model_name, workers=workers, cache=cache_embeddings,
                        cache_dir=cache, progress=progress, input_cache_gb=input_cache_gb)
    lines = [f"{m}\tmissing" for m in manifest.missing]
    lines += [f"{r['source']}\t{r['reason']}: {r['detail']}" for r in build["rejections"]]
    (out / "missing.txt").write_text("".join(f"{ln}\n" for ln in lines))
    with open(out / "summary.md", "a") as f:
        f.write(f"\n{bench.title}, protocol {manifest.protocol}, window {window_text(info['window'])} ({source})\n")
    results["benchmark"] = {**info, "shards": spec, "tasks": {t.name: task_file_stem(t) for t in suite.tasks}}
    if manifest.missing or build["rejected"]:
        log.warning("%s: %d of %d listed clips missing from the copy, %d unreadable (see %s)", bench.name,
                    len(manifest.missing), manifest.listed, build["rejected"], out / "missing.txt")
    return results


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.3f}"
    return "—" if v is None else str(v)


def standard_table(runs: dict[str, dict[str, Any]]) -> str:
    """One markdown table across benchmarks: a row per task, the metrics the field reports ("—" where a
    metric does not apply), the protocol, the window (:func:`window_text`), the queries scored and the clips
    missing from the copy."""
    head = ["benchmark", "protocol", "window", "task", *(h for h, _ in TABLE_COLUMNS), "n", "missing"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, results in runs.items():
        info = results["benchmark"]
        for kind in ("zeroshot_classification", "retrieval"):
            for task, m in results.get(kind, {}).items():
                cells = [name, info["protocol"], window_text(info["window"]), task.removeprefix(f"{name} "),
                         *(_cell(m.get(k)) for _, k in TABLE_COLUMNS), str(m["n"]),
                         f"{info['missing']} of {info['n']}"]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_standard(model, data: dict[str, str], out_dir: str | Path, *, protocols: dict[str, str] | None = None,
                 cache_dir: str | Path | None = None, model_name: str = "",
                 manifests: dict[str, Manifest] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Every benchmark of ``data`` (``{name: copy path}``) into ``out_dir/<name>/``; then ``out_dir/summary.md``
    (:func:`standard_table`), ``out_dir/results.json`` (``{name: results}``) and ``out_dir/model-index.yaml``
    (the model card's metadata, :func:`mmcl.hub.model_index`). Every model and layout check runs before
    anything is built or encoded (``manifests``: copies already read, by name)."""
    from mmcl.hub import model_index, read_eval_dir

    if not data:
        raise EvalError("--suite standard: give each benchmark's copy as --data NAME=PATH")
    protocols = protocols or {}
    unknown = sorted(set(protocols) - set(data))
    if unknown:
        raise EvalError(f"--protocol {unknown[0]}=...: no --data {unknown[0]}=PATH is given")
    benches = {name: get_benchmark(name) for name in data}
    for bench in benches.values():
        check_model(bench, model)
    manifests = {name: (manifests or {}).get(name) or read_copy(bench, data[name], protocols.get(name))
                 for name, bench in benches.items()}
    out = Path(out_dir)
    runs, records = {}, []
    for name in data:
        sub = None if cache_dir is None else Path(cache_dir)
        runs[name] = run_benchmark(model, name, data[name], out / name, cache_dir=sub, model_name=model_name,
                                   manifest=manifests[name], **kwargs)
        records += read_eval_dir(out / name)
    (out / "results.json").write_text(json.dumps(runs, indent=2))
    (out / "summary.md").write_text(standard_table(runs) + "\n")
    (out / "model-index.yaml").write_text(yaml.safe_dump({"model-index": model_index(model_name or "model", records)},
                                                         sort_keys=False))
    return runs
