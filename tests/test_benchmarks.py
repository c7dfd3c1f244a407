"""The community benchmarks from local copies: for each of the nine, a mini-copy in its released layout
(metadata files with the real names, columns and format, a few 1 s clips per class made with ffmpeg, one
clip listed but absent) is read, built into shards, evaluated with a tiny untrained model and reported;
multi-label mAP against scikit-learn (ties and classes without a positive included) and mAP@10 against
a brute force over every tie-breaking order; class-name cleaning and templates as the data files say; the
one-line errors (a path of another layout, a model without the modality, an unknown protocol)."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import average_precision_score
from test_distributed import tiny_config

from mmcl.cli import main as mmcl_main
from mmcl.config import load_config
from mmcl.data.window import WindowConfig
from mmcl.errors import ConfigError, DataError, EvalError
from mmcl.eval.benchmarks import benchmark_names, clean_name, get_benchmark, run_benchmark
from mmcl.eval.benchmarks.runner import benchmark_window
from mmcl.eval.metrics import average_precision, map_at_k, multilabel_metrics
from mmcl.eval.suite import encode_dataset
from mmcl.eval.zeroshot import encode_texts
from mmcl.hub import read_eval_dir
from mmcl.model import MultimodalModel

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg makes the test media")
TONES = [300, 700, 1500, 2500]
COLOURS = ["red", "green", "blue", "yellow"]


# ---------------------------------------------------------------------------------------------------
# Metrics


def test_average_precision_equals_scikit_learn_with_ties_and_a_class_without_positives():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40, 6), generator=g).float()  # many ties
    scores[:, 5] = torch.randn(40, generator=g)                    # and a class without ties
    targets = torch.rand(40, 6, generator=g) < 0.3
    targets[:, 2] = False                                          # no positive: AP undefined
    targets[0, 4] = True
    ap = average_precision(scores, targets)
    for c in range(6):
        if c == 2:
            assert torch.isnan(ap[c])
        else:
            ref = average_precision_score(targets[:, c].numpy(), scores[:, c].numpy())
            assert ap[c].item() == pytest.approx(ref, abs=1e-12), c
    m = multilabel_metrics(scores, targets)
    ref = [average_precision_score(targets[:, c].numpy(), scores[:, c].numpy()) for c in range(6) if c != 2]
    assert m["mAP"] == pytest.approx(sum(ref) / len(ref), abs=1e-12)
    assert (m["n"], m["n_classes"], m["n_classes_scored"]) == (40, 6, 5)


def _brute_map(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """AP@K averaged over every tie-breaking order of the candidates, then over queries."""
    n_q, n_c = scores.shape
    perms = list(itertools.permutations(range(n_c)))
    total = 0.0
    for q in range(n_q):
        m = int(positives[q].sum())
        acc = 0.0
        for perm in perms:
            order = sorted(range(n_c), key=lambda c: (-float(scores[q, c]), perm[c]))
            hits, ap = 0, 0.0
            for i, c in enumerate(order[:k], 1):
                if positives[q, c]:
                    hits += 1
                    ap += hits / i
            acc += ap / min(m, k)
        total += acc / len(perms)
    return total / n_q


def test_map_at_k_equals_the_brute_force_expectation_over_ties():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1, 0.9, 0.5],
                           [0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
                           [0.9, 0.1, 0.3, 0.9, 0.9, 0.0],
                           [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                           [0.3, 0.3, 0.7, 0.3, 0.3, 0.1]])
    positives = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1], [1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0],
                              [1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    for k in (1, 2, 3, 6):
        assert map_at_k(scores, positives, k) == pytest.approx(_brute_map(scores, positives, k), abs=1e-12), k
    # One positive, no ties: the mean reciprocal rank cut at K.
    g = torch.Generator().manual_seed(1)
    s = torch.randn(20, 30, generator=g)
    pos = torch.zeros(20, 30, dtype=torch.bool)
    pos[torch.arange(20), torch.arange(20)] = True
    ranks = 1 + (s > s[torch.arange(20), torch.arange(20)][:, None]).sum(1)
    assert map_at_k(s, pos, 10) == pytest.approx(torch.where(ranks <= 10, 1.0 / ranks, 0.0).mean().item())


# ---------------------------------------------------------------------------------------------------
# Data files: cleaning, templates, protocols


def test_class_names_are_cleaned_and_templates_shipped_as_the_data_files_say():
    assert clean_name("dog_bark", ["underscores"]) == "dog bark"
    assert clean_name("ApplyEyeMakeup", ["camel_case"]) == "Apply Eye Makeup"
    assert clean_name('"air drumming"', ["strip_quotes"]) == "air drumming"
    assert clean_name("x", [], {"x": "an x"}) == "an x"
    with pytest.raises(ConfigError, match="unknown rule 'title'"):
        clean_name("a", ["title"])
    esc = get_benchmark("esc50")
    assert len(esc.classes) == 50 and esc.classes[0] == "dog" and esc.classes[-1] == "hand_saw"
    assert esc.clean("door_wood_knock") == "door wood knock"
    assert esc.spec["templates"] == ["This is a sound of {}."]
    assert set(esc.protocols) == {"all", "fold1"} and esc.protocol(None) == "all"
    us8k = get_benchmark("urbansound8k")
    assert [us8k.clean(c) for c in us8k.classes][3] == "dog bark" and len(us8k.classes) == 10
    ucf = get_benchmark("ucf101")
    assert len(ucf.spec["templates"]) == 48 and ucf.clean("YoYo") == "Yo Yo"
    assert len(get_benchmark("kinetics400").spec["templates"]) == 28
    assert set(benchmark_names()) == {"esc50", "urbansound8k", "audioset", "vggsound", "ucf101", "kinetics400",
                                      "audiocaps", "clotho", "msrvtt"}
    for name in benchmark_names():
        b = get_benchmark(name)
        assert b.spec["default_protocol"] in b.protocols
        assert all(p.get("description") for p in b.protocols.values())
        for t in b.tasks:
            assert all("{}" in x for x in t.get("templates", b.spec.get("templates", ["{}"])))
    with pytest.raises(ConfigError, match="no protocol 'fold9' .allowed: all, fold1."):
        esc.protocol("fold9")


# ---------------------------------------------------------------------------------------------------
# Mini-copies in the released layouts


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


class Media:
    """One 1 s clip per class index (a tone; a coloured 32x32 video with the tone), made once and copied."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _made(self, kind: str, c: int) -> Path:
        path = self.root / f"{kind}{c}.{kind}"  # kind: wav, mp4 (H.264 + AAC) or avi (MPEG-4 part 2, silent)
        if not path.exists():
            tone = ["-f", "lavfi", "-i", f"sine=frequency={TONES[c]}:duration=1:sample_rate=16000"]
            if kind == "wav":
                ffmpeg(*tone, "-ac", "1", str(path))
            else:
                video = ["-f", "lavfi", "-i", f"color=c={COLOURS[c]}:s=32x32:d=1:r=8"]
                codec = (["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac"] if kind == "mp4"
                         else ["-c:v", "mpeg4", "-an"])
                ffmpeg(*video, *tone, "-shortest", *codec, str(path))
        return path

    def put(self, dest: Path, c: int, kind: str = "wav") -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._made(kind, c), dest)


