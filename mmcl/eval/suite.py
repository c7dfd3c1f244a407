"""Eval suites: a YAML list of tasks -> ``results.json`` (+ one JSON per task, CLIP_benchmark style, a
markdown summary and PNG plots). The same code runs during and at the end of training and from
``mmcl eval``.

Everything that can be checked without the model's forward pass is checked first — task types and
fields, modalities the model lacks, data that does not exist, samples without labels, classes without
samples, clips without captions — and fails with a one-line :class:`EvalError` before encoding starts.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from tqdm import tqdm

from mmcl.config import CONFIG_DIR, ConfigError, from_dict, to_dict
from mmcl.data.shards import build_loader, expand_shards
from mmcl.data.window import WindowConfig
from mmcl.eval.data import (
    EmbeddingCache,
    data_fingerprint,
    is_manifest,
    model_fingerprint,
    scan_metadata,
    shards_from_manifest,
)
from mmcl.eval.input_cache import InputCache, entry_key
from mmcl.eval.linear_probe import DEFAULT_WEIGHT_DECAYS, linear_probe
from mmcl.eval.metrics import confusion_matrix, recall_curve, true_ranks
from mmcl.eval.multilabel import multilabel_classification
from mmcl.eval.retrieval import retrieval
from mmcl.eval.zeroshot import encode_texts, model_device, zeroshot_classification
from mmcl.errors import DataError, EvalError

log = logging.getLogger(__name__)

TASK_TYPES = ("zeroshot_classification", "retrieval", "linear_probe")
#: Longest K of the recall@K curve.
CURVE_MAX_K = 50
#: ``classnames`` value that takes the class names from the evaluated data's labels.
FROM_LABELS = "from_labels"
#: Candidates listed per query in ``<type>_<task>_ranks.jsonl``.
RANKS_TOP_K = 5


@dataclass
class TaskConfig:
    name: str
    type: Literal["zeroshot_classification", "retrieval", "linear_probe"]
    #: Query modalities (several = a joint query, combined by the objective's scoring).
    query: list[str]
    #: Retrieval candidates (classification always scores against text prompts).
    candidates: list[str] = field(default_factory=lambda: ["text"])
    #: Shard spec, a manifest (``.csv`` / ``.tsv`` / ``.jsonl``, built into shards once), or "test" for the
    #: held-out split given with the suite run.
    data: str = "test"
    #: The dataset's name in reports and in the model card (default: the data's file names).
    dataset: str = ""
    #: Classification and linear probe: the key under ``json["labels"]`` holding the class name (dotted
    #: for nested keys).
    label: str = ""
    #: Class names, or a JSON file of them (a list, or ``file.json#key`` for a list under a key), or
    #: ``from_labels``: the sorted distinct labels of the evaluated data (a linear probe's: of ``train_data``,
    #: its default), each through ``classname_map``.
    classnames: list[str] | str = field(default_factory=list)
    #: Label -> class name (inline, or a JSON file of an object, ``file.json#key`` as ``classnames``): each
    #: sample's label is mapped before it is matched to the class names (a label it lacks is an error).
    classname_map: dict[str, str] | str = field(default_factory=dict)
    #: Prompt templates with a ``{}`` for the class name, or a JSON file of them (as ``classnames``).
    templates: list[str] | str = field(default_factory=lambda: ["{}"])
    #: The text modality that encodes prompts and captions.
    text: str = "text"
    #: Retrieval: a key of the samples' JSON holding several captions per clip (strings or objects with a
    #: ``text``); the text side then has one row per caption. Empty: the sample's own caption.
    captions: str = ""
    #: Retrieval: label keys judged for the attribute-match R@1 and the tie ceiling.
    match_labels: list[str] = field(default_factory=list)
    #: Linear probe: the training split (shard spec or manifest); ``data`` is the split it is scored on.
    train_data: str = ""
    #: Linear probe: the L2 weight decays tried (picked on a held-out fifth of ``train_data``).
    weight_decays: list[float] = field(default_factory=lambda: list(DEFAULT_WEIGHT_DECAYS))
    #: Zero-shot classification: ``label`` holds a list of class names per sample (AudioSet), scored by
    #: the mean average precision over classes (``mmcl.eval.multilabel``).
    multilabel: bool = False
    #: False: classes without samples stay in the classifier (a benchmark's fixed class list over a
    #: partial copy) and are left out of the per-class means, instead of failing the task.
    require_every_class: bool = True
    #: Retrieval: also report mAP@K (AudioCaps, Clotho: 10); 0: not reported.
    map_k: int = 0
    #: Extra fields of the task's JSON report (a benchmark's ``language``, ``protocol``, ``n``, ``missing``).
    report: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if not self.query:
            raise ConfigError(f"{where}.query: at least one modality")
        if len(set(self.query)) != len(self.query):
            raise ConfigError(f"{where}.query: a modality is listed twice")
        classify = self.type in ("zeroshot_classification", "linear_probe")
        if classify and not self.label:
            raise ConfigError(f"{where}.label: a {self.type} task needs the label key")
        if self.type == "zeroshot_classification" and not self.classnames:
            raise ConfigError(f"{where}.classnames: a zeroshot_classification task needs class names "
                              f"(a list, a JSON file or {FROM_LABELS!r})")
        if self.classname_map and not classify:
            raise ConfigError(f"{where}.classname_map: only for zeroshot_classification and linear_probe tasks")
        if isinstance(self.classnames, list) and len(set(self.classnames)) != len(self.classnames):
            raise ConfigError(f"{where}.classnames: a class name is listed twice")
        if isinstance(self.templates, list):
            if not self.templates:
                raise ConfigError(f"{where}.templates: at least one template")
            bad = [t for t in self.templates if "{}" not in t]
            if bad and self.type == "zeroshot_classification":
                raise ConfigError(f"{where}.templates: {bad[0]!r} has no {{}} for the class name")
        if self.type == "retrieval":
            if not self.candidates:
                raise ConfigError(f"{where}.candidates: at least one modality")
            both = sorted(set(self.query) & set(self.candidates))
            if both:
                raise ConfigError(f"{where}: {both[0]!r} is both a query and a candidate modality")
            if self.captions and self.text not in self.query + self.candidates:
                raise ConfigError(f"{where}.captions: the task has no {self.text!r} side for the captions")
        else:
            for name in ("captions", "match_labels"):
                if getattr(self, name):
                    raise ConfigError(f"{where}.{name}: only for retrieval tasks")
        if self.type == "linear_probe":
            if not self.train_data:
                raise ConfigError(f"{where}.train_data: a linear_probe task needs a training split")
            if not self.weight_decays or any(wd < 0 for wd in self.weight_decays):
                raise ConfigError(f"{where}.weight_decays: one or more values >= 0")
        elif self.train_data:
            raise ConfigError(f"{where}.train_data: only for linear_probe tasks")
        if self.multilabel and self.type != "zeroshot_classification":
            raise ConfigError(f"{where}.multilabel: only for zeroshot_classification tasks")
        if self.map_k < 0 or (self.map_k and self.type != "retrieval"):
            raise ConfigError(f"{where}.map_k: a K >= 1 for retrieval tasks (0: no mAP@K)")

    @property
    def modalities(self) -> list[str]:
        """The embeddings the task compares (text prompts of classification tasks included)."""
        if self.type == "retrieval":
            return self.query + self.candidates
        return self.query + ([self.text] if self.type == "zeroshot_classification" else [])

    @property
    def encoded(self) -> list[str]:
        """The modalities read from the task's data (captions and prompts are encoded from text)."""
        if self.type != "retrieval":
            return list(self.query)
        return [m for m in self.modalities if not (self.captions and m == self.text)]


