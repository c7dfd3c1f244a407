"""Eval suites: a YAML list of tasks -> ``results.json`` (+ one JSON per task, CLIP_benchmark style, and a
markdown summary). The same code runs at the end of training and from ``mmcl eval``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from tqdm import tqdm

from mmcl.config import CONFIG_DIR, ConfigError, from_dict
from mmcl.data.shards import build_loader
from mmcl.eval.retrieval import retrieval
from mmcl.eval.zeroshot import zeroshot_classification


@dataclass
class TaskConfig:
    name: str
    type: Literal["zeroshot_classification", "retrieval"]
    #: Query modalities (several = a joint query, combined by the objective's scoring).
    query: list[str]
    #: Retrieval candidates (classification always scores against text prompts).
    candidates: list[str] = field(default_factory=lambda: ["text"])
    #: Shard spec, or "test" for the held-out split given with the suite run.
    data: str = "test"
    #: Classification: the key under ``json["labels"]`` holding the class name.
    label: str = ""
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: ["{}"])
    #: Retrieval: label keys judged for the attribute-match R@1 and the tie ceiling.
    match_labels: list[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        if self.type == "zeroshot_classification":
            if not self.label:
                raise ConfigError(f"{where}.label: a zeroshot_classification task needs the label key")
            if not self.classnames:
                raise ConfigError(f"{where}.classnames: a zeroshot_classification task needs class names")


@dataclass
class SuiteConfig:
    tasks: list[TaskConfig]
    batch_size: int = 128


def load_suite(path: str | Path) -> SuiteConfig:
    p = Path(path)
    if not p.is_file():
        named = CONFIG_DIR / "eval" / (p.name if p.suffix else f"{p.name}.yaml")
        if not named.is_file():
            raise ConfigError(f"eval suite not found: {path}")
        p = named
    return from_dict(SuiteConfig, yaml.safe_load(p.read_text()) or {}, "suite")


def check_suite(suite: SuiteConfig, model) -> None:
    """Fail before any encoding when a task names modalities the model lacks."""
    for i, task in enumerate(suite.tasks):
        needed = task.query + (task.candidates if task.type == "retrieval" else ["text"])
        missing = [m for m in needed if m not in model.modalities]
        if missing:
            raise ConfigError(f"suite.tasks[{i}] ({task.name}): model has no modality {missing[0]!r} "
                              f"(has: {', '.join(model.modalities)})")


@torch.no_grad()
def encode_dataset(model, spec: str, modalities: list[str], batch_size: int, workers: int = 0,
                   desc: str = "encode") -> dict[str, Any]:
    """Encode every sample of ``spec`` -> ``{"emb": {m: [N, D]}, "present": {m: [N]}, "meta": [...],
    "keys": [...], "skipped": {...}}``."""
    mods = {m: model.modalities[m] for m in modalities}
    loader = build_loader(spec, mods, batch_size, train=False, workers=workers, with_meta=True,
                          on_missing="mask")
    emb: dict[str, list] = {m: [] for m in modalities}
    present: dict[str, list] = {m: [] for m in modalities}
    meta, keys = [], []
    for batch in tqdm(loader, desc=desc, total=math.ceil(loader.size / batch_size) if loader.size else None,
                      leave=False, dynamic_ncols=True):
        out = model.encode(batch["inputs"])
        for m in modalities:
            emb[m].append(out[m].float())
            present[m].append(batch["present"][m])
        meta.extend(batch["meta"])
        keys.extend(batch["keys"])
    return {"emb": {m: torch.cat(v) for m, v in emb.items()}, "present": {m: torch.cat(v) for m, v in present.items()},
            "meta": meta, "keys": keys, "skipped": dict(loader.skipped)}


def _label_of(meta: dict, key: str) -> Any:
    node: Any = meta.get("labels", meta)
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def run_task(model, task: TaskConfig, data: dict[str, Any]) -> dict[str, float]:
    """One task on an encoded dataset -> its metrics."""
    mods = task.query + (task.candidates if task.type == "retrieval" else [])
    keep = torch.ones(len(data["keys"]), dtype=torch.bool)
    for m in mods:
        keep &= data["present"][m]
    idx = keep.nonzero().squeeze(1)
    if idx.numel() == 0:
        raise ValueError(f"task {task.name}: no sample has all of {mods}")
    query = {m: data["emb"][m][idx] for m in task.query}
    metas = [data["meta"][i] for i in idx.tolist()]
    if task.type == "zeroshot_classification":
        try:
            names = [str(_label_of(meta, task.label)) for meta in metas]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"task {task.name}: samples have no label {task.label!r} in their json") from None
        index = {c: i for i, c in enumerate(task.classnames)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise ValueError(f"task {task.name}: label {unknown[0]!r} is not among classnames {task.classnames}")
        labels = torch.tensor([index[n] for n in names])
        metrics, _ = zeroshot_classification(model, query, labels, task.classnames, task.templates)
        return metrics
    candidates = {m: data["emb"][m][idx] for m in task.candidates}
    same = None
    if task.match_labels:
        attrs = [tuple(str(_label_of(meta, k)) for k in task.match_labels) for meta in metas]
        codes = {a: i for i, a in enumerate(sorted(set(attrs)))}
        code = torch.tensor([codes[a] for a in attrs])
        same = code[:, None] == code[None, :]
    metrics, _ = retrieval(model, query, candidates, same_attrs=same)
    return metrics


def run_suite(model, suite: SuiteConfig, test_spec: str = "", workers: int = 0,
              out_dir: str | Path | None = None, model_name: str = "") -> dict[str, Any]:
    """Encode each dataset once, run every task, and (with ``out_dir``) write the reports.

    Returns ``{"zeroshot_classification": {task: metrics}, "retrieval": {task: metrics}, "data": ...}``.
    """
    check_suite(suite, model)
    was_training = model.training
    model.eval()
    by_data: dict[str, set[str]] = {}
    for task in suite.tasks:
        spec = test_spec if task.data == "test" else task.data
        if not spec:
            raise ConfigError(f"task {task.name}: data is 'test' but no held-out shards were given")
        need = set(task.query) | (set(task.candidates) if task.type == "retrieval" else set())
        by_data.setdefault(spec, set()).update(need)
    encoded = {spec: encode_dataset(model, spec, sorted(mods), suite.batch_size, workers)
               for spec, mods in by_data.items()}
    results: dict[str, Any] = {"zeroshot_classification": {}, "retrieval": {}}
    skipped: dict[str, int] = {}
    for data in encoded.values():
        for k, v in data["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    for task in suite.tasks:
        spec = test_spec if task.data == "test" else task.data
        results[task.type][task.name] = run_task(model, task, encoded[spec])
    results["eval_data"] = {"skipped": skipped}
    model.train(was_training)
    if out_dir is not None:
        write_reports(results, suite, Path(out_dir), model_name)
    return results


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def results_table(results: dict[str, Any]) -> str:
    """A markdown table of every task's metrics."""
    lines = []
    zs = results.get("zeroshot_classification", {})
    if zs:
        lines += ["| zero-shot task | acc1 | acc5 | mean per-class recall | n | classes |", "|---|---|---|---|---|---|"]
        for name, m in zs.items():
            lines.append(f"| {name} | {_fmt(m['acc1'])} | {_fmt(m['acc5'])} | {_fmt(m['mean_per_class_recall'])} "
                         f"| {m['n']} | {m['n_classes']} |")
    rt = results.get("retrieval", {})
    if rt:
        if lines:
            lines.append("")
        lines += ["| retrieval | R@1 | R@5 | R@10 | median rank | mean rank | n | R@1 tie ceiling | R@1 attribute match |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, m in rt.items():
            lines.append(f"| {name} | {_fmt(m['R@1'])} | {_fmt(m['R@5'])} | {_fmt(m['R@10'])} | {_fmt(m['median_rank'])} "
                         f"| {_fmt(m['mean_rank'])} | {m['n']} | {_fmt(m.get('R@1_tie_ceiling', '-'))} "
                         f"| {_fmt(m.get('R@1_attribute_match', '-'))} |")
    return "\n".join(lines)


def write_reports(results: dict[str, Any], suite: SuiteConfig, out: Path, model_name: str = "") -> None:
    """``out/results.json``, ``out/<task>.json`` per task ({dataset, model, task, metrics}), ``out/summary.md``."""
    out.mkdir(parents=True, exist_ok=True)
    for task in suite.tasks:
        metrics = results[task.type][task.name]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task.name.replace("->", "_to_"))
        (out / f"{task.type}_{safe}.json").write_text(json.dumps(
            {"dataset": task.data, "model": model_name, "task": task.type, "name": task.name, "metrics": metrics},
            indent=2))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "summary.md").write_text(results_table(results) + "\n")
