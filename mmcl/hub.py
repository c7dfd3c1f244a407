"""The Hugging Face Hub side of a saved model: the model card (eval results as ``model-index`` metadata,
the training config), loading by repo id (through the local HF cache when offline), and publishing with
``huggingface_hub`` (``create_repo`` + ``upload_folder``).

A model directory's layout and file names are :mod:`mmcl.persistence`'s. Weights travel as safetensors only:
nothing here downloads, uploads or loads a pickle. This module does not know the model class (no import of
:mod:`mmcl.model`): the model uses it. The Hub token comes from
``HF_TOKEN`` or ``hf auth login`` through ``huggingface_hub`` and is never printed or logged.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import Any

import yaml

from mmcl.errors import HubError
from mmcl.persistence import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME

#: Never downloaded from a repo (pickle-based weight formats).
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]
_TASKS = {
    "zeroshot_classification": ("zero-shot-classification", "Zero-shot classification"),
    "retrieval": ("retrieval", "Retrieval"),
    "linear_probe": ("linear-probe-classification", "Linear probe"),
}


# ----------------------------------------------------------------------------------------------------
# Eval results for the card


def eval_records(results: dict[str, Any], datasets: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``results.json`` content -> per-task records ``{"task", "name", "dataset", "metrics"}`` (the
    per-task JSON form); ``datasets`` names each task's dataset (default: ``held-out split``)."""
    return [{"task": kind, "name": name, "dataset": (datasets or {}).get(name, "held-out split"), "metrics": metrics}
            for kind in _TASKS for name, metrics in results.get(kind, {}).items()]


def read_eval_dir(path: str | Path) -> list[dict[str, Any]]:
    """The per-task records of an eval output directory (``mmcl eval --out``), or of the directory of a
    ``results.json`` given instead, or of the per-benchmark folders of ``mmcl eval --suite standard``;
    falls back to ``results.json`` alone."""
    p = Path(path)
    folder = p.parent if p.is_file() else p
    records = []
    for f in sorted(folder.glob("*.json")) + sorted(folder.glob("*/*.json")):
        try:
            data = json.loads(f.read_text())
        except ValueError:
            continue
        if isinstance(data, dict) and {"task", "name", "dataset", "metrics"} <= set(data) and data["task"] in _TASKS:
            records.append({k: data[k] for k in ("task", "name", "dataset", "metrics")})
    if records:
        return records
    results = folder / "results.json"
    if not results.is_file():
        raise HubError(f"{path}: no eval results (per-task JSON files or results.json)")
    return eval_records(json.loads(results.read_text()))