@dataclass
class SuiteConfig:
    tasks: list[TaskConfig]
    batch_size: int = 128
    #: The time window of the video and audio read (as ``data.clip``: centred, or ``eval_clips`` evenly
    #: spaced windows whose embeddings are averaged). None: whole clips; a training run passes its own.
    clip: WindowConfig | None = None

    def validate(self, where: str) -> None:
        if not self.tasks:
            raise ConfigError(f"{where}.tasks: at least one task")
        if self.batch_size <= 0:
            raise ConfigError(f"{where}.batch_size: must be > 0, got {self.batch_size}")
        seen: set[str] = set()
        for i, task in enumerate(self.tasks):
            if task.name in seen:
                raise ConfigError(f"{where}.tasks[{i}].name: {task.name!r} is used by another task")
            seen.add(task.name)


def _read_json(value: str, base: Path, where: str) -> tuple[Any, str, str]:
    """The JSON node named by ``file.json`` or ``file.json#key`` (relative to ``base``) -> (node, path
    text, key)."""
    path_text, _, key = value.partition("#")
    path = Path(path_text).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        node = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found: {path}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {path} is not JSON ({e})") from None
    if key:
        if not isinstance(node, dict) or key not in node:
            raise ConfigError(f"{where}: {path} has no key {key!r}")
        node = node[key]
    return node, f"{path}{'#' + key if key else ''}", key


def _read_list(value: list[str] | str, base: Path, where: str) -> list[str]:
    """An inline list, or the list in a JSON file (``file.json`` or ``file.json#key``)."""
    if isinstance(value, list):
        return value
    node, name, _ = _read_json(value, base, where)
    if not isinstance(node, list) or not node or not all(isinstance(x, str) for x in node):
        raise ConfigError(f"{where}: {name} is not a non-empty list of strings")
    return node


def _read_map(value: dict[str, str] | str, base: Path, where: str) -> dict[str, str]:
    """An inline mapping, or the object of strings in a JSON file (``file.json`` or ``file.json#key``)."""
    if isinstance(value, dict):
        return value
    node, name, _ = _read_json(value, base, where)
    if not isinstance(node, dict) or not node or not all(isinstance(v, str) for v in node.values()):
        raise ConfigError(f"{where}: {name} is not a non-empty JSON object of strings (label -> class name)")
    return {str(k): v for k, v in node.items()}


def resolve_files(suite: SuiteConfig, base: Path) -> SuiteConfig:
    """Read the class names and templates given as JSON files (relative to ``base``) into the suite."""
    for i, task in enumerate(suite.tasks):
        where = f"suite.tasks[{i}]"
        if isinstance(task.classnames, str) and task.classnames != FROM_LABELS:
            task.classnames = _read_list(task.classnames, base, f"{where}.classnames")
        if isinstance(task.classname_map, str):
            task.classname_map = _read_map(task.classname_map, base, f"{where}.classname_map")
        if isinstance(task.templates, str):
            task.templates = _read_list(task.templates, base, f"{where}.templates")
        task.validate(where)
    return suite


