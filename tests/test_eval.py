"""The eval suite: metrics against brute-force references on hand-made score matrices (ties included),
the linear probe's fit, the plots, every task type on the session's synthetic set with a tiny untrained
model (joint queries, several captions per clip, a manifest, a linear probe), the embedding cache, the
one-line errors before encoding, ``mmcl eval``, and the suite running every N steps during training."""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import statistics
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from test_distributed import tiny_config

from mmcl.cli import main as mmcl_main
from mmcl.config import ConfigError, load_config
from mmcl.eval.linear_probe import fit_logistic_regression, linear_probe
from mmcl.eval.metrics import (
    attribute_match,
    classification_metrics,
    confusion_matrix,
    recall_curve,
    retrieval_metrics,
    true_ranks,
)
from mmcl.eval.plots import confusion_matrix_png, recall_curve_png
from mmcl.eval.suite import EvalError, encode_dataset, load_suite, run_suite
from mmcl.eval.zeroshot import encode_texts
from mmcl.model import MultimodalModel
from mmcl.train.loop import train

# ---------------------------------------------------------------------------------------------------
# Metrics: the expectation over uniformly random tie-breaking, brute-forced over every order


def brute_force(scores: torch.Tensor, positives: torch.Tensor, ks=(1, 5, 10)) -> dict[str, Any]:
    """Per query: the rank of the first positive averaged over every tie-breaking order of the
    candidates (sort by score, then by a permutation), and P(rank <= k)."""
    n_q, n_c = scores.shape
    perms = list(itertools.permutations(range(n_c)))
    ranks, hits, top1 = [], {k: [] for k in ks}, []
    for q in range(n_q):
        r_sum, h_sum, t1 = 0.0, dict.fromkeys(ks, 0.0), torch.zeros(n_c, dtype=torch.float64)
        for perm in perms:
            order = sorted(range(n_c), key=lambda c: (-float(scores[q, c]), perm[c]))
            rank = next(i for i, c in enumerate(order, 1) if positives[q, c])
            r_sum += rank
            for k in ks:
                h_sum[k] += rank <= k
            t1[order[0]] += 1
        ranks.append(r_sum / len(perms))
        for k in ks:
            hits[k].append(h_sum[k] / len(perms))
        top1.append(t1 / len(perms))
    return {"ranks": ranks, "hits": hits, "top1": torch.stack(top1)}


TIED = torch.tensor([
    [0.5, 0.5, 0.5, 0.1, 0.9, 0.5],   # one candidate above, four tied with the positive
    [0.2, 0.2, 0.2, 0.2, 0.2, 0.2],   # everything tied (a collapsed model)
    [0.9, 0.1, 0.3, 0.9, 0.9, 0.0],   # two positives tied with a negative at the top
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],   # no ties, positive last
])
TIED_POS = torch.tensor([
    [1, 0, 0, 0, 0, 0],
    [0, 0, 1, 0, 0, 0],
    [1, 0, 0, 1, 0, 0],
    [1, 0, 0, 0, 0, 0],
], dtype=torch.bool)


def test_retrieval_metrics_equal_the_brute_force_expectation_with_ties():
    ref = brute_force(TIED, TIED_POS, ks=(1, 2, 5))
    got = retrieval_metrics(TIED, TIED_POS, ks=(1, 2, 5))
    for k in (1, 2, 5):
        assert got[f"R@{k}"] == pytest.approx(sum(ref["hits"][k]) / 4, abs=1e-12), k
    assert got["mean_rank"] == pytest.approx(sum(ref["ranks"]) / 4, abs=1e-12)
    assert got["median_rank"] == pytest.approx(statistics.median(ref["ranks"]), abs=1e-12)
    assert got["n"] == 4
    torch.testing.assert_close(true_ranks(TIED, TIED_POS), torch.tensor(ref["ranks"], dtype=torch.float64))
    # Hand values: row 0 ranks 2..5 with equal chance; a collapsed row is chance; the positive last is 6;
    # the first of two positives among three tied is at (3 + 1) / (2 + 1).
    assert ref["ranks"] == pytest.approx([3.5, 3.5, 4 / 3, 6.0])
    curve = recall_curve(TIED, TIED_POS, 6)
    assert curve == pytest.approx([sum(brute_force(TIED, TIED_POS, ks=(k,))["hits"][k]) / 4 for k in range(1, 7)])
    assert curve[-1] == 1.0


