"""The GPU path, checked on CPU (and on a GPU where one is present): bf16 autocast through the real trainer
stays close to fp32 for every objective, 16-bit where it cannot run is one config error, a training step
that does not log reads nothing back from the device (counted by patching every synchronising ``Tensor``
method; on CUDA under ``set_sync_debug_mode("error")``) while a logging step reads once for all its values,
persistent loader workers draw what fresh ones do, compiled towers match eager ones, every tower type
attends through SDPA, the other ranks get the seeded weights, and bench/gpu_step.py's pieces work."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_distributed import read_log, tiny_config

from mmcl.config import ConfigError, ObjectiveConfig, from_dict, load_config
from mmcl.data.shards import build_loader
from mmcl.model import MultimodalModel
from mmcl.objectives import build_objective
from mmcl.train.engine import make_engine
from mmcl.train.loop import seed_everything, train
from mmcl.train.optim import build_optimizer, build_scheduler
from mmcl.train.step import ForwardBackward, to_device
from mmcl.train.zero import without_transformers_zero3

OBJECTIVES = [{"name": "clip"}, {"name": "siglip"}, {"name": "symile", "negatives": "n"},
              {"name": "symile", "negatives": "n_squared"}, {"name": "gram"}]
IDS = ["clip", "siglip", "symile-n", "symile-n_squared", "gram"]
#: bf16 vs fp32 loss over 3 steps of the tiny model: |difference| <= REL * |fp32 loss| (measured: at most
#: 0.0038 absolute, 0.15 % relative, for CLIP).
REL = 1e-2

#: Tensor methods that read a value back from the device (a host sync on CUDA).
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero")


@contextmanager
def count_syncs() -> Iterator[list[str]]:
    """Record every call of a synchronising ``Tensor`` method (and ``torch.cuda.synchronize``) as
    ``"method file:line"`` of its caller. Calls from ``torch/optim`` are left out: AdamW keeps its step
    counters as CPU tensors (host scalars by design; the fused CUDA AdamW keeps them on the device)."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}
    saved_sync = torch.cuda.synchronize

    def wrap(name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            if f"torch{os.sep}optim" not in caller:
                calls.append(f"{name} {caller}:{sys._getframe(1).f_lineno}")
            return fn(*args, **kwargs)
        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    torch.cuda.synchronize = wrap("cuda.synchronize", lambda *a, **k: None)
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.cuda.synchronize = saved_sync


def run_config(data: Path, objective: dict[str, Any], **train: Any) -> dict[str, Any]:
    base = tiny_config(data, shards=4)
    base["objective"] = {**objective, "max_logit_scale": 10.0} if objective["name"] == "clip" else objective
    base["train"].update(steps=3, checkpoint_every=0, log_keys=False, **train)
    return base


@pytest.mark.parametrize("objective", OBJECTIVES, ids=IDS)
def test_bf16_autocast_trains_close_to_fp32(objective: dict[str, Any], synthetic_data: Path, tmp_path: Path) -> None:
    losses = {}
    for precision in ("fp32", "bf16"):
        train(load_config(base=run_config(synthetic_data, objective, precision=precision)), tmp_path / precision)
        losses[precision] = [r["loss"] for r in read_log(tmp_path / precision)]
    assert len(losses["bf16"]) == 3
    for a, b in zip(losses["fp32"], losses["bf16"], strict=True):
        assert torch.isfinite(torch.tensor(b))
        assert abs(a - b) <= REL * abs(a), (objective, losses)
    assert losses["fp32"] != losses["bf16"]  # autocast did act


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("objective", OBJECTIVES, ids=IDS)
def test_fp16_with_its_grad_scaler_trains_close_to_fp32_on_cuda(objective: dict[str, Any], synthetic_data: Path,
                                                                tmp_path: Path) -> None:
    losses = {}
    for precision in ("fp32", "fp16"):
        train(load_config(base=run_config(synthetic_data, objective, precision=precision)), tmp_path / precision)
        losses[precision] = [r["loss"] for r in read_log(tmp_path / precision)]
    for a, b in zip(losses["fp32"], losses["fp16"], strict=True):
        assert abs(a - b) <= REL * abs(a), (objective, losses)


def test_bf16_engine_runs_the_towers_in_bf16_and_embeds_in_fp32(synthetic_data: Path) -> None:
    cfg = load_config(base=run_config(synthetic_data, {"name": "clip"}, precision="bf16"))
    model = MultimodalModel(cfg.model, cfg.objective)
    engine = make_engine(cfg, model)
    engine.prepare(model, build_optimizer(model, cfg, {}))
    dtypes = []
    model.heads["text"].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    batch = to_device([next(iter(build_loader(cfg.data.train, model.processors, 4, train=True)))], engine.device)[0]
    emb = engine.model(batch["inputs"])
    assert dtypes == [torch.bfloat16]
    assert all(e.dtype == torch.float32 for e in emb.values())
    assert all(torch.allclose(e.norm(dim=1).cpu(), torch.ones(4), atol=1e-5) for e in emb.values())


def test_16_bit_without_cuda_is_one_config_error(synthetic_data: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    with pytest.raises(ConfigError, match=r"^train.precision: fp16 needs a CUDA GPU .*fp32 or bf16"):
        train(load_config(base=run_config(synthetic_data, {"name": "clip"}, precision="fp16")), tmp_path)
    zero2 = Path(__file__).parents[1] / "configs" / "deepspeed" / "zero2.json"
    with pytest.raises(ConfigError, match=r"^train.precision: bf16 under DeepSpeed needs a CUDA GPU"):
        train(load_config(base=run_config(synthetic_data, {"name": "clip"}, precision="bf16",
                                          deepspeed=str(zero2))), tmp_path)


def prepared_step(data: Path, objective: dict[str, Any], **data_overrides: Any):
    """The trainer's own step (engine, optimizer, schedule, ForwardBackward) and a batch on its device."""
    base = run_config(data, objective)
    base["data"].update(data_overrides)
    cfg = load_config(base=base)
    seed_everything(0)
    model = MultimodalModel(cfg.model, cfg.objective)
    engine = make_engine(cfg, model)
    optimizer = build_optimizer(model, cfg, {})
    scheduler = build_scheduler(optimizer, cfg, 10)
    loader = build_loader(cfg.data.train, model.processors, cfg.data.batch_size, train=True,
                          on_missing=cfg.data.on_missing)
    engine.prepare(model, optimizer)
    engine.model.train()
    return engine, scheduler, ForwardBackward(engine), to_device([next(iter(loader))], engine.device)


@pytest.mark.parametrize("objective", OBJECTIVES, ids=IDS)
def test_a_training_step_reads_nothing_back_and_a_logging_step_reads_once(objective: dict[str, Any],
                                                                           synthetic_data: Path) -> None:
    engine, scheduler, forward_backward, group = prepared_step(synthetic_data, objective)
    forward_backward(group)  # the first step may set things up (e.g. GRAM's clamp floor per dtype)
    engine.step()
    with count_syncs() as calls:
        loss = forward_backward(group)
        engine.step()
        scheduler.step()
    assert calls == []
    with count_syncs() as calls:
        values = engine.log_values(loss)
    assert len(calls) == 1 and calls[0].startswith("tolist"), calls
    assert set(values) >= {"loss"} and all(isinstance(v, float) for v in values.values())


def test_a_masked_step_reads_nothing_back(synthetic_data: Path) -> None:
    """A batch with a modality missing in some samples (``data.on_missing: mask``) takes the masked path on
    the device."""
    engine, scheduler, forward_backward, group = prepared_step(synthetic_data, {"name": "clip"})
    group[0]["present"]["audio"] = torch.arange(len(group[0]["keys"]), device=engine.device) % 2 == 0
    group = to_device(group, engine.device)
    assert set(group[0]["present"]) == {"audio"}  # the complete masks are dropped on the host
    with torch.no_grad():  # the checked path (one host read per check) gives the same loss
        reference = engine.inner.objective(engine.model(group[0]["inputs"]), group[0]["present"])
    with count_syncs() as calls:
        loss = forward_backward(group)
        engine.step()
    assert calls == []
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    one = {**group[0], "present": {m: torch.arange(len(group[0]["keys"]), device=engine.device) > 0
                                   for m in ("video", "audio")}}
    with pytest.raises(ValueError, match="fewer than 2 present modalities"):  # checked on the host copies
        to_device([one], engine.device)


def _two_rank_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        assert dist.get_world_size() == 2
        counts = {}
        torch.manual_seed(rank)
        emb = {m: torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_(True) for m in "abc"}
        for cfg in OBJECTIVES:
            objective = build_objective(from_dict(ObjectiveConfig, {**cfg, "anchor": "a"} if cfg["name"] == "gram"
                                                  else cfg), list("abc"))
            objective(emb, None, check=False, sizes=[4, 4]).backward()  # once: GRAM's clamp floor per dtype
            with count_syncs() as known:
                objective(emb, None, check=False, sizes=[4, 4]).backward()
            with count_syncs() as exchanged:
                objective(emb, None, check=False).backward()
            counts[cfg["name"] + cfg.get("negatives", "")] = (len(known), len(exchanged))
            present = {"b": torch.tensor([True, False, True, True]), "c": torch.tensor([True, True, False, True])}
            for mask in (None, present):  # the device-side path gives the checked path's loss
                torch.manual_seed(7)
                lazy = objective(emb, mask, check=False, sizes=[4, 4])
                torch.manual_seed(7)
                torch.testing.assert_close(lazy, objective(emb, mask), rtol=1e-6, atol=1e-6)
        torch.save(counts, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_ranks_gather_without_reading_back_when_sizes_are_known(tmp_path: Path) -> None:
    """Under 2 gloo ranks: with the sizes given, no step reads anything back; without, once (the sizes); the
    device-side path (masked or not) gives the checked path's loss."""
    mp.spawn(_two_rank_worker, args=(os.fspath(tmp_path / "rendezvous"), os.fspath(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        counts = torch.load(tmp_path / f"{rank}.pt")
        # sizes known: nothing read back; sizes exchanged: one read of the sizes per step
        assert counts == {k: (0, 1) for k in ("clip", "siglip", "symilen", "symilen_squared", "gram")}, counts


def test_persistent_workers_draw_what_fresh_workers_draw(synthetic_data: Path) -> None:
    """Random audio crops from torch's global RNG in a loader worker, over two epochs: persistent workers
    (reseeded per epoch) give exactly the batches fresh workers give, so exact resume still holds."""
    base = run_config(synthetic_data, {"name": "clip"})
    base["model"]["modalities"]["audio"]["seconds"] = 1.0  # random 1 s crops of the 2 s clips
    cfg = load_config(base=base)
    processors = MultimodalModel(cfg.model, cfg.objective, device="meta").processors
    batches = {}
    for persistent in (False, True):
        torch.manual_seed(0)
        loader = build_loader(cfg.data.train, processors, 8, train=True, workers=1, shuffle_buffer=8,
                              persistent_workers=persistent, prefetch_factor=2)
        assert loader.loader.persistent_workers == persistent and loader.loader.prefetch_factor == 2
        batches[persistent] = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches[persistent] += [b["inputs"]["audio"] for b in loader]
    assert len(batches[True]) == 16
    assert all(torch.equal(a, b) for a, b in zip(batches[False], batches[True], strict=True))
    assert not torch.equal(batches[True][0], batches[True][8])  # the epochs differ


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_compiled_tower_gives_the_same_outputs(synthetic_data: Path) -> None:
    """``train.compile``: ``MultimodalModel.compile_towers`` compiles in place (same parameter names); the
    tiny text tower's embeddings match the eager ones."""
    cfg = load_config(base=run_config(synthetic_data, {"name": "clip"}))
    seed_everything(0)
    eager = MultimodalModel(cfg.model, cfg.objective).eval()
    compiled = MultimodalModel(cfg.model, cfg.objective).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_towers()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    ids = next(iter(build_loader(cfg.data.train, eager.processors, 4, train=False)))["inputs"]["text"]
    with torch.no_grad():
        torch.testing.assert_close(compiled.encode({"text": ids})["text"], eager.encode({"text": ids})["text"],
                                   atol=1e-5, rtol=1e-5)


def test_every_tower_type_attends_through_sdpa(synthetic_data: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Trunk towers and timm models: every timm attention layer has ``fused_attn`` set (even where timm's
    default says otherwise); transformers towers run ``attn_implementation == "sdpa"``."""
    import timm.layers.config
    from transformers import AutoModel, BertConfig, BertModel

    from mmcl.modalities.pretrained import hf_encoder, load_hf_model
    from mmcl.modalities.timm_towers import TimmTowerConfig, create_timm_model

    monkeypatch.setattr(timm.layers.config, "_USE_FUSED_ATTN", 0)  # what TIMM_FUSED_ATTN=0 sets
    cfg = load_config(base=run_config(synthetic_data, {"name": "clip"}))
    model = MultimodalModel(cfg.model, cfg.objective)
    for name in ("video", "audio"):
        layers = [m for m in model.towers[name].modules() if hasattr(m, "fused_attn")]
        assert layers and all(m.fused_attn for m in layers), name
    assert model.towers["text"].encoder.config._attn_implementation == "sdpa"
    timm_model = create_timm_model(TimmTowerConfig(model="test_vit"), None, "model.modalities.video.tower")
    layers = [m for m in timm_model.modules() if hasattr(m, "fused_attn")]
    assert layers and all(m.fused_attn for m in layers)

    BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    loaded = load_hf_model(AutoModel, tmp_path / "bert", "tower.path", attn_implementation="eager")
    assert loaded.config._attn_implementation == "sdpa"
    assert hf_encoder(tmp_path / "bert", "tower.path", init="config").config._attn_implementation == "sdpa"


def load_bench() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_step", Path(__file__).parents[1] / "bench" / "gpu_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_step_bench_counts_flops_and_splits_the_step_on_cpu(synthetic_data: Path) -> None:
    """bench/gpu_step.py's pieces on CPU with the tiny model: the split phases add up to the step, FLOPs of
    the forward equal those counted on the plain model, the backward costs about twice the forward, and
    without CUDA the script refuses in one line."""
    import subprocess

    from torch.utils.flop_counter import FlopCounterMode

    gpu_step = load_bench()
    cfg = load_config(base={**run_config(synthetic_data, {"name": "symile", "negatives": "n_squared"}),
                            "train": {"precision": "bf16", "steps": 10, "progress": False}})
    bench = gpu_step.Bench(cfg)
    row = bench.measure(steps=2, warmup=1)
    assert set(row["split_s"]) == {"data", "forward", "backward", "optimizer"}
    assert all(v > 0 for v in row["split_s"].values())
    assert row["s_per_step"] == pytest.approx(sum(row["split_s"].values()))
    assert row["samples_per_s"] == pytest.approx(row["batch"] / row["s_per_step"])
    assert sum(row["split_pct"].values()) == pytest.approx(100)

    batch = bench.next_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16), FlopCounterMode(display=False) as plain:
        bench.engine.inner.objective(bench.engine.inner(batch["inputs"]), batch["present"])
    assert row["flops_forward"] == plain.get_total_flops() > 0
    assert 1.5 <= row["flops_backward"] / row["flops_forward"] <= 2.5
    assert row["flops_per_sample"] == (row["flops_forward"] + row["flops_backward"]) / row["batch"]

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / "gpu_step.py")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("bench/gpu_step.py: needs a CUDA GPU")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("objective", OBJECTIVES, ids=IDS)
def test_cuda_step_does_not_sync(objective: dict[str, Any], synthetic_data: Path) -> None:
    """On a GPU: the loader pins its batches, and a bf16 training step (fused AdamW) passes with
    ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising CUDA call."""
    base = run_config(synthetic_data, objective, precision="bf16")
    cfg = load_config(base=base)
    seed_everything(0)
    model = MultimodalModel(cfg.model, cfg.objective)
    engine = make_engine(cfg, model)
    assert engine.device.type == "cuda"
    if torch.cuda.get_device_capability()[0] >= 8:  # train.tf32 (default on) on Ampere and newer
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    optimizer = build_optimizer(model, cfg, {})
    assert optimizer.param_groups[0]["fused"] is True
    engine.prepare(model, optimizer)
    loader = build_loader(cfg.data.train, model.processors, 8, train=True, pin_memory=True)
    batch = next(iter(loader))
    assert all(v.is_pinned() for v in batch["inputs"].values())
    forward_backward = ForwardBackward(engine)
    group = to_device([batch], engine.device)
    forward_backward(group)
    engine.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = forward_backward(group)
        engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def _rank_build_worker(rank: int, data: str, port: int, mode: str, out: str, bert: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    base = run_config(Path(data), {"name": "clip"})
    if bert:
        base["model"]["modalities"]["text"] = {"max_len": 24, "tower": {"type": "hf", "path": bert}}
    if mode != "ddp":
        base["train"]["deepspeed"] = str(Path(__file__).parents[1] / "configs" / "deepspeed" / f"{mode}.json")
    cfg = load_config(base=base)
    engine = make_engine(cfg, MultimodalModel(cfg.model, cfg.objective, device="meta", pretrained=False))
    assert engine.world == 2
    seed_everything(cfg.train.seed)
    model = engine.build_model()
    params = list(model.parameters())
    storage = {}
    if mode == "zero3":  # partitioned while built: this rank's slices, empty placeholders, nothing in full
        storage = {"partitioned": all(hasattr(p, "ds_id") for p in params),
                   "largest_data": max(p.data.numel() for p in params),
                   "local": sum(p.ds_tensor.numel() for p in params),
                   "half": sum(-(-p.ds_numel // 2) for p in params), "total": sum(p.ds_numel for p in params)}
    engine.prepare(model, build_optimizer(model, cfg, {}))
    got = engine.full_state_dict()
    seed_everything(cfg.train.seed)
    with without_transformers_zero3():  # the construction every rank ran before, not partitioned
        today = MultimodalModel(cfg.model, cfg.objective).state_dict()
    if bert:  # the checkpoint's weights, not a fresh initialisation
        embeddings = load_file(os.path.join(bert, "model.safetensors"))["embeddings.word_embeddings.weight"]
        storage["checkpoint"] = [torch.equal(v, embeddings) for k, v in got.items()
                                 if k.endswith("word_embeddings.weight")]
    diffs = sorted(k for k, v in today.items() if not torch.equal(got[k], v.float()))
    torch.save({"diffs": diffs, "storage": storage}, f"{out}/{rank}.pt")
    engine.wait()
    engine.end()
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode, pretrained", [("ddp", False), ("zero3", False), ("zero3", True)],
                         ids=["ddp", "zero3", "zero3-pretrained-bert"])
def test_other_ranks_build_only_the_architecture_and_get_the_seeded_weights(mode: str, pretrained: bool,
                                                                            synthetic_data: Path,
                                                                            tmp_path: Path) -> None:
    """2 gloo ranks: rank 1 builds the model with uninitialised parameters (``Engine.build_model``); after
    ``prepare`` (DDP, DeepSpeed ZeRO-3) every rank holds exactly the weights of today's seeded construction.
    Under ZeRO-3 the build partitions the parameters (``partition_model``): right after it each rank stores
    its half of every parameter and no parameter in full; with a pretrained BERT text tower (read by rank 0
    alone) the weights are the checkpoint's."""
    import socket

    bert = ""
    if pretrained:
        from test_pretrained_towers import bert_tokenizer, save_bert

        tok = bert_tokenizer()
        bert = os.fspath(save_bert(tmp_path / "bert", len(tok)))
        tok.save_pretrained(bert)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_build_worker, args=(os.fspath(synthetic_data), port, mode, os.fspath(tmp_path), bert), nprocs=2,
             join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    assert [r["diffs"] for r in results] == [[], []]
    for r in results if mode == "zero3" else []:
        st = r["storage"]
        assert st["partitioned"] and st["largest_data"] == 0
        assert st["local"] == st["half"] and st["local"] <= st["total"] / 2 + 1000
        if pretrained:
            assert st["checkpoint"] == [True]