def load_suite(path: str | Path) -> SuiteConfig:
    """A suite file, or a name under ``configs/eval`` (``synthetic``); JSON files it names are read
    relative to it."""
    p = Path(path)
    if not p.is_file():
        named = CONFIG_DIR / "eval" / (p.name if p.suffix else f"{p.name}.yaml")
        if not named.is_file():
            raise ConfigError(f"eval suite not found: {path}")
        p = named
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not YAML ({str(e).splitlines()[0]})") from None
    return resolve_files(from_dict(SuiteConfig, data, "suite"), p.parent)


def check_suite(suite: SuiteConfig, model) -> None:
    """Fail before any encoding when a task names modalities the model lacks (or its text modality is
    not text)."""
    resolve_files(suite, Path.cwd())
    for i, task in enumerate(suite.tasks):
        missing = [m for m in task.modalities if m not in model.processors]
        if missing:
            raise EvalError(f"suite.tasks[{i}] ({task.name}): model has no modality {missing[0]!r} "
                            f"(has: {', '.join(model.processors)})")
        needs_text = task.type == "zeroshot_classification" or task.captions
        if needs_text and not hasattr(model.processors[task.text], "tokenize"):
            raise EvalError(f"suite.tasks[{i}] ({task.name}): modality {task.text!r} is not a text modality")


# ----------------------------------------------------------------------------------------------------
# Labels and captions from the samples' JSON


def _meta_path(node: Any, key: str) -> Any:
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _label_of(meta: dict, key: str) -> Any:
    return _meta_path(meta.get("labels", meta), key)


def _raw_labels(task: TaskConfig, metas: list[tuple[str, dict]], spec: str) -> list[Any]:
    """Each sample's label as its JSON holds it (as a string); for a multi-label task, a tuple of them (a single
    label counts as one)."""
    out: list[Any] = []
    for key, meta in metas:
        try:
            value = _label_of(meta, task.label)
            if task.multilabel:
                out.append(tuple(map(str, value)) if isinstance(value, list) else (str(value),))
            else:
                out.append(str(value))
        except (KeyError, IndexError, TypeError, ValueError):
            raise EvalError(f"task {task.name}: sample {key} of {spec} has no label {task.label!r} in its json "
                            f"(a {task.type} task needs labelled data)") from None
    return out


def _class_name(task: TaskConfig, label: str, spec: str) -> str:
    """A label through the task's ``classname_map`` (itself without one)."""
    if not task.classname_map:
        return label
    if label not in task.classname_map:
        raise EvalError(f"task {task.name}: label {label!r} in {spec} is not in classname_map "
                        f"({len(task.classname_map)} labels)")
    return task.classname_map[label]


def _labels(task: TaskConfig, metas: list[tuple[str, dict]], spec: str) -> list[Any]:
    """Each sample's class name: its label through ``classname_map`` (a tuple of them for a multi-label task)."""
    labels = _raw_labels(task, metas, spec)
    if task.multilabel:
        return [tuple(_class_name(task, label, spec) for label in row) for row in labels]
    return [_class_name(task, label, spec) for label in labels]


def _label_order(label: str) -> tuple[int, float, str]:
    """Sort key of labels: integers by value, before other labels in string order."""
    try:
        return 0, float(int(label)), ""
    except ValueError:
        return 1, 0.0, label


def classnames_from_labels(task: TaskConfig, metas: list[tuple[str, dict]], spec: str) -> list[str]:
    """``classnames: from_labels``: the sorted distinct labels of ``metas``, each through ``classname_map``;
    two labels mapped to one class name are refused."""
    raw = _raw_labels(task, metas, spec)
    if task.multilabel:
        raw = [label for row in raw for label in row]
    labels = sorted(set(raw), key=_label_order)
    names = [_class_name(task, label, spec) for label in labels]
    seen: dict[str, str] = {}
    for label, name in zip(labels, names):
        if name in seen:
            raise EvalError(f"task {task.name}: classname_map maps labels {seen[name]!r} and {label!r} to the "
                            f"same class name {name!r}")
        seen[name] = label
    return names


def _check_classes(task: TaskConfig, names: list[str], spec: str, classnames: list[str]) -> None:
    if task.multilabel:
        names = [n for labels in names for n in labels]
    unknown = sorted(set(names) - set(classnames))
    if unknown:
        shown = ", ".join(map(repr, classnames[:5])) + (", ..." if len(classnames) > 5 else "")
        raise EvalError(f"task {task.name}: label {unknown[0]!r} in {spec} is not among the {len(classnames)} "
                        f"class names ({shown})")
    empty = [c for c in classnames if c not in set(names)] if task.require_every_class else []
    if empty:
        raise EvalError(f"task {task.name}: class {empty[0]!r} has no samples in {spec}")


def _captions(task: TaskConfig, key: str, meta: dict) -> list[str]:
    try:
        node = _meta_path(meta, task.captions)
    except (KeyError, IndexError, TypeError, ValueError):
        node = None
    items = [node] if isinstance(node, str) else node if isinstance(node, list) else []
    texts = [c if isinstance(c, str) else c.get("text") if isinstance(c, dict) else None for c in items]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise EvalError(f"task {task.name}: sample {key} has no captions under {task.captions!r} in its json")
    return texts