def test_retrieval_metrics_without_ties_equal_a_sort():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 30, generator=g)
    positives = torch.rand(40, 30, generator=g) < 0.1
    positives[torch.arange(30), torch.arange(30)] = True  # every query has one, some several
    positives[30:, 0] = True
    got = retrieval_metrics(scores, positives)
    order = scores.argsort(dim=1, descending=True)
    ranks = np.array([1 + next(i for i, c in enumerate(order[q].tolist()) if positives[q, c]) for q in range(40)])
    for k in (1, 5, 10):
        assert got[f"R@{k}"] == pytest.approx(float((ranks <= k).mean()), abs=1e-12)
    assert got["median_rank"] == pytest.approx(float(np.median(ranks)))
    assert got["mean_rank"] == pytest.approx(float(ranks.mean()))


def test_classification_metrics_with_ties_and_absent_classes():
    scores = torch.tensor([
        [0.9, 0.1, 0.1, 0.0, 0.0, 0.0],   # class 0 right
        [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],   # true 1 tied with 0 at the top: acc1 1/2
        [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],   # all tied: acc1 1/6, acc5 5/6
        [0.0, 0.2, 0.1, 0.9, 0.8, 0.7],   # true 2 ranked 5th
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],   # true 0 last
    ])
    labels = torch.tensor([0, 1, 2, 2, 0])
    got = classification_metrics(scores, labels, 6)
    ref = brute_force(scores, F.one_hot(labels, 6).bool(), ks=(1, 5))
    assert got["acc1"] == pytest.approx(sum(ref["hits"][1]) / 5, abs=1e-12)
    assert got["acc5"] == pytest.approx(sum(ref["hits"][5]) / 5, abs=1e-12)
    # Hand values: acc1 = (1 + 1/2 + 1/6 + 0 + 0) / 5; classes 3..5 have no samples and are left out.
    assert got["acc1"] == pytest.approx((1 + 0.5 + 1 / 6) / 5)
    per_class = {c: [ref["hits"][1][i] for i in range(5) if labels[i] == c] for c in (0, 1, 2)}
    mean_recall = statistics.mean(statistics.mean(v) for v in per_class.values())
    assert got["mean_per_class_recall"] == pytest.approx(mean_recall)
    assert got["n"] == 5 and got["n_classes"] == 6
    torch.testing.assert_close(confusion_matrix(scores, labels, 6),
                               torch.zeros(6, 6, dtype=torch.float64).index_add_(0, labels, ref["top1"]))
    assert math.isnan(classification_metrics(scores[:, :4], labels, 4)["acc5"])  # below 5 classes


def test_attribute_match_and_tie_ceiling():
    scores = torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.8, 0.8], [0.5, 0.1, 0.4]])
    same = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    ref = brute_force(scores, torch.eye(3, dtype=torch.bool))["top1"]
    got = attribute_match(scores, same)
    assert got["R@1_attribute_match"] == pytest.approx(float((ref * same).sum(dim=1).mean()))
    assert got["R@1_attribute_match"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert got["R@1_tie_ceiling"] == pytest.approx((1 + 0.5 + 0.5) / 3)


# ---------------------------------------------------------------------------------------------------
# Linear probe and plots


def test_logistic_regression_is_the_optimum_and_the_probe_separates_blobs():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 8, generator=g), dim=1) * 3
    y = torch.arange(3).repeat(40)
    x = centres[y] + 0.3 * torch.randn(120, 8, generator=g)
    w, b = fit_logistic_regression(x, y, 3, weight_decay=1e-2)
    # The objective's gradient vanishes at the returned weights (an independent check of the optimum).
    w_, b_ = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss = F.cross_entropy(x.double() @ w_ + b_, y) + 0.5 * 1e-2 * w_.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, (w_, b_))
    assert gw.abs().max() < 1e-6 and gb.abs().max() < 1e-6
    metrics, scores = linear_probe(x[:90], y[:90], x[90:], y[90:], 3, weight_decays=[0.0, 1e-2, 10.0])
    assert metrics["acc1"] == 1.0 and metrics["n"] == 30 and metrics["n_train"] == 90
    assert metrics["weight_decay"] in (0.0, 1e-2) and scores.shape == (30, 3)


