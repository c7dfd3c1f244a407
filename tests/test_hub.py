"""The Hub side of a saved model: the model card's model-index metadata, pickle refusal, and the upload and
download paths of ``huggingface_hub`` run against :class:`LocalHub`, a server on 127.0.0.1 that answers the
HTTP calls those paths make (create repo, validate README metadata, pre-upload, the LFS batch API and its
PUT, commit, repo info, tree listing, file resolve) and keeps the files it receives.

Covered: ``mmcl push`` end to end through the CLI (token from ``HF_TOKEN``, classic LFS transfer of the
weights) and in process through the Xet-enabled pipeline (token from the login file; the server asks for
every file as a regular git blob, so no Xet transfer happens), the files that arrive byte for byte, what is
never uploaded, the token never printed or logged, a refused endpoint failing in one line, ``from_pretrained``
by repo id through the server and then from the local HF cache with the server gone and in offline mode. Not
covered: the Xet storage protocol itself, multi-part LFS uploads, the real Hub's server-side validation and
authorisation rules.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from safetensors.torch import load_file
from test_distributed import tiny_config
from test_model import batch

from mmcl.config import load_config, to_dict
from mmcl.eval.suite import load_suite, run_suite
from mmcl.hub import HubError, model_files, push_to_hub
from mmcl.model import MultimodalModel, load_processors

SECRET = "hf_local_test_token_8d1f0c"
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------
# A local stand-in for the Hub's HTTP API


class LocalHub(ThreadingHTTPServer):
    """Repos in memory: ``repos[repo_id] = {"private", "files": {path: bytes}, "lfs": {paths}, "sha"}``.
    Files whose name ends with one of ``lfs_suffixes`` are asked for as LFS uploads, the rest as regular
    blobs inlined in the commit. Every request is kept in ``requests`` as (method, path, headers with
    lower-case names)."""

    daemon_threads = True

    def __init__(self, lfs_suffixes: tuple[str, ...] = (".safetensors",)):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lfs_suffixes = lfs_suffixes
        self.repos: dict[str, dict[str, Any]] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.validated: list[str] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: LocalHub

    def log_message(self, *args: Any) -> None:  # keep the test output quiet
        pass

    # -- plumbing
    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _authorised(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {SECRET}":
            return True
        self._json(401, {"error": "Invalid credentials"})
        return False

    def _repo(self, repo_id: str) -> dict[str, Any] | None:
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo["private"] and self.headers.get("Authorization") != f"Bearer {SECRET}"):
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return None
        return repo

    def _route(self) -> None:
        path = urlsplit(self.path).path
        self.server.requests.append((self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        for method, pattern, handler in ROUTES:
            m = re.fullmatch(pattern, path)
            if m and method == self.command:
                handler(self, **m.groupdict())
                return
        self._json(404, {"error": f"no route {self.command} {path}"})

    do_GET = do_POST = do_PUT = do_HEAD = _route

    # -- write API
    def create_repo(self) -> None:
        if not self._authorised():
            return
        payload = json.loads(self._body())
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.server.repos:
            self._json(409, {"error": "You already created this model repo",
                             "url": f"{self.server.endpoint}/{repo_id}"})
            return
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self.server.repos[repo_id] = {"private": private, "files": {}, "lfs": set(), "sha": "0" * 40}
        self._json(200, {"url": f"{self.server.endpoint}/{repo_id}", "name": repo_id})

    def validate_yaml(self) -> None:
        self.server.validated.append(json.loads(self._body())["content"])
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, repo: str, rev: str) -> None:
        if not self._authorised() or self._repo(repo) is None:
            return
        files = json.loads(self._body())["files"]
        self._json(200, {"files": [{"path": f["path"], "shouldIgnore": False, "oid": None,
                                    "uploadMode": "lfs" if f["path"].endswith(self.server.lfs_suffixes) else "regular"}
                                   for f in files]})

    def lfs_batch(self, repo: str) -> None:
        if not self._authorised() or self._repo(repo) is None:
            return
        objects = json.loads(self._body())["objects"]
        self._json(200, {"transfer": "basic", "objects": [
            {"oid": o["oid"], "size": o["size"],
             "actions": {"upload": {"href": f"{self.server.endpoint}/lfs-upload/{o['oid']}"}}} for o in objects]})

    def lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            self._json(400, {"error": "sha256 mismatch"})
            return
        self.server.lfs_objects[oid] = data
        self._send(200)

    def commit(self, repo: str, rev: str) -> None:
        if not self._authorised():
            return
        state = self._repo(repo)
        if state is None:
            return
        for line in self._body().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                state["files"][value["path"]] = base64.b64decode(value["content"])
                state["lfs"].discard(value["path"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.server.lfs_objects:
                    self._json(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                    return
                state["files"][value["path"]] = self.server.lfs_objects[value["oid"]]
                state["lfs"].add(value["path"])
        state["sha"] = hashlib.sha1(json.dumps(sorted(state["files"])).encode() + os.urandom(8)).hexdigest()
        self._json(200, {"commitUrl": f"{self.server.endpoint}/{repo}/commit/{state['sha']}",
                         "commitOid": state["sha"], "pullRequestUrl": None})

    # -- read API
    def revision(self, repo: str, rev: str) -> None:
        state = self._repo(repo)
        if state is not None:
            self._json(200, {"id": repo, "sha": state["sha"], "private": state["private"],
                             "siblings": [{"rfilename": p} for p in sorted(state["files"])]})

    def tree(self, repo: str, rev: str) -> None:
        state = self._repo(repo)
        if state is None:
            return
        entries = []
        for p, data in sorted(state["files"].items()):
            entry = {"type": "file", "path": p, "size": len(data), "oid": _git_blob_sha(data)}
            if p in state["lfs"]:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries)

    def resolve(self, repo: str, rev: str, file: str) -> None:
        state = self._repo(repo)
        if state is None:
            return
        if file not in state["files"]:
            self._json(404, {"error": "Entry not found"},
                       {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": state["sha"]})
            return
        data = state["files"][file]
        etag = hashlib.sha256(data).hexdigest() if file in state["lfs"] else _git_blob_sha(data)
        self._send(200, data, {"X-Repo-Commit": state["sha"], "ETag": f'"{etag}"'}, "application/octet-stream")


_REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", _Handler.preupload),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", _Handler.lfs_put),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", _Handler.commit),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", _Handler.revision),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)", _Handler.tree),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", _Handler.resolve),
    ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", _Handler.resolve),
]


# ---------------------------------------------------------------------------------------------------
# A saved, evaluated run


@pytest.fixture(scope="module")
def run_dir(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``run/final`` (save_pretrained), ``run/eval`` (a two-task suite's reports), ``run/config.yaml``,
    and in ``final/`` two files that must never be published: a pickle and a checkpoint state."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(base=tiny_config(synthetic_data))
    torch.manual_seed(0)
    model = MultimodalModel(cfg.model, cfg.objective).eval()
    suite_file = run / "suite.yaml"
    suite_file.write_text(yaml.safe_dump({"batch_size": 16, "tasks": [
        {"name": "audio->pitch", "type": "zeroshot_classification", "query": ["audio"], "label": "pitch",
         "classnames": ["low", "medium", "high"], "templates": ["a {} note"]},
        {"name": "text->video", "type": "retrieval", "query": ["text"], "candidates": ["video"]}]}))
    results = run_suite(model, load_suite(suite_file), str(synthetic_data / "test-{000000..000001}.tar"),
                        out_dir=run / "eval", model_name="tiny", progress=False)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    model.save_pretrained(run / "final", eval_results=results, train_config=to_dict(cfg), model_name="tiny")
    torch.save(model.state_dict(), run / "final" / "pytorch_model.bin")
    (run / "final" / "state.pt").write_bytes(pickle.dumps({"optimizer": "state"}))
    return run


def embeddings(model: MultimodalModel) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval().encode(batch(model, 3))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_model_card_is_valid_model_index(run_dir: Path):
    final = run_dir / "final"
    card = (final / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "mmcl"
    (entry,) = meta["model-index"]
    assert entry["name"] == "tiny"
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    by_task = {r["task"]["name"]: r for r in entry["results"]}
    zs = by_task["Zero-shot classification: audio->pitch"]
    assert zs["task"]["type"] == "zero-shot-classification" and zs["dataset"]["name"] == "held-out split"
    metrics = {m["type"]: m["value"] for m in zs["metrics"]}
    expected = results["zeroshot_classification"]["audio->pitch"]
    assert metrics == {"acc1": expected["acc1"], "mean_per_class_recall": expected["mean_per_class_recall"]}
    rt = {m["type"]: m["value"] for m in by_task["Retrieval: text->video"]["metrics"]}
    assert rt == {k: v for k, v in results["retrieval"]["text->video"].items() if isinstance(v, float)}
    # huggingface_hub's own parser of the metadata agrees.
    parsed = ModelCard.load(final / "README.md")
    assert parsed.data.model_name == "tiny"
    assert len(parsed.data.eval_results) == len(metrics) + len(rt)
    assert {(r.task_type, r.metric_type) for r in parsed.data.eval_results} >= {("retrieval", "R@1"),
                                                                              ("zero-shot-classification", "acc1")}
    # The training config, as a YAML block of the card's body.
    block = card.split("## Training configuration", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == yaml.safe_load((run_dir / "config.yaml").read_text())
    # The tokenizer beside the weights; the processors load from the directory without building a tower.
    processors = load_processors(final)
    assert processors["text"].cfg.tokenizer == "text_tokenizer.model" and processors["video"].cfg.frames == 4
    assert processors["text"].tokenizer.path == final / "text_tokenizer.model"
    assert not any(isinstance(p, torch.nn.Module) for p in processors.values())


class _Payload:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_weights_are_refused_without_unpickling(run_dir: Path, tmp_path: Path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_files(run_dir / "final"):
        (bad / f).write_bytes((run_dir / "final" / f).read_bytes())
    marker = tmp_path / "unpickled"
    (bad / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(HubError, match="not a safetensors file"):
        MultimodalModel.from_pretrained(bad)
    with pytest.raises(HubError, match="not a safetensors file"):
        push_to_hub(bad, "someone/bad", token=SECRET)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Upload and download against the local Hub


def test_mmcl_push_through_the_cli_with_lfs(run_dir: Path, tmp_path: Path):
    final = shutil.copytree(run_dir, tmp_path / "run") / "final"  # push rewrites the card: work on a copy
    with LocalHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": SECRET, "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_VERBOSITY": "debug"}
        r = subprocess.run([sys.executable, "-m", "mmcl.cli", "-v", "push", "--model", str(final), "--repo-id",
                            "someone/tiny", "--private"], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert SECRET not in r.stdout + r.stderr
    assert "pushed" in r.stdout and "someone/tiny" in r.stdout
    repo = hub.repos["someone/tiny"]
    assert repo["private"] is True
    published = model_files(final)
    assert sorted(repo["files"]) == sorted(published)
    for name in published:
        assert repo["files"][name] == (final / name).read_bytes(), name
    assert repo["lfs"] == {"model.safetensors"}  # the weights went through the LFS batch API and a PUT
    assert "pytorch_model.bin" not in published and "state.pt" not in published
    # The card was rebuilt from the run's eval/ and config.yaml and checked by the server before upload.
    assert set(hub.validated) == {repo["files"]["README.md"].decode()}
    meta = front_matter(hub.validated[0])
    assert meta["model-index"][0]["name"] == "tiny"
    assert all(h.get("authorization") == f"Bearer {SECRET}" for m, p, h in hub.requests if m != "PUT")
    calls = [(m, p) for m, p, _ in hub.requests]
    calls = [c for i, c in enumerate(calls) if i == 0 or c != calls[i - 1]]  # the card is validated twice
    assert calls == [
        ("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/someone/tiny/preupload/main"), ("POST", "/someone/tiny.git/info/lfs/objects/batch"),
        ("PUT", f"/lfs-upload/{sha256(final / 'model.safetensors')}"),
        ("POST", "/api/models/someone/tiny/commit/main")]


LOAD = """
import sys
sys.path.insert(0, "tests")
from huggingface_hub import constants
from safetensors.torch import save_file
from test_hub import embeddings
from mmcl.model import MultimodalModel