def _match_labels(task: TaskConfig, key: str, meta: dict, spec: str) -> tuple[str, ...]:
    try:
        return tuple(str(_label_of(meta, k)) for k in task.match_labels)
    except (KeyError, IndexError, TypeError, ValueError):
        raise EvalError(f"task {task.name}: sample {key} of {spec} lacks a label of match_labels "
                        f"{task.match_labels} in its json") from None


def _classnames(task: TaskConfig, metas: list[tuple[str, dict]], spec: str) -> list[str]:
    """The task's class names: its list, else (``from_labels``, or a linear probe without any) those of the
    labels of ``metas`` (the evaluated data; a linear probe's training split)."""
    if isinstance(task.classnames, list) and task.classnames:
        return list(task.classnames)
    return classnames_from_labels(task, metas, spec)


def check_data(task: TaskConfig, spec: str, train_spec: str = "",
               scans: dict[str, list[tuple[str, dict]] | None] | None = None, meta_cache: Path | None = None) -> None:
    """Labels, classes and captions of a task's (local) data, from the JSON alone (``scans``: metadata
    already read, by spec; filled in; ``meta_cache``: where scans are kept, :func:`scan_metadata`)."""
    scans = {} if scans is None else scans
    for s in filter(None, (spec, train_spec)):
        if s not in scans:
            scans[s] = scan_metadata(s, meta_cache)
    metas = scans[spec]
    if metas is None:
        return
    if task.type == "retrieval":
        for key, meta in metas:
            if task.captions:
                _captions(task, key, meta)
            _match_labels(task, key, meta, spec)
        return
    names = _labels(task, metas, spec)
    classnames = _classnames(task, metas, spec) if task.type == "zeroshot_classification" else None
    if task.type == "linear_probe":
        if scans[train_spec] is None:
            return
        classnames = _classnames(task, scans[train_spec], train_spec)
        _check_classes(task, _labels(task, scans[train_spec], train_spec), train_spec, classnames)
    _check_classes(task, names, spec, classnames or [])


# ----------------------------------------------------------------------------------------------------
# Encoding


@torch.no_grad()
def encode_dataset(model, spec: str, modalities: list[str], batch_size: int, workers: int = 0,
                   desc: str = "encode", progress: bool = True, clip: WindowConfig | None = None,
                   inputs: InputCache | None = None) -> dict[str, Any]:
    """Encode every sample of ``spec`` -> ``{"emb": {m: [N, D]}, "present": {m: [N]}, "meta": [...],
    "keys": [...], "skipped": {...}}`` (embeddings float32 on the CPU).

    With ``clip`` the video and audio are read in the sample's evaluation window; with ``clip.eval_clips``
    K > 1 the time-based modalities are encoded once per window (K passes, each decoding only its windows)
    and a sample's embedding is the mean of its K embeddings, L2-normalised again (the multi-view protocol);
    the other modalities are encoded once. ``inputs``: each pass's decoded model inputs are read from (or, on
    a miss, stored into) that cache instead of decoding the media (:mod:`mmcl.eval.input_cache`)."""
    data = _encode_view(model, spec, modalities, batch_size, workers, desc, progress, clip, 0, inputs)
    views = clip.eval_clips if clip is not None else 1
    timed = [m for m in modalities if model.processors[m].timed]
    if views == 1 or not timed:
        return data
    index = {k: i for i, k in enumerate(data["keys"])}
    total = {m: data["emb"][m] * data["present"][m][:, None] for m in timed}
    counts = {m: data["present"][m].float() for m in timed}
    for view in range(1, views):
        other = _encode_view(model, spec, timed, batch_size, workers, f"{desc} (window {view + 1}/{views})",
                             progress, clip, view, inputs)
        rows = torch.tensor([index.get(k, -1) for k in other["keys"]])
        known = rows >= 0  # a sample unusable in this window only: its other windows still count
        for m in timed:
            use = known & other["present"][m]
            total[m].index_add_(0, rows[use], other["emb"][m][use])
            counts[m].index_add_(0, rows[use], torch.ones(int(use.sum())))
            data["present"][m][rows[use]] = True
        for k, v in other["skipped"].items():
            data["skipped"][f"{k}_window{view + 1}"] = data["skipped"].get(f"{k}_window{view + 1}", 0) + v
    for m in timed:
        mean = total[m] / counts[m].clamp(min=1)[:, None]
        data["emb"][m] = torch.nn.functional.normalize(mean, dim=-1)
    return data