def csv_text(header: str | None, rows: list[str]) -> str:
    return "".join(f"{line}\n" for line in ([header] if header else []) + rows)


def make_esc50(root: Path, media: Media) -> dict[str, Any]:
    rows, n = [], 0
    for target, cat in [(0, "dog"), (1, "rooster"), (10, "rain")]:
        for fold in (1, 2):
            name = f"{fold}-1000{target}{fold}-A-{target}.wav"
            rows.append(f"{name},{fold},{target},{cat},{target != 1},1000{target}{fold},A")
            media.put(root / "audio" / name, [0, 1, 10].index(target))
            n += 1
    rows.append("5-999999-A-0.wav,5,0,dog,True,999999,A")  # listed, not in the copy
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "esc50.csv").write_text(csv_text("filename,fold,target,category,esc10,src_file,take", rows))
    return {"clips": n, "tasks": {"zeroshot_classification_esc50_audio": n}, "classes": 50}


def make_urbansound8k(root: Path, media: Media) -> dict[str, Any]:
    rows = []
    for i, (cid, cls) in enumerate([(3, "dog_bark"), (6, "gun_shot"), (8, "siren")]):
        for fold in (1, 5):
            name = f"1{cid}{fold}00-{cid}-0-{fold}.wav"
            rows.append(f"{name},1{cid}{fold}00,0.0,1.0,1,{fold},{cid},{cls}")
            media.put(root / "audio" / f"fold{fold}" / name, i)
    rows.append("99-3-0-0.wav,99,0.0,1.0,2,10,3,dog_bark")
    (root / "metadata").mkdir(parents=True)
    (root / "metadata" / "UrbanSound8K.csv").write_text(
        csv_text("slice_file_name,fsID,start,end,salience,fold,classID,class", rows))
    return {"clips": 6, "tasks": {"zeroshot_classification_urbansound8k_audio": 6}, "classes": 10}


AUDIOSET_CLASSES = [("0", "/m/09x0r", "Speech"), ("1", "/m/05zppz", "Male speech, man speaking"),
                    ("72", "/m/0bt9lr", "Dog"), ("137", "/m/04rlf", "Music")]