repo_id, cache, out = sys.argv[1:4]
save_file(embeddings(MultimodalModel.from_pretrained(repo_id, cache_dir=cache)), out + ".0")
constants.HF_HUB_OFFLINE = True  # the same again in offline mode (as HF_HUB_OFFLINE=1 sets it)
save_file(embeddings(MultimodalModel.from_pretrained(repo_id, cache_dir=cache)), out + ".1")
"""


def load_by_repo_id(repo_id: str, cache: Path, out: Path, endpoint: str) -> None:
    """``from_pretrained(repo_id)`` in a fresh process (``HF_ENDPOINT`` is read at import); writes the
    embeddings of :func:`embeddings` to ``out.0``, and those of a second load in offline mode to ``out.1``."""
    for f in out.parent.glob(f"{out.name}.*"):
        f.unlink()
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_ENDPOINT": endpoint}
    r = subprocess.run([sys.executable, "-c", LOAD, repo_id, str(cache), str(out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]


def test_push_in_process_then_load_by_repo_id_online_and_from_the_cache(run_dir: Path, tmp_path: Path, monkeypatch,
                                                                          caplog, capsys):
    """The default (Xet-enabled) upload pipeline with the token of an ``hf auth login`` file; then
    ``from_pretrained("someone/tiny")`` through the server, and from the HF cache once it is gone."""
    final = run_dir / "final"
    token_file = tmp_path / "token"
    token_file.write_text(SECRET)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    assert importlib.util.find_spec("hf_xet") is not None  # so upload_folder takes its Xet pipeline
    cache, out = tmp_path / "cache", tmp_path / "emb"
    expected = embeddings(MultimodalModel.from_pretrained(final))
    with caplog.at_level(logging.DEBUG), LocalHub(lfs_suffixes=()) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        url = push_to_hub(final, "someone/tiny", commit_message="first")
        repo = hub.repos["someone/tiny"]
        assert url == f"{hub.endpoint}/someone/tiny/commit/{repo['sha']}"
        assert {n: repo["files"][n] for n in model_files(final)} == {n: (final / n).read_bytes()
                                                                      for n in model_files(final)}
        assert [p for m, p, _ in hub.requests if m == "POST"][-1] == "/api/models/someone/tiny/commit/main"
        # A pickle on the server side is never fetched.
        repo["files"]["pytorch_model.bin"] = (final / "pytorch_model.bin").read_bytes()
        load_by_repo_id("someone/tiny", cache, out, hub.endpoint)
        fetched = {p.rsplit("/resolve/", 1)[1].split("/", 1)[1] for m, p, _ in hub.requests
                   if m == "GET" and "/resolve/" in p}
    captured = capsys.readouterr()
    assert SECRET not in caplog.text + captured.out + captured.err
    assert fetched == set(model_files(final))
    for i in (0, 1):
        assert_bitwise_equal(load_file(f"{out}.{i}"), expected)
    # The server is gone: the repo id resolves through the cache, with and without offline mode.
    load_by_repo_id("someone/tiny", cache, out, hub.endpoint)
    for i in (0, 1):
        assert_bitwise_equal(load_file(f"{out}.{i}"), expected)
    with pytest.raises(HubError, match="someone/other: not a local model directory"):
        MultimodalModel.from_pretrained("someone/other", cache_dir=cache, local_files_only=True)


def test_push_without_a_token_fails_in_one_line(run_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(HubError, match="no Hugging Face token: set HF_TOKEN or log in"):
        push_to_hub(run_dir / "final", "someone/tiny")
    assert huggingface_hub.get_token() is None


def test_push_to_a_refused_endpoint_fails_in_one_line(run_dir: Path, tmp_path: Path):
    """The real CLI in a subprocess against a closed local port: one line naming the endpoint, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed once the block ends: connections are refused
    model = shutil.copytree(run_dir / "final", tmp_path / "model")
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_dummy_token", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    r = subprocess.run([sys.executable, "-m", "mmcl.cli", "push", "--model", str(model), "--repo-id", "someone/tiny"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith(f"mmcl push: error: someone/tiny: cannot reach {endpoint}: ")
    assert "Traceback" not in r.stderr and "hf_dummy_token" not in r.stderr