def test_plots_are_pngs(tmp_path: Path):
    labels = torch.arange(4).repeat(3)
    perfect = confusion_matrix(F.one_hot(labels, 4).float(), labels, 4)
    img = Image.open(confusion_matrix_png(perfect, ["up", "down", "left", "right"], tmp_path / "c.png", "t"))
    assert img.format == "PNG" and img.width > 100 and img.height > 100
    colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert (8, 48, 107) in colours  # the diagonal at full recall
    img = Image.open(recall_curve_png({"a->b": [0.1, 0.5, 1.0]}, tmp_path / "r.png", "t"))
    assert img.format == "PNG" and img.size == (560, 360)


# ---------------------------------------------------------------------------------------------------
# Suites on the synthetic set (a tiny untrained model: the numbers are near chance, the machinery is real)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def test_split(synthetic_data: Path) -> str:
    return str(synthetic_data / "test-{000000..000001}.tar")


def write_suite(path: Path, tasks: list[dict], **extra: Any) -> Path:
    path.write_text(yaml.safe_dump({"batch_size": 16, "tasks": tasks, **extra}))
    return path


COLOUR = {"name": "video->colour", "type": "zeroshot_classification", "query": ["video"], "label": "colour",
          "classnames": ["red", "green", "blue", "yellow", "magenta", "cyan"], "templates": ["a {} shape"]}


def test_every_task_type(model: MultimodalModel, synthetic_data: Path, test_split: str, tmp_path: Path):
    # Two captions per clip under json["captions"] (its caption, and its words reversed), as a retrieval
    # set with several references.
    for i in range(2):
        src, dst = synthetic_data / f"test-00000{i}.tar", tmp_path / f"cap-00000{i}.tar"
        with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
            members = [(m, tin.extractfile(m).read()) for m in tin]
            texts = {m.name.split(".")[0]: data.decode() for m, data in members if m.name.endswith(".txt")}
            for member, data in members:
                if member.name.endswith(".json"):
                    meta, text = json.loads(data), texts[member.name.split(".")[0]]
                    meta["captions"] = [text, {"text": " ".join(reversed(text.split()))}]
                    data = json.dumps(meta).encode()
                member.size = len(data)
                tout.addfile(member, io.BytesIO(data))
    captioned = str(tmp_path / "cap-{000000..000001}.tar")
    (tmp_path / "classes.json").write_text(json.dumps({"pitch": ["low", "medium", "high"]}))
    suite = load_suite(write_suite(tmp_path / "suite.yaml", [
        {"name": "video+audio->pitch", "type": "zeroshot_classification", "query": ["video", "audio"],
         "label": "pitch", "classnames": "classes.json#pitch", "templates": ["a {} note", "a {} sound"]},
        {"name": "text->video+audio", "type": "retrieval", "query": ["text"], "candidates": ["video", "audio"],
         "match_labels": ["colour", "shape"]},
        {"name": "captions->video", "type": "retrieval", "query": ["text"], "candidates": ["video"],
         "data": captioned, "captions": "captions", "dataset": "captioned"},
        {"name": "video->captions", "type": "retrieval", "query": ["video"], "candidates": ["text"],
         "data": captioned, "captions": "captions"},
        {"name": "audio probe", "type": "linear_probe", "query": ["audio"], "label": "pitch",
         "train_data": str(synthetic_data / "train-{000000..000003}.tar"), "weight_decays": [0.0, 0.1]},
    ]))
    out = tmp_path / "out"
    results = run_suite(model, suite, test_split, out_dir=out, model_name="tiny", progress=False)

    zs, rt, lp = results["zeroshot_classification"], results["retrieval"], results["linear_probe"]
    assert zs["video+audio->pitch"]["n"] == 32 and zs["video+audio->pitch"]["n_classes"] == 3
    assert rt["text->video+audio"]["n"] == 32 and 0 < rt["text->video+audio"]["R@1_tie_ceiling"] <= 1
    assert rt["captions->video"]["n"] == 64 and rt["video->captions"]["n"] == 32
    assert lp["audio probe"]["n_train"] == 64 and lp["audio probe"]["weight_decay"] in (0.0, 0.1)
    assert results["eval_data"]["skipped"] == {}

    # The multi-caption numbers against an independent computation from the model's embeddings.
    enc = encode_dataset(model, captioned, ["video"], 16, progress=False)
    caps = [[m["captions"][0], m["captions"][1]["text"]] for m in enc["meta"]]
    text = encode_texts(model, [c for pair in caps for c in pair])
    cos = text @ enc["emb"]["video"].T  # CLIP scores: cosines of unit vectors
    assert len(set(cos.flatten().tolist())) == cos.numel()  # no ties: a plain sort is the reference
    owner = torch.arange(32).repeat_interleave(2)
    ranks_t2v = [1 + int((cos[i] > cos[i, owner[i]]).sum()) for i in range(64)]
    best = torch.stack([cos[owner == j, j].max() for j in range(32)])
    ranks_v2t = [1 + int((cos[:, j] > best[j]).sum()) for j in range(32)]
    for name, ranks in (("captions->video", ranks_t2v), ("video->captions", ranks_v2t)):
        for k in (1, 5, 10):
            assert rt[name][f"R@{k}"] == pytest.approx(np.mean(np.array(ranks) <= k), abs=1e-6), (name, k)
        assert rt[name]["mean_rank"] == pytest.approx(np.mean(ranks), abs=1e-4)

    # Reports: one JSON per task in the CLIP_benchmark form, the summary, a plot per task.
    record = json.loads((out / "retrieval_captions_to_video.json").read_text())
    assert record == {"dataset": "captioned", "model": "tiny", "task": "retrieval", "name": "captions->video",
                      "metrics": rt["captions->video"]}
    saved = json.loads((out / "results.json").read_text())["linear_probe"]["audio probe"]
    assert saved == pytest.approx(lp["audio probe"], nan_ok=True)
    summary = (out / "summary.md").read_text()
    assert "| video+audio->pitch |" in summary and "| audio probe |" in summary
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["linear_probe_audio_probe_confusion.png", "retrieval_captions_to_video_recall.png",
                    "retrieval_text_to_video_audio_recall.png", "retrieval_video_to_captions_recall.png",
                    "zeroshot_classification_video_audio_to_pitch_confusion.png"]