def _encode_view(model, spec: str, modalities: list[str], batch_size: int, workers: int, desc: str,
                 progress: bool, clip: WindowConfig | None, view: int,
                 inputs: InputCache | None = None) -> dict[str, Any]:
    """One pass of :func:`encode_dataset` (window ``view`` of ``clip``), from the decoded-input cache
    ``inputs`` when it holds the pass, else through the loader (stored into ``inputs`` on the way)."""
    processors = {m: model.processors[m] for m in modalities}
    key = entry_key(spec, processors, clip, view) if inputs is not None else ""
    stored = inputs.batches(key, batch_size) if inputs is not None else None
    writer, loader = None, None
    if stored is not None:
        index, batches = stored
        total = len(index["batch_sizes"])
    else:
        workers = min(workers, len(expand_shards(spec)))
        loader = build_loader(spec, processors, batch_size, train=False, workers=workers, with_meta=True,
                              on_missing="mask", clip=clip, view=view)
        batches, total = loader, math.ceil(loader.size / batch_size) if loader.size else None
        writer = inputs.writer(key, batch_size, loader.size) if inputs is not None else None
    device = model_device(model)
    emb: dict[str, list] = {m: [] for m in modalities}
    present: dict[str, list] = {m: [] for m in modalities}
    meta, keys = [], []
    for batch in tqdm(batches, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=not progress,
                      unit="batch"):
        out = model.encode({m: x.to(device) for m, x in batch["inputs"].items()})
        for m in modalities:
            emb[m].append(out[m].float().cpu())
            present[m].append(batch["present"][m])
        if writer is not None:
            writer.add(batch["inputs"], batch["present"])
        if loader is not None:
            meta.extend(batch["meta"])
            keys.extend(batch["keys"])
    if stored is not None:
        meta, keys, skipped = index["meta"], index["keys"], index["skipped"]
    else:
        skipped = dict(loader.skipped)
    if not keys:
        raise EvalError(f"{spec}: no sample could be read (skipped: {skipped or 'none'})")
    if writer is not None:
        writer.close(keys, meta, skipped)
    return {"emb": {m: torch.cat(v) for m, v in emb.items()}, "present": {m: torch.cat(v) for m, v in present.items()},
            "meta": meta, "keys": keys, "skipped": dict(skipped)}


# ----------------------------------------------------------------------------------------------------
# Tasks


@dataclass
class TaskOutput:
    """A task's metrics and what its plot needs."""

    metrics: dict[str, float]
    dataset: str = ""
    classnames: list[str] = field(default_factory=list)
    #: Classification: ``[C, C]`` expected counts (row = true class).
    confusion: torch.Tensor | None = None
    #: Retrieval: mean R@K for K = 1 .. min(candidates, CURVE_MAX_K).
    curve: list[float] = field(default_factory=list)
    #: One record per query (:func:`query_ranks`), written as ``<type>_<task>_ranks.jsonl``.
    ranks: list[dict[str, Any]] = field(default_factory=list)


def query_ranks(scores: torch.Tensor, positives: torch.Tensor, rows: list[dict[str, Any]],
                candidates: list[str], k: int = RANKS_TOP_K) -> list[dict[str, Any]]:
    """Per query (``scores [Nq, Nc]``, ``positives`` bool ``[Nq, Nc]``, ``rows``: each query's own fields,
    its ``key`` first): ``rank``, the expected 1-based rank of its first true candidate (ties broken uniformly
    at random, as the metrics count them: fractional inside a tie), and ``top{k}``, the ``candidates`` names
    (sample keys, or class names) of its ``k`` best-scored candidates, best first (a tie in the listed
    order of the candidates)."""
    ranks = true_ranks(scores, positives).tolist()
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k].tolist()
    return [{**row, "rank": int(r) if float(r).is_integer() else r, f"top{k}": [candidates[j] for j in best]}
            for row, r, best in zip(rows, ranks, order)]


def _kept(task: TaskConfig, data: dict[str, Any], mods: list[str], spec: str) -> torch.Tensor:
    """Indices of the samples that have every one of ``mods``."""
    keep = torch.ones(len(data["keys"]), dtype=torch.bool)
    for m in mods:
        keep &= data["present"][m]
    idx = keep.nonzero().squeeze(1)
    if idx.numel() == 0:
        raise EvalError(f"task {task.name}: no sample of {spec} has all of {', '.join(mods)}")
    return idx


def _kept_metas(task: TaskConfig, data: dict[str, Any], spec: str) -> list[tuple[str, dict]]:
    """``(key, json)`` of the samples that have every query modality."""
    return [(data["keys"][i], data["meta"][i]) for i in _kept(task, data, task.query, spec).tolist()]