def make_audioset(root: Path, media: Media) -> dict[str, Any]:
    (root / "eval_segments").mkdir(parents=True)
    labels = [[0], [0, 2], [2], [3], [3, 0], [2, 3]]  # class 1 (male speech) has no positive
    rows = []
    for i, ls in enumerate(labels):
        ytid = f"-{i}xYz_{i}Ab{i}"
        mids = ",".join(AUDIOSET_CLASSES[c][1] for c in ls)
        rows.append(f'{ytid}, {10 * i}.000, {10 * i + 10}.000, "{mids}"')
        if i == 5:  # a video clip: only its audio track is built (no task reads video)
            media.put(root / "eval_segments" / f"Y{ytid}.mp4", ls[0], "mp4")
        else:
            media.put(root / "eval_segments" / (f"Y{ytid}.wav" if i % 2 else f"{ytid}_{10 * i}.000.flac"), ls[0])
    rows.append('zzMissing01, 0.000, 10.000, "/m/09x0r"')
    (root / "eval_segments.csv").write_text(
        "# Segments csv created Sun Mar  5 10:54:25 2017\n# num_ykey=7, num_segs=7, num_labels=4\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n" + csv_text(None, rows))
    (root / "class_labels_indices.csv").write_text(
        csv_text("index,mid,display_name", [f'{i},{m},"{d}"' for i, m, d in AUDIOSET_CLASSES]))
    return {"clips": 6, "tasks": {"zeroshot_classification_audioset_audio": 6}, "classes": 4}


def make_vggsound(root: Path, media: Media) -> dict[str, Any]:
    rows = []
    for c, label in enumerate(["dog barking", "people marching", "playing violin, fiddle"]):
        for j in range(2):
            ytid, start = f"v{c}{j}abcdefgh", 30 * j + c
            rows.append(f'{ytid},{start},"{label}",test')
            media.put(root / "video" / f"{ytid}_{start:06d}.mp4", c, "mp4")
        rows.append(f'tr{c}abcdefgh,0,"{label}",train')  # the train split: not evaluated
    rows.append('missingvid1,10,"dog barking",test')
    rows.append('trainonly01,10,"lions roaring",train')   # a class only the train split has
    (root / "vggsound.csv").write_text(csv_text(None, rows))
    tasks = {f"zeroshot_classification_vggsound_{t}": 6 for t in ("audio", "video", "video_audio")}
    return {"clips": 6, "tasks": tasks, "classes": 4, "listed": 7}


def make_ucf101(root: Path, media: Media) -> dict[str, Any]:
    classes = ["ApplyEyeMakeup", "Archery", "YoYo"]
    (root / "ucfTrainTestlist").mkdir(parents=True)
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    test = []
    for c, name in enumerate(classes):
        for g in (1, 2):
            rel = f"{name}/v_{name}_g0{g}_c01.avi"
            test.append(rel)
            media.put(root / "UCF-101" / rel, c, "avi")
    test.append("Archery/v_Archery_g07_c03.avi")
    (root / "ucfTrainTestlist" / "testlist01.txt").write_text("".join(f"{t}\r\n" for t in test))
    (root / "ucfTrainTestlist" / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n")
    return {"clips": 6, "tasks": {"zeroshot_classification_ucf101_video": 6}, "classes": 3}


def make_kinetics400(root: Path, media: Media) -> dict[str, Any]:
    rows = []
    for c, label in enumerate(["abseiling", '"air drumming"', "zumba"]):
        for j in range(2):
            ytid, t0 = f"k{c}{j}-bcdefgh", 10 * j
            rows.append(f"{label},{ytid},{t0},{t0 + 10},val")
            media.put(root / "val" / f"{ytid}_{t0:06d}_{t0 + 10:06d}.mp4", c, "mp4")
    rows.append("zumba,kMISSING000,0,10,val")
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "val.csv").write_text(csv_text("label,youtube_id,time_start,time_end,split", rows))
    return {"clips": 6, "tasks": {"zeroshot_classification_kinetics400_video": 6}, "classes": 3}


CAPTION_WORDS = ["a dog barks", "rain falls on a roof", "a violin plays", "an engine hums"]


def make_audiocaps(root: Path, media: Media) -> dict[str, Any]:
    rows, cap_id = [], 100
    for c in range(4):
        ytid, start = f"ac{c}-xyzwv1", 30 + c
        for j in range(5):
            rows.append(f"{cap_id},{ytid},{start},{CAPTION_WORDS[c]} number {j}")
            cap_id += 1
        media.put(root / "test" / (f"{ytid}_{start}.wav" if c % 2 else f"Y{ytid}.wav"), c)
    rows += [f"{cap_id + j},acMISSING01,0,a caption {j}" for j in range(5)]
    (root / "test.csv").write_text(csv_text("audiocap_id,youtube_id,start_time,caption", rows))
    return {"clips": 4, "tasks": {"retrieval_audiocaps_text_to_audio": 20, "retrieval_audiocaps_audio_to_text": 4}}