def model_index(model_name: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``model-index`` metadata: one result per task, one metric per finite numeric value (metric
    ``type`` = the CLIP_benchmark name, e.g. ``acc1``, ``R@5``)."""
    results = []
    for r in records:
        task_type, task_label = _TASKS[r["task"]]
        metrics = [{"type": k, "name": f"{r['name']} {k}", "value": float(v)} for k, v in r["metrics"].items()
                   if isinstance(v, float) and math.isfinite(v)]
        if metrics:
            results.append({"task": {"type": task_type, "name": f"{task_label}: {r['name']}"},
                            "dataset": {"type": str(r["dataset"]), "name": str(r["dataset"])},
                            "metrics": metrics})
    return [{"name": model_name, "results": results}] if results else []


# ----------------------------------------------------------------------------------------------------
# The model card


def _modality_rows(config: dict[str, Any]) -> list[str]:
    rows = ["| modality | kind | input | tower |", "|---|---|---|---|"]
    for name, spec in config["model"]["modalities"].items():
        tower = spec.get("tower", {})
        inputs = ", ".join(f"{k}={v}" for k, v in spec.items()
                           if k not in ("tower", "kind") and not isinstance(v, dict))
        rows.append(f"| {name} | {spec.get('kind', name)} | {inputs} | "
                    f"{', '.join(f'{k}={v}' for k, v in tower.items())} |")
    return rows


def model_card(config: dict[str, Any], model_name: str, records: list[dict[str, Any]] | None = None,
               train_config: dict[str, Any] | None = None, repo_id: str = "", results_table: str = "") -> str:
    """``README.md``: YAML metadata (library, tags, ``model-index`` with the eval results) and a body with
    how to load the model, its modalities, the results table (``results_table``: the records rendered as
    markdown) and the training config."""
    modalities = list(config["model"]["modalities"])
    objective = config.get("objective", {})
    meta: dict[str, Any] = {"library_name": "mmcl", "tags": ["mmcl", "contrastive-learning", "multimodal",
                                                             *modalities, str(objective.get("name", "clip"))]}
    index = model_index(model_name, records or [])
    if index:
        meta["model-index"] = index
    source = repo_id or "PATH_OR_REPO_ID"
    body = [
        f"# {model_name}", "",
        f"A joint embedding model over {', '.join(modalities)} trained with mmcl (objective: "
        f"`{objective.get('name', 'clip')}`, embedding size {config['model'].get('embed_dim')}).", "",
        "## Use", "", "```python", "from mmcl import MultimodalModel", "",
        f'model = MultimodalModel.from_pretrained("{source}")',
        "embeddings = model.encode(inputs)  # {modality: batch} -> {modality: [N, D]} L2-normalised", "```", "",
        "## Modalities", "", *_modality_rows(config), "",
    ]
    if records:
        datasets = sorted({str(r["dataset"]) for r in records})
        body += ["## Evaluation", "", f"Data: {', '.join(datasets)}.", "", results_table, ""]
    if train_config:
        body += ["## Training configuration", "", "```yaml",
                 yaml.safe_dump(train_config, sort_keys=False).rstrip(), "```", ""]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + "\n".join(body)


def write_model_card(model_dir: str | Path, records: list[dict[str, Any]] | None = None,
                     train_config: dict[str, Any] | None = None, model_name: str = "", repo_id: str = "") -> Path:
    """Write ``model_dir/README.md`` from its ``config.json`` and the given results and training config."""
    from mmcl.eval.suite import results_table

    d = Path(model_dir)
    config = json.loads((d / CONFIG_NAME).read_text())
    name = model_name or (repo_id.split("/")[-1] if repo_id else d.resolve().name)
    by_kind: dict[str, dict[str, Any]] = {}
    for r in records or []:
        by_kind.setdefault(r["task"], {})[r["name"]] = r["metrics"]
    out = d / CARD_NAME
    out.write_text(model_card(config, name, records, train_config, repo_id, results_table(by_kind) if records else ""))
    return out


# ----------------------------------------------------------------------------------------------------
# Loading


def check_weights(path: Path) -> None:
    """Refuse a weights file that is not safetensors (e.g. a pickle renamed), without unpickling it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise HubError(f"{path} is not a safetensors file ({e}); mmcl loads safetensors weights only") from None


def resolve_pretrained(name_or_path: str | Path, *, revision: str | None = None,
                       cache_dir: str | Path | None = None, local_files_only: bool = False,
                       token: str | None = None) -> Path:
    """A local model directory as is; otherwise a Hub repo id (``user/name``, optionally ``hf-hub:``
    prefixed) downloaded into — or, offline (``HF_HUB_OFFLINE=1``, ``local_files_only``, no network),
    found in — the local HF cache. Pickle-based weight files are never downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    from mmcl import __version__

    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise HubError(f"{p} is a file, not a model directory")
    repo_id = str(name_or_path).removeprefix("hf-hub:")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(f"{name_or_path}: no such model directory, nor a Hub repo id") from None
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                   token=token, ignore_patterns=PICKLE_PATTERNS, library_name="mmcl",
                                   library_version=__version__)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{name_or_path}: not a local model directory, and the Hub repo could not be fetched "
                       f"nor found in the local cache ({first})") from None
    return Path(folder)


# ----------------------------------------------------------------------------------------------------
# Publishing


def _strings(spec: dict[str, Any]) -> list[str]:
    """The string values of a modality's config, nested ones (``tower.path``) included."""
    out = []
    for value in spec.values():
        if isinstance(value, dict):
            out += _strings(value)
        elif isinstance(value, str):
            out.append(value)
    return out


def model_files(model_dir: str | Path) -> list[str]:
    """The files of a model directory that are published: config, safetensors weights, model card and the
    files its processors name (tokenizers, the directories of transformers towers)
    — never checkpoint state."""
    d = Path(model_dir)
    if not (d / CONFIG_NAME).is_file():
        raise HubError(f"{d}: not a model directory (no {CONFIG_NAME})")
    if not (d / WEIGHTS_NAME).is_file():
        raise HubError(f"{d}: no {WEIGHTS_NAME} (mmcl publishes safetensors weights only)")
    check_weights(d / WEIGHTS_NAME)
    config = json.loads((d / CONFIG_NAME).read_text())
    files = [CONFIG_NAME, WEIGHTS_NAME]
    for spec in config["model"]["modalities"].values():
        for value in _strings(spec):
            if not value or "/" in value or value in files:
                continue
            if (d / value).is_file():
                files.append(value)
            elif (d / value).is_dir():  # an HF model's config and processor, copied by save_pretrained
                files += [f"{value}/{f.name}" for f in sorted((d / value).iterdir()) if f.is_file()]
    files += [CARD_NAME] if (d / CARD_NAME).is_file() else []
    return files


def push_to_hub(model_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                records: list[dict[str, Any]] | None = None, train_config: dict[str, Any] | None = None,
                commit_message: str = "Upload mmcl model") -> str:
    """Create ``repo_id`` (kept if it exists) and upload the model's files (:func:`model_files`) in one
    commit. With ``records`` or ``train_config`` (or no card yet) the model card is rewritten first.
    Returns the commit URL."""
    from huggingface_hub import HfApi, get_token

    d = Path(model_dir)
    model_files(d)
    if not (token or get_token()):
        raise HubError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    if records or train_config or not (d / CARD_NAME).is_file():
        write_model_card(d, records, train_config, repo_id=repo_id)
    files = model_files(d)
    api = HfApi(token=token, library_name="mmcl")
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(d), repo_id=repo_id, repo_type="model", commit_message=commit_message,
                             allow_patterns=[glob.escape(f) for f in files])
    return str(info.commit_url)