def test_classnames_from_labels_and_per_query_ranks(model, test_split: str, tmp_path: Path):
    """``classnames: from_labels`` is the sorted distinct labels of the evaluated data (through
    ``classname_map``); ``<type>_<task>_ranks.jsonl`` holds per query its key, the rank of its true item and
    the top 5, against a hand computation from the model's embeddings (cosines: the CLIP objective's order)."""
    keys, colours = [], []
    for i in range(2):
        with tarfile.open(test_split.replace("{000000..000001}", f"00000{i}")) as tf:
            for member in tf:
                if member.name.endswith(".json"):
                    keys.append(member.name.split(".")[0])
                    colours.append(json.loads(tf.extractfile(member).read())["labels"]["colour"])
    present = sorted(set(colours))
    assert len(present) >= 5  # so that the top 5 of classification is not every class
    (tmp_path / "names.json").write_text(json.dumps({"map": {c: f"{c} coloured" for c in present}}))
    suite = load_suite(write_suite(tmp_path / "s.yaml", [
        {**COLOUR, "name": "listed", "classnames": present},
        {**COLOUR, "name": "from labels", "classnames": "from_labels"},
        {**COLOUR, "name": "mapped", "classnames": "from_labels", "classname_map": "names.json#map"},
        {"name": "text->video", "type": "retrieval", "query": ["text"], "candidates": ["video"]}]))
    out = tmp_path / "out"
    results = run_suite(model, suite, test_split, out_dir=out, progress=False)["zeroshot_classification"]
    assert results["from labels"] == results["listed"] and results["listed"]["n_classes"] == len(present)

    enc = encode_dataset(model, test_split, ["video", "text"], 16, progress=False)
    assert enc["keys"] == keys
    names = [f"{c} coloured" for c in present]
    classifier = F.normalize(encode_texts(model, [f"a {n} shape" for n in names]), dim=-1)
    tasks = {"zeroshot_classification_mapped": (enc["emb"]["video"] @ classifier.T, names,
                                                [names[present.index(c)] for c in colours]),
             "retrieval_text_to_video": (enc["emb"]["text"] @ enc["emb"]["video"].T, keys, keys)}
    for stem, (cos, candidates, truth) in tasks.items():
        lines = [json.loads(line) for line in (out / f"{stem}_ranks.jsonl").read_text().splitlines()]
        assert [r["key"] for r in lines] == keys
        for row, line, true in zip(cos, lines, truth):
            assert len(set(row.tolist())) == row.numel()  # no ties: a plain sort is the reference
            j = candidates.index(true)
            assert line["rank"] == 1 + int((row > row[j]).sum())
            assert line["top5"] == [candidates[c] for c in row.argsort(descending=True)[:5].tolist()]
            if stem.startswith("zeroshot"):
                assert line["label"] == true
    acc1 = np.mean([json.loads(line)["rank"] == 1
                    for line in (out / "zeroshot_classification_mapped_ranks.jsonl").read_text().splitlines()])
    assert results["mapped"]["acc1"] == pytest.approx(acc1, abs=1e-6)
    assert sorted(p.name for p in out.glob("*_ranks.jsonl")) == [
        "retrieval_text_to_video_ranks.jsonl", "zeroshot_classification_from_labels_ranks.jsonl",
        "zeroshot_classification_listed_ranks.jsonl", "zeroshot_classification_mapped_ranks.jsonl"]