def make_clotho(root: Path, media: Media) -> dict[str, Any]:
    rows = []
    for c, name in enumerate(["Santa Motor.wav", "Rain_on_roof 2.wav", "violin (1).wav"]):
        caps = [f'"{CAPTION_WORDS[c]}, take {j}"' for j in range(5)]
        rows.append(f'{name},{",".join(caps)}')
        media.put(root / "evaluation" / name, c)
    rows.append("gone.wav," + ",".join(f"caption {j}" for j in range(5)))
    (root / "clotho_captions_evaluation.csv").write_text(
        csv_text("file_name,caption_1,caption_2,caption_3,caption_4,caption_5", rows))
    return {"clips": 3, "tasks": {"retrieval_clotho_text_to_audio": 15, "retrieval_clotho_audio_to_text": 3}}


def make_msrvtt(root: Path, media: Media) -> dict[str, Any]:
    rows, sentences = [], []
    for c in range(3):
        vid = f"video{7000 + c}"
        rows.append(f"ret{c},msr{7000 + c},{vid},{CAPTION_WORDS[c]} in a video")
        sentences += [{"caption": f"{CAPTION_WORDS[c]} {j}", "video_id": vid, "sen_id": 10 * c + j} for j in range(3)]
        media.put(root / "videos" / "all" / f"{vid}.mp4", c, "mp4")
    rows.append("ret9,msr7999,video7999,a missing video")
    (root / "MSRVTT_JSFUSION_test.csv").write_text(csv_text("key,vid_key,video_id,sentence", rows))
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    tasks = {f"retrieval_msrvtt_{t}": 3 for t in ("text_to_video", "video_to_text", "text_to_video_audio")}
    return {"clips": 3, "tasks": tasks}


