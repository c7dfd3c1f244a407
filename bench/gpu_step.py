"""Training throughput on one GPU: samples/s and MFU of the mmcl training step in bf16.

    python bench/gpu_step.py [--model NAME] [--batch 256] [--steps 30] [--warmup 5] [--peak-tflops X]

Refuses in one line (exit 2) without a CUDA GPU. The model is the named config (``configs/models/*.yaml``)
with the most parameters unless ``--model`` names one. The batch is real: a synthetic dataset for the
model's modalities is written to a temporary directory and one batch of ``--batch`` samples is decoded and
reused every step (decoding is not what is measured). The step is the training loop's own, built with the
trainer's functions: ``make_engine`` (accelerate with bf16 autocast), ``build_optimizer`` (AdamW over the
trainer's parameter groups), ``build_scheduler``, ``ForwardBackward`` then ``engine.step()`` (clip-grad,
optimizer step, logit-scale clamp) and the schedule's step. FLOPs per step are counted once with ``torch.utils.flop_counter.FlopCounterMode``
(forward and backward); MFU = achieved FLOP/s / the GPU's dense bf16 peak (a table of known GPUs, or
``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
#: Dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name() (first match wins).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("B200", 2250.0),
                    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0))


def largest_named_model() -> str:
    from mmcl.config import load_config
    from mmcl.model import MultimodalModel

    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted(MODELS.glob("*.yaml")):
            spec = model_spec(path.stem, Path(tmp))
            cfg = load_config(base={"model": spec})
            sizes[path.stem] = sum(p.numel() for p in MultimodalModel(cfg.model, cfg.objective).parameters())
    return max(sizes, key=sizes.get)


def world_of(spec: dict) -> str:
    kinds = {m.get("kind", name) for name, m in spec["modalities"].items()}
    return "xor" if kinds == {"vector"} else "simple"


def model_spec(name: str, data: Path) -> dict:
    """The named model config with its tokenizer (if any) pointed at ``data`` (written when missing)."""
    from mmcl.data.synthetic import synth

    spec = yaml.safe_load((MODELS / f"{name}.yaml").read_text())
    world = world_of(spec)
    out = data / world
    if not (out / "world.json").is_file():
        synth(out, train=64, test=8, world=world, per_shard=64, workers=2)
    for m in spec["modalities"].values():
        if "tokenizer" in m:
            m["tokenizer"] = str(out / "tokenizer.model")
    return spec


def peak_flops(name: str, given: float | None) -> float:
    if given:
        return given * 1e12
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    sys.exit(f"bench/gpu_step.py: no known bf16 peak for {name!r}: pass --peak-tflops")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a named model config (default: the largest)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from a table)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_step.py: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        sys.exit(2)
    device_name = torch.cuda.get_device_name()
    peak = peak_flops(device_name, args.peak_tflops)

    from torch.utils.flop_counter import FlopCounterMode

    from mmcl.config import load_config
    from mmcl.data.shards import build_loader
    from mmcl.model import MultimodalModel
    from mmcl.train.engine import make_engine
    from mmcl.train.loop import seed_everything
    from mmcl.train.optim import build_optimizer, build_scheduler
    from mmcl.train.step import ForwardBackward, to_device

    name = args.model or largest_named_model()
    with tempfile.TemporaryDirectory() as tmp:
        spec = model_spec(name, Path(tmp))
        data = Path(tmp) / world_of(spec)
        train_spec = str(data / json.loads((data / "world.json").read_text())["splits"]["train"]["pattern"])
        cfg = load_config(base={"model": spec, "data": {"train": train_spec, "batch_size": args.batch},
                                "train": {"precision": "bf16", "steps": args.warmup + args.steps}})
        seed_everything(cfg.train.seed)
        model = MultimodalModel(cfg.model, cfg.objective)
        n_params = sum(p.numel() for p in model.parameters())
        engine = make_engine(cfg, model)
        stream = build_loader(train_spec, model.processors, args.batch, train=True, resample=True, shuffle_buffer=0)
        group = to_device([next(iter(stream))], engine.device)
    optimizer = build_optimizer(model, cfg, {})
    scheduler = build_scheduler(optimizer, cfg, cfg.train.steps)
    engine.prepare(model, optimizer)
    forward_backward = ForwardBackward(engine)
    engine.model.train()

    def step() -> None:
        forward_backward(group)
        engine.step()
        scheduler.step()

    for _ in range(args.warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        forward_backward(group)
    engine.optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    samples = len(group[0]["keys"])
    print(json.dumps({"model": name, "params": n_params, "device": device_name, "precision": "bf16",
                      "batch": samples, "s_per_step": round(seconds, 5),
                      "samples_per_s": round(samples / seconds, 1), "tflops_per_step": round(flops / 1e12, 4),
                      "achieved_tflops": round(flops / seconds / 1e12, 2), "peak_tflops": peak / 1e12,
                      "mfu": round(flops / seconds / peak, 4)}))


if __name__ == "__main__":
    main()