def test_cached_embeddings_are_reused_and_equal(model, test_split: str, tmp_path: Path, caplog):
    tasks = [COLOUR, {"name": "text->video", "type": "retrieval", "query": ["text"], "candidates": ["video"]}]
    first = run_suite(model, load_suite(write_suite(tmp_path / "a.yaml", tasks)), test_split, out_dir=tmp_path / "o",
                      progress=False)
    other = [{**COLOUR, "templates": ["the {} one", "{}"]}, tasks[1]]
    suite = load_suite(write_suite(tmp_path / "b.yaml", other))
    with caplog.at_level(logging.INFO, logger="mmcl.eval.suite"):
        cached = run_suite(model, suite, test_split, out_dir=tmp_path / "o", progress=False)
    assert "from the cache" in caplog.text
    fresh = run_suite(model, suite, test_split, out_dir=tmp_path / "o", cache=False, progress=False)
    assert cached == fresh  # bitwise: the cache holds the float32 embeddings
    assert cached["retrieval"] == first["retrieval"]
    assert len(list((tmp_path / "o" / "cache" / "embeddings").glob("*.safetensors"))) == 1


def test_manifest_dataset(model, synthetic_data: Path, tmp_path: Path, monkeypatch):
    """A JSONL manifest of media files: built into shards once (cached by content), then evaluated."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    rows = []
    with tarfile.open(synthetic_data / "test-000000.tar") as tf:
        for member in tf:
            key, ext = member.name.split(".", 1)
            if ext in ("mp4", "flac"):
                (tmp_path / member.name).write_bytes(tf.extractfile(member).read())
            if ext == "json" and len(rows) < 6:
                meta = json.loads(tf.extractfile(member).read())
                rows.append({"key": key, "video": f"{key}.mp4", "audio": f"{key}.flac",
                             "labels": meta["labels"], "text": "a clip"})
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pitches = sorted({r["labels"]["pitch"] for r in rows})
    suite = load_suite(write_suite(tmp_path / "s.yaml", [
        {"name": "audio->pitch", "type": "zeroshot_classification", "query": ["audio"], "label": "pitch",
         "classnames": pitches, "data": str(manifest)}]))
    results = run_suite(model, suite, progress=False)
    assert results["zeroshot_classification"]["audio->pitch"]["n"] == 6
    assert len(list((tmp_path / "xdg" / "mmcl" / "manifests").iterdir())) == 1


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, before encoding starts


@pytest.mark.parametrize("task, message", [
    ({**COLOUR, "classnames": [*COLOUR["classnames"], "purple"]}, "class 'purple' has no samples"),
    ({**COLOUR, "classnames": ["red", "green"]}, "is not among the 2 class names ('red', 'green')"),
    ({**COLOUR, "classnames": ["red", *"abcdef"]}, "is not among the 7 class names ('red', 'a', 'b', 'c', 'd', ...)"),
    ({**COLOUR, "query": ["depth"]}, "model has no modality 'depth'"),
    ({**COLOUR, "label": "size"}, "has no label 'size' in its json (a zeroshot_classification task needs labelled"),
    ({"name": "t", "type": "retrieval", "query": ["text"], "candidates": ["video"], "captions": "refs"},
     "has no captions under 'refs'"),
    ({**COLOUR, "data": "/nonexistent/shard-{000..001}.tar"}, "shard not found"),
    ({**COLOUR, "classnames": "from_labels", "classname_map": {"red": "red"}},
     "label 'blue' in "),
    ({**COLOUR, "classnames": "from_labels", "classname_map": {c: "one" for c in COLOUR["classnames"]}},
     "classname_map maps labels 'blue' and 'cyan' to the same class name 'one'"),
])
def test_bad_data_fails_before_encoding(model, test_split: str, tmp_path: Path, monkeypatch, task, message):
    def tripwire(*args, **kwargs):
        raise AssertionError("encoding started")

    monkeypatch.setattr(model, "encode", tripwire)
    suite = load_suite(write_suite(tmp_path / "s.yaml", [task]))
    with pytest.raises(EvalError) as e:
        run_suite(model, suite, test_split, progress=False)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("tasks, message", [
    ([{**COLOUR, "type": "captioning"}], "suite.tasks[0].type: 'captioning' is not allowed"),
    ([{**COLOUR, "label": ""}], "suite.tasks[0].label: a zeroshot_classification task needs the label key"),
    ([{**COLOUR, "templates": ["a shape"]}], "has no {} for the class name"),
    ([{**COLOUR, "classnames": "missing.json"}], "classnames: file not found"),
    ([{"name": "p", "type": "linear_probe", "query": ["audio"], "label": "pitch"}], "needs a training split"),
    ([{"name": "r", "type": "retrieval", "query": ["video"], "candidates": ["video"]}], "both a query and a candidate"),
    ([COLOUR, COLOUR], "'video->colour' is used by another task"),
    ([{**COLOUR, "classname_map": "missing.json"}], "classname_map: file not found"),
    ([{"name": "r", "type": "retrieval", "query": ["text"], "candidates": ["video"], "classname_map": {"a": "b"}}],
     "classname_map: only for zeroshot_classification and linear_probe tasks"),
])
def test_bad_suite_files(tmp_path: Path, tasks, message):
    with pytest.raises(ConfigError) as e:
        load_suite(write_suite(tmp_path / "s.yaml", tasks))
    assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------
# The command line, and the suite during training


def test_mmcl_eval_command(model, test_split: str, tmp_path: Path, capsys):
    saved = model.save_pretrained(tmp_path / "m")
    suite = write_suite(tmp_path / "s.yaml", [COLOUR])
    out = tmp_path / "eval"
    args = ["eval", "--suite", str(suite), "--model", str(saved), "--data", test_split, "--out", str(out),
            "--no-progress"]
    assert mmcl_main(args) == 0
    assert "| video->colour |" in capsys.readouterr().out
    assert (out / "zeroshot_classification_video_to_colour_confusion.png").is_file()
    direct = run_suite(model, load_suite(suite), test_split, progress=False)
    written = json.loads((out / "results.json").read_text())
    assert written["zeroshot_classification"] == direct["zeroshot_classification"]
    assert mmcl_main(["eval", "--suite", str(suite), "--model", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmcl eval: error:") and "no config.json" in err and "\n" not in err


def test_suite_runs_every_n_steps_during_training(synthetic_data: Path, test_split: str, tmp_path: Path):
    suite = write_suite(tmp_path / "s.yaml", [
        {**COLOUR, "name": "colour"},
        {"name": "t2v", "type": "retrieval", "query": ["text"], "candidates": ["video"]}])
    base = tiny_config(synthetic_data, shards=2)
    base["train"].update(steps=4, checkpoint_every=0, log_keys=False)
    base["data"]["test"] = test_split
    base["eval"] = {"suite": str(suite), "every": 2}
    out = tmp_path / "run"
    summary = train(load_config(base=base), out)
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval/zeroshot_classification/colour/acc1" in r]
    assert [r["step"] for r in evals] == [2]
    assert {"eval/retrieval/t2v/R@1", "eval/retrieval/t2v/median_rank"} <= set(evals[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "tb")).Reload().Tags()["scalars"]
    assert {"eval/zeroshot_classification/colour/acc1", "eval/retrieval/t2v/R@5"} <= set(tags)
    # The end-of-training run of the same suite: its reports, and its numbers in the run's summary.
    assert summary["zeroshot_classification"]["colour"]["n"] == 32
    assert (out / "eval" / "retrieval_t2v_recall.png").is_file()