MAKERS: dict[str, Callable[[Path, Media], dict[str, Any]]] = {
    "esc50": make_esc50, "urbansound8k": make_urbansound8k, "audioset": make_audioset, "vggsound": make_vggsound,
    "ucf101": make_ucf101, "kinetics400": make_kinetics400, "audiocaps": make_audiocaps, "clotho": make_clotho,
    "msrvtt": make_msrvtt}


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    return Media(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _independent_classification(model, spec: str, mod: str, classnames: list[str], templates: list[str],
                                labels: Callable[[dict], Any]) -> tuple[torch.Tensor, list[Any]]:
    """Cosine scores of the built clips (in the model's default window) against the mean prompt embeddings,
    computed here."""
    enc = encode_dataset(model, spec, [mod], 8, progress=False, clip=benchmark_window(model)[0])
    prompts = encode_texts(model, [t.format(c) for c in classnames for t in templates])
    classifier = F.normalize(prompts.view(len(classnames), len(templates), -1).mean(1), dim=-1)
    return enc["emb"][mod] @ classifier.T, [labels(m) for m in enc["meta"]]


@needs_ffmpeg
@pytest.mark.parametrize("name", list(MAKERS))
def test_benchmark_from_a_mini_copy_in_its_released_layout(name: str, model: MultimodalModel, media: Media,
                                                          tmp_path: Path, one_thread):
    root = tmp_path / f"{name}-copy"
    root.mkdir()
    expected = MAKERS[name](root, media)
    out = tmp_path / "out"
    results = run_benchmark(model, name, root, out, cache_dir=tmp_path / "cache", model_name="tiny", progress=False)
    info = results["benchmark"]
    assert (info["missing"], info["rejected"]) == (1, 0)
    assert info["n"] == expected.get("listed", expected["clips"] + 1)
    bench = get_benchmark(name)
    assert info["protocol"] == bench.spec["default_protocol"]
    files = {p.stem for p in out.glob("*.json")} - {"results"}
    assert files == set(expected["tasks"])
    for stem, n in expected["tasks"].items():
        report = json.loads((out / f"{stem}.json").read_text())
        assert {"dataset", "model", "task", "metrics", "language", "protocol", "n", "missing"} <= set(report)
        assert (report["dataset"], report["model"], report["language"]) == (name, "tiny", "en")
        assert (report["protocol"], report["n"], report["missing"]) == (info["protocol"], info["n"], 1)
        assert report["metrics"]["n"] == n, stem
        if report["task"] == "zeroshot_classification" and "mAP" not in report["metrics"]:
            assert report["metrics"]["n_classes"] == expected["classes"]
            assert 0.0 <= report["metrics"]["acc1"] <= 1.0
        if name in ("audiocaps", "clotho"):
            assert 0.0 <= report["metrics"]["mAP@10"] <= 1.0
    assert (out / "missing.txt").read_text().count("\tmissing") == 1
    summary = (out / "summary.md").read_text()
    assert ("| multi-label task | mAP |" in summary) == (name == "audioset")
    assert (" mAP@10 |" in summary) == (name in ("audiocaps", "clotho"))

    # The numbers against an independent computation from the model's own embeddings of the built clips.
    spec = info["shards"]
    metrics = results["zeroshot_classification"].get(f"{name} audio")
    if name == "esc50":
        classnames = [bench.clean(c) for c in bench.classes]
        scores, labels = _independent_classification(model, spec, "audio", classnames, bench.spec["templates"],
                                                     lambda m: classnames.index(m["labels"]["label"]))
        labels = torch.tensor(labels)
        top = scores.topk(5, dim=1).indices
        assert all(len(set(row.tolist())) == row.numel() for row in scores)  # no ties: top-k is the reference
        assert metrics["acc1"] == pytest.approx((top[:, 0] == labels).double().mean().item())
        assert metrics["acc5"] == pytest.approx((top == labels[:, None]).any(1).double().mean().item())
    if name == "audioset":
        with tarfile.open(spec) as tar:
            assert sorted({m.name.rsplit(".", 1)[1] for m in tar}) == ["flac", "json"]
        classnames = [d for _, _, d in AUDIOSET_CLASSES]
        scores, labels = _independent_classification(model, spec, "audio", classnames, bench.spec["templates"],
                                                      lambda m: m["labels"]["label"])
        targets = [[c in ls for c in classnames] for ls in labels]
        aps = [average_precision_score([t[c] for t in targets], scores[:, c].numpy()) for c in (0, 2, 3)]
        assert metrics["mAP"] == pytest.approx(sum(aps) / 3, abs=1e-6)
        assert (metrics["n_classes"], metrics["n_classes_scored"]) == (4, 3)
    if name == "clotho":
        enc = encode_dataset(model, spec, ["audio"], 8, progress=False, clip=benchmark_window(model)[0])
        caps = [c for m in enc["meta"] for c in m["extra"]["captions"]]
        assert len(caps) == 15 and caps[0] == "a dog barks, take 0"
        cos = encode_texts(model, caps) @ enc["emb"]["audio"].T
        owner = torch.arange(3).repeat_interleave(5)
        ranks = 1 + (cos > cos[torch.arange(15), owner][:, None]).sum(1)
        t2a = results["retrieval"]["clotho text->audio"]
        assert t2a["R@1"] == pytest.approx((ranks == 1).double().mean().item())
        assert t2a["mAP@10"] == pytest.approx((1.0 / ranks.double()).mean().item())

    # A second run reuses the shards and the embeddings: same numbers.
    again = run_benchmark(model, name, root, tmp_path / "out2", cache_dir=tmp_path / "cache", model_name="tiny",
                          progress=False)
    assert again["benchmark"]["shards"] == spec
    assert again["zeroshot_classification"] == results["zeroshot_classification"]
    assert again["retrieval"] == results["retrieval"]


@needs_ffmpeg
def test_protocols_name_their_split(model: MultimodalModel, media: Media, tmp_path: Path, one_thread):
    esc = tmp_path / "ESC-50-master"
    esc.mkdir()
    make_esc50(esc, media)
    r = run_benchmark(model, "esc50", esc, tmp_path / "fold1", protocol="fold1", cache_dir=tmp_path / "c",
                      progress=False)
    report = json.loads((tmp_path / "fold1" / "zeroshot_classification_esc50_audio.json").read_text())
    assert report["protocol"] == "fold1" and "fold 1" in report["protocol_description"]
    assert r["zeroshot_classification"]["esc50 audio"]["n"] == 3 and report["n"] == 3 and report["missing"] == 0
    vtt = tmp_path / "MSRVTT"
    vtt.mkdir()
    make_msrvtt(vtt, media)
    r = run_benchmark(model, "msrvtt", vtt, tmp_path / "vtt", protocol="1k-A-20", cache_dir=tmp_path / "c",
                      progress=False)
    assert r["retrieval"]["msrvtt text->video"]["n"] == 9 and r["retrieval"]["msrvtt video->text"]["n"] == 3


# ---------------------------------------------------------------------------------------------------
# The command line: one benchmark, the standard suite, bad input


@needs_ffmpeg
def test_cli_standard_suite_writes_one_table_and_the_model_index(model: MultimodalModel, media: Media,
                                                                 tmp_path: Path, capsys, one_thread):
    saved = tmp_path / "model"
    model.save_pretrained(saved)
    esc, clotho = tmp_path / "ESC-50-master", tmp_path / "clotho"
    for root, make in ((esc, make_esc50), (clotho, make_clotho)):
        root.mkdir()
        make(root, media)
    out = tmp_path / "std"
    assert mmcl_main(["eval", "--suite", "standard", "--data", f"esc50={esc}", "--data", f"clotho={clotho}",
                      "--protocol", "esc50=fold1", "--model", str(saved), "--out", str(out), "--no-progress"]) == 0
    table = (out / "summary.md").read_text()
    assert "| esc50 | fold1 | 3 s | audio |" in table and "| clotho | evaluation | 3 s | text->audio |" in table
    assert table.splitlines()[0].startswith("| benchmark | protocol | window | task | acc@1 |")
    index = yaml.safe_load((out / "model-index.yaml").read_text())["model-index"][0]
    assert {r["task"]["name"] for r in index["results"]} == {
        "Zero-shot classification: esc50 audio", "Retrieval: clotho text->audio", "Retrieval: clotho audio->text"}
    assert (esc.parent / "ESC-50-master.mmcl-cache").is_dir()  # the cache beside the copy
    records = read_eval_dir(out)  # what `mmcl push --eval OUT` puts in the model card
    assert sorted(r["name"] for r in records) == ["clotho audio->text", "clotho text->audio", "esc50 audio"]
    assert "reports in" in capsys.readouterr().out

    # One benchmark by name; its cache is reused.
    assert mmcl_main(["eval", "--suite", "clotho", "--data", str(clotho), "--model", str(saved),
                      "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "one" / "retrieval_clotho_audio_to_text.json").read_text())["missing"] == 1


def test_a_path_of_another_layout_is_one_line(tmp_path: Path, model: MultimodalModel, capsys):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "esc50.csv").write_text("file,label\nx.wav,dog\n")
    with pytest.raises(DataError, match=r"not a copy of ESC-50 \(esc50.csv has no column 'filename'"):
        run_benchmark(model, "esc50", tmp_path, tmp_path / "out")
    (tmp_path / "meta" / "esc50.csv").write_text("filename,fold,target,category\n1-1-A-3.wav,1,3,dog\n")
    with pytest.raises(DataError, match=r"class 'dog' has target 3, the release's is 0\); expected meta/esc50.csv"):
        run_benchmark(model, "esc50", tmp_path, tmp_path / "out")
    (tmp_path / "meta" / "esc50.csv").write_text("filename,fold,target,category\n1-1-A-3.wav,1,3,wolf\n")
    with pytest.raises(DataError, match="class 'wolf' is not one of the 50 ESC-50 classes"):
        run_benchmark(model, "esc50", tmp_path, tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in benchmark_names():
        bench = get_benchmark(name)
        with pytest.raises(DataError, match="not a directory; expected") as e:
            run_benchmark(model, name, tmp_path / "nothing", tmp_path / "out")
        assert "\n" not in str(e.value)
        with pytest.raises(DataError, match=f"not a copy of {bench.title} .no .*; expected") as e:
            run_benchmark(model, name, empty, tmp_path / "out")
        assert "\n" not in str(e.value) and bench.layout in str(e.value)
    assert mmcl_main(["eval", "--suite", "clotho", "--data", str(empty), "--model", "x", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "clotho_captions_evaluation.csv" in err
    assert mmcl_main(["eval", "--suite", "standard", "--data", str(empty), "--model", "x", "--out", "o"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
    assert mmcl_main(["eval", "--suite", "standard", "--data", "imagenet=/x", "--model", "x", "--out", "o"]) == 2
    assert "benchmark 'imagenet' is not known" in capsys.readouterr().err


def test_a_model_without_the_modality_fails_before_reading_the_copy(synthetic_data: Path, tmp_path: Path):
    cfg = tiny_config(synthetic_data)
    del cfg["model"]["modalities"]["audio"]
    audio_less = MultimodalModel(load_config(base=cfg).model, load_config(base=cfg).objective)
    for name in ("esc50", "audiocaps", "vggsound"):
        with pytest.raises(EvalError, match=f"{name}: the model has no audio modality"):
            run_benchmark(audio_less, name, tmp_path / "not-read", tmp_path / "out")
    # A benchmark whose audio task is optional runs without it (MSR-VTT: text <-> video).
    with pytest.raises(DataError, match="not a directory"):
        run_benchmark(audio_less, "msrvtt", tmp_path / "not-read", tmp_path / "out")


def test_audioset_display_names_given_twice_stay_distinct(tmp_path: Path):
    (tmp_path / "class_labels_indices.csv").write_text('index,mid,display_name\n0,/m/a,"Bird"\n1,/m/b,"Bird"\n')
    (tmp_path / "eval_segments.csv").write_text('# c\n# c\n# YTID, start_seconds, end_seconds, positive_labels\n'
                                                'abc, 0.000, 10.000, "/m/b"\n')
    manifest = get_benchmark("audioset").read(tmp_path, "eval")
    assert manifest.classnames == ["Bird", "Bird (/m/b)"] and manifest.missing == ["abc"]


# ---------------------------------------------------------------------------------------------------
# Time windows and the decoded-input cache


def make_stepped_esc50(root: Path) -> list[str]:
    """An ESC-50 copy of three 4 s clips whose pitch steps every second (16 kHz, so the built FLAC keeps
    every sample); returns their file names."""
    (root / "audio").mkdir(parents=True)
    (root / "meta").mkdir()
    rows, names = [], []
    for i, (target, cat) in enumerate([(0, "dog"), (1, "rooster"), (10, "rain")]):
        name = f"1-2000{i}-A-{target}.wav"
        expr = f"sin(2*PI*({200 + 90 * i}+350*floor(t))*t)"
        ffmpeg("-f", "lavfi", "-i", f"aevalsrc='{expr}':s=16000:d=4", "-ac", "1", str(root / "audio" / name))
        rows.append(f"{name},1,{target},{cat},False,2000{i},A")
        names.append(name)
    (root / "meta" / "esc50.csv").write_text(csv_text("filename,fold,target,category,esc10,src_file,take", rows))
    return names


@pytest.fixture(scope="module")
def model_2s(synthetic_data: Path) -> MultimodalModel:
    """The tiny model with a 2 s audio window (the stepped clips are 4 s long)."""
    cfg = tiny_config(synthetic_data)
    cfg["model"]["modalities"]["audio"]["seconds"] = 2.0
    cfg = load_config(base=cfg)
    torch.manual_seed(1)
    return MultimodalModel(cfg.model, cfg.objective).eval()


def _built_waveforms(spec: str) -> dict[str, torch.Tensor]:
    """Each built sample's whole FLAC, decoded here with soundfile: ``{key: [S]}`` at 16 kHz."""
    import io

    import soundfile

    out = {}
    with tarfile.open(spec) as tar:
        for m in tar:
            if m.name.endswith(".flac"):
                wav, sr = soundfile.read(io.BytesIO(tar.extractfile(m).read()), dtype="float32")
                assert sr == 16000
                out[m.name.rsplit(".", 1)[0]] = torch.from_numpy(wav)
    return out


def _by_hand(model: MultimodalModel, wav: torch.Tensor, start: float) -> torch.Tensor:
    """The audio embedding of the 2 s span from ``start`` s of ``wav``, cut here."""
    proc = model.processors["audio"]
    span = wav[int(start * 16000):int(start * 16000) + 32000]
    with torch.no_grad():
        return model.encode({"audio": proc.transform(proc.input.features(span), False)[None]})["audio"][0]


def _new_embeddings(cache: Path, seen: set[Path]) -> dict[str, torch.Tensor]:
    """The one embedding-cache entry written since ``seen``: ``{key: audio embedding}``."""
    from safetensors.torch import load_file

    new = sorted(set((cache / "embeddings").glob("*.safetensors")) - seen)
    assert len(new) == 1
    seen.add(new[0])
    keys = json.loads(new[0].with_suffix(".json").read_text())["keys"]
    return dict(zip(keys, load_file(str(new[0]))["emb.audio"]))


@needs_ffmpeg
def test_benchmarks_read_the_window_of_the_model(model_2s: MultimodalModel, tmp_path: Path, one_thread):
    root = tmp_path / "ESC-50-master"
    make_stepped_esc50(root)
    cache, seen = tmp_path / "cache", set()
    # Default: the audio modality's 2 s, centred ([1, 3) of each 4 s clip).
    r = run_benchmark(model_2s, "esc50", root, tmp_path / "centre", cache_dir=cache, progress=False)
    assert r["benchmark"]["window"] == {"seconds": 2.0, "eval_clips": 1, "source": "audio.seconds"}
    report = json.loads((tmp_path / "centre" / "zeroshot_classification_esc50_audio.json").read_text())
    assert report["window"] == r["benchmark"]["window"] and report["protocol"] == "all"
    assert "window 2 s (audio.seconds)" in (tmp_path / "centre" / "summary.md").read_text()
    spec = r["benchmark"]["shards"]
    waves = _built_waveforms(spec)
    assert all(w.numel() == 64000 for w in waves.values())  # the shards keep the whole clip
    centre = _new_embeddings(cache, seen)
    for key, wav in waves.items():
        assert torch.allclose(centre[key], _by_hand(model_2s, wav, 1.0), atol=1e-5), key
        assert not torch.allclose(centre[key], _by_hand(model_2s, wav, 0.0), atol=1e-3)  # the window matters

    # Three evenly spaced windows ([0, 2), [1, 3), [2, 4)): the mean of the three views, normalised.
    r = run_benchmark(model_2s, "esc50", root, tmp_path / "three", cache_dir=cache, progress=False, eval_clips=3)
    assert r["benchmark"]["window"]["eval_clips"] == 3
    assert r["benchmark"]["shards"] == spec  # one build serves every window
    three = _new_embeddings(cache, seen)
    for key, wav in waves.items():
        mean = torch.stack([_by_hand(model_2s, wav, s) for s in (0.0, 1.0, 2.0)]).mean(0)
        assert torch.allclose(three[key], F.normalize(mean, dim=0), atol=1e-5), key

    # A saved model that records its training window: the benchmarks default to it.
    saved = tmp_path / "model"
    model_2s.save_pretrained(saved, data_clip=WindowConfig(seconds=2.0, eval_clips=3))
    loaded = MultimodalModel.from_pretrained(saved)
    assert loaded.data_clip == WindowConfig(seconds=2.0, eval_clips=3)
    assert benchmark_window(loaded) == (WindowConfig(seconds=2.0, eval_clips=3), "the model's data.clip")
    loaded.save_pretrained(tmp_path / "again")  # kept by a re-save
    assert json.loads((tmp_path / "again" / "config.json").read_text())["data"]["clip"]["eval_clips"] == 3
    # Whole clips on request; the one-line errors of the options.
    assert benchmark_window(model_2s, 0.0) == (None, "whole clips")
    for args, match in [((-1.0,), "--clip-seconds: must be >= 0"), ((None, 0), "--eval-clips: must be >= 1"),
                        ((3.0,), "--clip-seconds 3 differs from model.modalities.audio.seconds 2"),
                        ((0.0, 2), "--eval-clips: 2 windows need a window length")]:
        with pytest.raises(ConfigError, match=match):
            benchmark_window(model_2s, *args)


@needs_ffmpeg
def test_a_warm_run_reads_the_decoded_inputs_bit_identically(model_2s: MultimodalModel, synthetic_data: Path,
                                                              tmp_path: Path, caplog, one_thread):
    from safetensors.torch import load_file, save_file

    from mmcl.eval.input_cache import InputCache

    root = tmp_path / "ESC-50-master"
    make_stepped_esc50(root)
    cache = tmp_path / "cache"
    common = dict(cache_dir=cache, cache_embeddings=False, progress=False, eval_clips=3, batch_size=2)
    cold = run_benchmark(model_2s, "esc50", root, tmp_path / "cold", **common)
    entries = sorted((cache / "inputs").iterdir())
    assert len(entries) == 3 and all((e / "index.json").is_file() for e in entries)  # one per view
    assert len(list((cache / "metadata").glob("*.json"))) == 1  # the shards' metadata scan, kept for warm runs
    warm = run_benchmark(model_2s, "esc50", root, tmp_path / "warm", **common)
    assert warm["zeroshot_classification"] == cold["zeroshot_classification"]
    for name in ("results.json", "zeroshot_classification_esc50_audio_ranks.jsonl"):
        assert (tmp_path / "warm" / name).read_text() == (tmp_path / "cold" / name).read_text()

    # The embeddings equal decoding's bit for bit; another model with the same processing (other weights)
    # reads the same entries; another window is another entry.
    spec, clip = cold["benchmark"]["shards"], WindowConfig(seconds=2.0, eval_clips=3)
    store = InputCache(cache / "inputs")
    cfg = tiny_config(synthetic_data)
    cfg["model"]["modalities"]["audio"]["seconds"] = 2.0
    torch.manual_seed(5)
    other = MultimodalModel(load_config(base=cfg).model, load_config(base=cfg).objective).eval()
    for m in (model_2s, other):
        decoded = encode_dataset(m, spec, ["audio"], 2, progress=False, clip=clip)
        read = encode_dataset(m, spec, ["audio"], 2, progress=False, clip=clip, inputs=store)
        assert torch.equal(decoded["emb"]["audio"], read["emb"]["audio"]) and decoded["keys"] == read["keys"]
        assert read["meta"] == decoded["meta"]
    assert len(list((cache / "inputs").iterdir())) == 3
    encode_dataset(model_2s, spec, ["audio"], 2, progress=False, clip=WindowConfig(seconds=2.0), inputs=store)
    assert len(list((cache / "inputs").iterdir())) == 4  # another window config: its own entry
    # ... a warm pass reads the files: with one view's inputs zeroed, it feeds the model zeros.
    index = json.loads((entries[0] / "index.json").read_text())
    assert index["batch_sizes"] == [2, 1] and index["keys"] == decoded["keys"]
    part = entries[0] / index["parts"][0]["file"]
    tensors = load_file(str(part))
    save_file({k: torch.zeros_like(v) if k.startswith("inputs.") else v for k, v in tensors.items()}, str(part))
    batches = list(store.batches(entries[0].name, 2)[1])
    assert [b["inputs"]["audio"].shape[0] for b in batches] == [2, 1]
    assert all(b["inputs"]["audio"].abs().sum() == 0 and b["present"]["audio"].all() for b in batches)
    assert [b["inputs"]["audio"].shape[0] for b in store.batches(entries[0].name, 3)[1]] == [3]  # re-sliced
    zeroed = encode_dataset(model_2s, spec, ["audio"], 2, progress=False, clip=clip, inputs=store)
    assert not torch.equal(zeroed["emb"]["audio"], decoded["emb"]["audio"])

    # Over the size limit: not cached, one log line, the same results.
    caplog.set_level("INFO", logger="mmcl.eval.input_cache")
    small = run_benchmark(model_2s, "esc50", root, tmp_path / "small", **{**common, "cache_dir": tmp_path / "c2"},
                          input_cache_gb=1e-9)
    assert small["zeroshot_classification"] == cold["zeroshot_classification"]
    assert not (tmp_path / "c2" / "inputs").exists() or not any((tmp_path / "c2" / "inputs").iterdir())
    assert "over the 0.00 GB limit (--input-cache-gb); not cached" in caplog.text
    off = run_benchmark(model_2s, "esc50", root, tmp_path / "off", **{**common, "cache_dir": tmp_path / "c3"},
                        input_cache_gb=0)
    assert off["zeroshot_classification"] == cold["zeroshot_classification"] and not (tmp_path / "c3" / "inputs").exists()