def _classification_inputs(task: TaskConfig, data: dict[str, Any], spec: str,
                           classnames: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """-> (query embeddings ``{m: [N, D]}``, class indices ``[N]``, sample keys) of the samples that have
    every query modality."""
    idx = _kept(task, data, task.query, spec)
    names = _labels(task, [(data["keys"][i], data["meta"][i]) for i in idx.tolist()], spec)
    _check_classes(task, names, spec, classnames)
    index = {c: i for i, c in enumerate(classnames)}
    keys = [data["keys"][i] for i in idx.tolist()]
    query = {m: data["emb"][m][idx] for m in task.query}
    if task.multilabel:  # [N, C] bool targets
        targets = torch.zeros(len(names), len(classnames), dtype=torch.bool)
        for row, labels in enumerate(names):
            targets[row, [index[n] for n in labels]] = True
        return query, targets, keys
    return query, torch.tensor([index[n] for n in names]), keys


def _side(model, task: TaskConfig, mods: list[str], data: dict[str, Any], idx: torch.Tensor,
          texts_memo: dict[tuple, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One side of a retrieval task: ``{modality: [rows, D]}`` and the clip (position in ``idx``) of each
    row. With ``captions`` the text side has one row per caption, its other modalities repeated (captions
    encoded once per suite run: ``texts_memo``, by text modality and captions)."""
    clip = torch.arange(idx.numel())
    if not (task.captions and task.text in mods):
        return {m: data["emb"][m][idx] for m in mods}, clip
    texts, owner = [], []
    for pos, i in enumerate(idx.tolist()):
        caps = _captions(task, data["keys"][i], data["meta"][i])
        texts += caps
        owner += [pos] * len(caps)
    clip = torch.tensor(owner)
    side = {m: data["emb"][m][idx][clip] for m in mods if m != task.text}
    memo = {} if texts_memo is None else texts_memo
    key = (task.text, tuple(texts))
    if key not in memo:
        memo[key] = encode_texts(model, texts, task.text)
    side[task.text] = memo[key]
    return {m: side[m] for m in mods}, clip


def _row_names(task: TaskConfig, mods: list[str], data: dict[str, Any], idx: torch.Tensor,
               clip: torch.Tensor) -> list[dict[str, Any]]:
    """Per row of a retrieval side: ``{"key"}`` of its clip, and ``"caption"`` (the caption's position among
    the clip's) where the side has a row per caption."""
    keys = [data["keys"][i] for i in idx[clip].tolist()]
    if not (task.captions and task.text in mods):
        return [{"key": k} for k in keys]
    seen: dict[int, int] = {}
    rows = []
    for owner, k in zip(clip.tolist(), keys):
        rows.append({"key": k, "caption": seen.get(owner, 0)})
        seen[owner] = rows[-1]["caption"] + 1
    return rows


def _retrieval(model, task: TaskConfig, data: dict[str, Any], spec: str,
               texts_memo: dict[tuple, torch.Tensor] | None = None) -> TaskOutput:
    idx = _kept(task, data, task.encoded, spec)
    query, q_clip = _side(model, task, task.query, data, idx, texts_memo)
    candidates, c_clip = _side(model, task, task.candidates, data, idx, texts_memo)
    positives = q_clip[:, None] == c_clip[None, :]
    same = None
    if task.match_labels:
        attrs = [_match_labels(task, data["keys"][i], data["meta"][i], spec) for i in idx.tolist()]
        codes = {a: i for i, a in enumerate(sorted(set(attrs)))}
        code = torch.tensor([codes[a] for a in attrs])
        same = code[q_clip][:, None] == code[c_clip][None, :]
    metrics, scores = retrieval(model, query, candidates, positives=positives, same_attrs=same, map_k=task.map_k)
    ranks = query_ranks(scores, positives, _row_names(task, task.query, data, idx, q_clip),
                        [r["key"] for r in _row_names(task, task.candidates, data, idx, c_clip)])
    return TaskOutput(metrics, curve=recall_curve(scores, positives, min(scores.shape[1], CURVE_MAX_K)),
                      ranks=ranks)


def dataset_name(task: TaskConfig, spec: str) -> str:
    """The task's ``dataset``, else the file names of its data without their folders (reports and model
    cards name a dataset; they do not publish local paths)."""
    if task.dataset:
        return task.dataset
    if is_manifest(task.data):
        return Path(task.data).name
    return "::".join(Path(part).name for part in spec.split("::"))


def _run_task(model, task: TaskConfig, data: dict[str, Any], train: dict[str, Any] | None, spec: str,
              train_spec: str, texts_memo: dict[tuple, torch.Tensor] | None = None) -> TaskOutput:
    """One task on its encoded dataset (and, for a linear probe, its encoded training split)."""
    if task.type == "retrieval":
        out = _retrieval(model, task, data, spec, texts_memo)
        out.dataset = dataset_name(task, spec)
        return out
    if task.type == "zeroshot_classification":
        classnames = _classnames(task, _kept_metas(task, data, spec), spec)
        query, labels, keys = _classification_inputs(task, data, spec, classnames)
        if task.multilabel:
            metrics, _ = multilabel_classification(model, query, labels, classnames, task.templates, task.text)
            return TaskOutput(metrics, dataset=dataset_name(task, spec), classnames=classnames)
        metrics, scores = zeroshot_classification(model, query, labels, classnames, task.templates, task.text)
    else:
        if train is None:
            raise EvalError(f"task {task.name}: a linear probe needs its encoded training split")
        classnames = _classnames(task, _kept_metas(task, train, train_spec), train_spec)
        train_x, train_y, _ = _classification_inputs(task, train, train_spec, classnames)
        query, labels, keys = _classification_inputs(task, data, spec, classnames)
        metrics, scores = linear_probe(torch.cat([train_x[m] for m in task.query], dim=1), train_y,
                                       torch.cat([query[m] for m in task.query], dim=1), labels,
                                       len(classnames), task.weight_decays)
    positives = torch.nn.functional.one_hot(labels, len(classnames)).bool()
    rows = [{"key": k, "label": classnames[c]} for k, c in zip(keys, labels.tolist())]
    return TaskOutput(metrics, dataset=dataset_name(task, spec), classnames=classnames,
                      confusion=confusion_matrix(scores, labels, len(classnames)),
                      ranks=query_ranks(scores, positives, rows, classnames))


# ----------------------------------------------------------------------------------------------------
# The suite


def _resolve_spec(spec: str, test_spec: str, task: TaskConfig, workers: int, progress: bool,
                  built: dict[str, tuple[str, int]]) -> str:
    if spec == "test":
        if not test_spec:
            raise EvalError(f"task {task.name}: data is 'test' but no held-out shards were given")
        spec = test_spec
    try:
        if is_manifest(spec):
            if spec not in built:
                built[spec] = shards_from_manifest(spec, workers=workers, progress=progress)
            return built[spec][0]
        expand_shards(spec)  # a missing shard fails here, before anything is encoded
    except (ConfigError, DataError) as e:
        raise EvalError(f"task {task.name}: {e}") from None
    return spec


def run_suite(model, suite: SuiteConfig, test_spec: str = "", workers: int = 0,
              out_dir: str | Path | None = None, model_name: str = "", *, cache: bool = True,
              cache_dir: str | Path | None = None, progress: bool = True,
              clip: WindowConfig | None = None, input_cache_gb: float = 0.0) -> dict[str, Any]:
    """Check every task, encode each dataset once, run every task, and (with ``out_dir``) write the reports.

    ``clip`` (a training run's ``data.clip``) is the time window of the video and audio read; None: the
    suite's own ``clip``.

    With ``cache``, encoded datasets are kept under ``cache_dir`` (default ``out_dir/cache``; none without
    either) and reused when the same weights encode the same files again: a re-run with other prompt
    templates or class names encodes only the prompts. ``input_cache_gb`` > 0 (the benchmarks') also keeps
    each dataset's decoded model inputs there, up to that size (:mod:`mmcl.eval.input_cache`: reused by any
    model with the same processing, e.g. the next checkpoint), and the scan of their metadata; 0: off.

    Returns ``{"zeroshot_classification": {task: metrics}, "retrieval": {task: metrics},
    ["linear_probe": {task: metrics},] "eval_data": {"skipped": {reason: count}}}``.
    """
    check_suite(suite, model)
    clip = clip if clip is not None else suite.clip
    if cache_dir is None and out_dir is not None:
        cache_dir = Path(out_dir) / "cache"
    inputs = (InputCache(Path(cache_dir) / "inputs", input_cache_gb * 2**30)
              if input_cache_gb > 0 and cache_dir is not None else None)
    meta_cache = Path(cache_dir) / "metadata" if inputs is not None else None
    built: dict[str, tuple[str, int]] = {}
    scans: dict[str, list[tuple[str, dict]] | None] = {}
    specs: dict[str, tuple[str, str]] = {}
    by_data: dict[str, dict[str, list[str]]] = {}
    for task in suite.tasks:
        spec = _resolve_spec(task.data, test_spec, task, workers, progress, built)
        train_spec = (_resolve_spec(task.train_data, test_spec, task, workers, progress, built)
                      if task.type == "linear_probe" else "")
        check_data(task, spec, train_spec, scans, meta_cache)
        specs[task.name] = (spec, train_spec)
        for s in filter(None, (spec, train_spec)):
            entry = by_data.setdefault(s, {"mods": [], "tasks": []})
            entry["mods"] = sorted(set(entry["mods"]) | set(task.encoded))
            entry["tasks"].append(task.name)

    store = EmbeddingCache(Path(cache_dir) / "embeddings") if cache and cache_dir is not None else None
    was_training = model.training
    model.eval()
    try:
        model_fp = model_fingerprint(model, model.config_dict()) if store is not None else ""
        encoded = {}
        for spec, entry in by_data.items():
            key = EmbeddingCache.key(model_fp, data_fingerprint(spec), entry["mods"], suite.batch_size,
                                     to_dict(clip) if clip is not None else None) if store else ""
            data = store.load(key) if store is not None else None
            if data is None:
                names = entry["tasks"]
                tasks = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
                data = encode_dataset(model, spec, entry["mods"], suite.batch_size, workers,
                                      desc=f"encode [{tasks}]", progress=progress, clip=clip, inputs=inputs)
                if store is not None:
                    store.save(key, data)
            else:
                log.info("embeddings of %s (%s) from the cache %s", spec, ", ".join(entry["mods"]), store.root)
            encoded[spec] = data

        results: dict[str, Any] = {"zeroshot_classification": {}, "retrieval": {}}
        outputs: dict[str, TaskOutput] = {}
        texts_memo: dict[tuple, torch.Tensor] = {}
        for task in tqdm(suite.tasks, desc="eval", leave=False, dynamic_ncols=True, disable=not progress,
                         unit="task"):
            spec, train_spec = specs[task.name]
            out = _run_task(model, task, encoded[spec], encoded.get(train_spec), spec, train_spec, texts_memo)
            results.setdefault(task.type, {})[task.name] = defined_metrics(out.metrics)
            outputs[task.name] = out
    finally:
        model.train(was_training)
    skipped: dict[str, int] = {}
    for data in encoded.values():
        for k, v in data["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    rejected = sum(n for _, n in built.values())
    if rejected:
        skipped["manifest_rejected"] = rejected
    results["eval_data"] = {"skipped": skipped}
    if out_dir is not None:
        write_reports(results, suite, Path(out_dir), model_name, outputs)
    return results


def defined_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` without ``acc5`` where it is undefined (below 5 classes every class is in the top 5):
    results and reports leave the key out rather than write NaN, which is not JSON."""
    if metrics.get("n_classes", 5) < 5:
        return {k: v for k, v in metrics.items() if k != "acc5"}
    return metrics


def flat_metrics(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{"eval/<task type>/<task>/<metric>": value}`` for every numeric metric (the training log's form)."""
    return {f"{prefix}/{kind}/{task}/{m}": float(v) for kind in TASK_TYPES
            for task, ms in results.get(kind, {}).items() for m, v in ms.items()
            if isinstance(v, float)}


# ----------------------------------------------------------------------------------------------------
# Reports


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _classification_row(name: str, m: dict[str, Any]) -> str:
    """``| name | acc1 | chance | acc5 | mean per-class recall | n | classes`` (chance: 1 / classes; acc5 "—"
    below 5 classes)."""
    return (f"| {name} | {_fmt(m['acc1'])} | {_fmt(1.0 / m['n_classes'])} | {_fmt(m.get('acc5', math.nan))} "
            f"| {_fmt(m['mean_per_class_recall'])} | {m['n']} | {m['n_classes']}")


def results_table(results: dict[str, Any]) -> str:
    """A markdown table of every task's metrics; classification tables give the chance level (1 / classes)
    beside acc1 and "—" for acc5 below 5 classes."""
    sections = []
    zs = {k: m for k, m in results.get("zeroshot_classification", {}).items() if "mAP" not in m}
    ml = {k: m for k, m in results.get("zeroshot_classification", {}).items() if "mAP" in m}
    if zs:
        lines = ["| zero-shot task | acc1 | chance | acc5 | mean per-class recall | n | classes |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"{_classification_row(name, m)} |" for name, m in zs.items()]
        sections.append(lines)
    if ml:
        lines = ["| multi-label task | mAP | n | classes | classes with a positive |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {_fmt(m['mAP'])} | {m['n']} | {m['n_classes']} | {m['n_classes_scored']} |"
                  for name, m in ml.items()]
        sections.append(lines)
    lp = results.get("linear_probe", {})
    if lp:
        lines = ["| linear probe | acc1 | chance | acc5 | mean per-class recall | n | classes | train | weight decay |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"{_classification_row(name, m)} | {m['n_train']} | {m['weight_decay']:g} |" for name, m in lp.items()]
        sections.append(lines)
    rt = results.get("retrieval", {})
    if rt:
        maps = sorted({k for m in rt.values() for k in m if k.startswith("mAP@")})  # tasks with map_k
        lines = ["| retrieval | R@1 | R@5 | R@10 | median rank | mean rank | n | R@1 tie ceiling "
                 "| R@1 attribute match |" + "".join(f" {k} |" for k in maps), "|---|---|---|---|---|---|---|---|---|"
                 + "---|" * len(maps)]
        for name, m in rt.items():
            lines.append(f"| {name} | {_fmt(m['R@1'])} | {_fmt(m['R@5'])} | {_fmt(m['R@10'])} "
                         f"| {_fmt(m['median_rank'])} | {_fmt(m['mean_rank'])} | {m['n']} "
                         f"| {_fmt(m.get('R@1_tie_ceiling', '-'))} | {_fmt(m.get('R@1_attribute_match', '-'))} |"
                         + "".join(f" {_fmt(m.get(k, '-'))} |" for k in maps))
        sections.append(lines)
    return "\n\n".join("\n".join(lines) for lines in sections)


def task_file_stem(task: TaskConfig) -> str:
    """``<type>_<name>`` with characters unsafe in file names replaced (``->`` becomes ``_to_``)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task.name.replace("->", "_to_"))
    return f"{task.type}_{safe}"


def write_reports(results: dict[str, Any], suite: SuiteConfig, out: Path, model_name: str = "",
                  outputs: dict[str, TaskOutput] | None = None) -> None:
    """``out/results.json``, ``out/<type>_<task>.json`` per task ({dataset, model, task, name, metrics}),
    ``out/summary.md`` and, given the tasks' ``outputs``, ``out/<type>_<task>_ranks.jsonl`` per task (one
    line per query: :func:`query_ranks`), ``out/<type>_<task>_confusion.png`` per classification task and
    ``out/<type>_<task>_recall.png`` per retrieval task."""
    from mmcl.eval.plots import confusion_matrix_png, recall_curve_png

    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for task in suite.tasks:
        stem = task_file_stem(task)
        output = (outputs or {}).get(task.name)
        dataset = output.dataset if output else dataset_name(task, task.data)
        (out / f"{stem}.json").write_text(json.dumps(
            {"dataset": dataset, "model": model_name, "task": task.type, "name": task.name,
             "metrics": results[task.type][task.name], **task.report}, indent=2))
        if output is not None and output.ranks:
            (out / f"{stem}_ranks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in output.ranks))
        if output is not None and output.confusion is not None:
            plots.append(confusion_matrix_png(output.confusion, output.classnames, out / f"{stem}_confusion.png",
                                              f"{task.name} ({task.type})"))
        if output is not None and output.curve:
            plots.append(recall_curve_png({task.name: output.curve}, out / f"{stem}_recall.png",
                                          f"{task.name}: recall@K"))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    summary = results_table(results) + "\n"
    if plots:
        summary += "\nPlots: " + ", ".join(f"[{p.stem}]({p.name})" for p in plots) + "\n"
    (out / "summary.md").write_text(summary)
