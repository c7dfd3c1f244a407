"""The DeepSpeed ZeRO-1/2/3 engine (accelerate's DeepSpeed plugin) and the DeepSpeed JSON it runs on."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcl.config import Config, ConfigError
from mmcl.model import MultimodalModel
from mmcl.train.engine import Engine

#: DeepSpeed's communication buffers are allocated at their configured size whatever the model's (its
#: default, 5e8 elements, is 2 GB in fp32 under ZeRO-3); "auto" sizes them to the largest parameter.
BUCKETS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")


def bucket_size(model: nn.Module) -> int:
    """Elements of the model's largest parameter, rounded up to a multiple of 1024 (DeepSpeed wants
    aligned buckets): the "auto" size of DeepSpeed's communication buckets (accelerate uses hidden^2)."""
    return -(-max(p.numel() for p in model.parameters()) // 1024) * 1024


def deepspeed_config(cfg: Config, path: str, world: int, bucket: int) -> dict[str, Any]:
    """Read a DeepSpeed JSON and fill its "auto" fields from the train config (batch sizes, accumulation,
    clipping, precision) and the model (communication buckets of ``bucket`` elements, see
    :func:`bucket_size`); a field set to a value that disagrees with the train config is a one-line error
    (DeepSpeed would otherwise fail mid-setup)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed: file not found: {path}")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed: {path} is not valid JSON ({e})") from None
    wanted = {"train_micro_batch_size_per_gpu": cfg.data.batch_size,
              "gradient_accumulation_steps": cfg.train.grad_accum,
              "gradient_clipping": cfg.train.clip_grad,
              "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world}
    for key, value in wanted.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            source = ("data.batch_size x train.grad_accum x world size" if key == "train_batch_size"
                      else {"train_micro_batch_size_per_gpu": "data.batch_size",
                            "gradient_accumulation_steps": "train.grad_accum",
                            "gradient_clipping": "train.clip_grad"}[key])
            raise ConfigError(f"train.deepspeed: {path} sets {key}={ds[key]} but {source} = {value} "
                              f"(set it to \"auto\" or make them agree)")
    cuda = torch.cuda.is_available()
    for prec in ("bf16", "fp16"):
        section = ds.get(prec)
        if isinstance(section, dict) and section.get("enabled", False) == "auto":
            section["enabled"] = cfg.train.precision == prec and cuda
        elif isinstance(section, dict) and section.get("enabled") and not (cfg.train.precision == prec and cuda):
            raise ConfigError(f"train.deepspeed: {path} enables {prec} but train.precision={cfg.train.precision}"
                              f"{'' if cuda else ' and there is no GPU'} (set {prec}.enabled to \"auto\")")
    zero = ds.get("zero_optimization", {})
    for key in BUCKETS:
        if zero.get(key) == "auto":
            zero[key] = bucket
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def lift_scalar_parameters(model: nn.Module) -> None:
    """Give 0-dim parameters (the objective's logit scale, bias, temperature) shape [1]: DeepSpeed 0.19
    broadcasts every parameter at start-up as ``p.data.view(torch.uint8)``, which fails on 0-dim tensors.
    The objectives broadcast them either way; :meth:`ZeroEngine.full_state_dict` restores the shapes."""
    for p in model.parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)


class ZeroEngine(Engine):
    """DeepSpeed's engine clips, steps and zeroes; its optimizer keeps the fp32 master weights, partitioned
    from ZeRO-1 on (ZeRO-3 partitions the module's parameters too)."""

    @property
    def stage(self) -> int:
        return int(self.accelerator.state.deepspeed_plugin.zero_stage)

    def describe(self) -> str:
        return f"DeepSpeed ZeRO stage {self.stage}"

    def prepare(self, model: MultimodalModel, optimizer: torch.optim.Optimizer) -> None:
        self.shapes = {k: v.shape for k, v in model.state_dict().items()}
        lift_scalar_parameters(model)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.inner = self.accelerator.unwrap_model(self.model)
        if self.world > 1:  # DeepSpeed broadcasts rank 0's parameters, not its buffers (see build_model)
            for buffer in self.inner.buffers():
                torch.distributed.broadcast(buffer.data, src=0)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # The boundary is set by hand: each of these losses is the whole group's loss (no division by the
        # accumulation steps), and a short group at the end of an epoch still ends in an update.
        self.model.set_gradient_accumulation_boundary(last)
        self.model.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self.model.step()
        self.clamp_objective()

    def clamp_objective(self) -> None:
        """The logit-scale clamp, written into the optimizer's fp32 copy of the weights too, else the next
        step would start again from the unclamped value."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        objective = self.inner.objective
        params = [p for p in objective.parameters() if p.requires_grad]
        stage3 = self.stage == 3
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0) if stage3 else nullcontext():
            before = [p.detach().float().clone() for p in params]
            objective.clamp_()
            after = [p.detach().float().clone() for p in params]
        for p, b, a in zip(params, before, after):
            if torch.equal(a, b):
                continue
            if stage3:  # the gather's exit left this rank's partition of the clamped value in ds_tensor
                # (DeepSpeed 0.19's full-value setter fails on partitions padded past the parameter's end)
                safe_set_local_fp32_param(p, p.ds_tensor.detach().float())
            else:  # a collective; every rank computes the same clamp, so it runs everywhere
                safe_set_full_fp32_param(p, a)

    def objective_scalars(self) -> dict[str, torch.Tensor]:
        if self.stage != 3:
            return super().objective_scalars()
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.inner.objective.parameters())):
            return {k: v.clone() for k, v in super().objective_scalars().items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """From the optimizer's fp32 copy, gathered from every rank's partition."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        stage3 = self.stage == 3
        params = {id(p) for p in self.inner.parameters()}
        out = {}
        for name, tensor in self.inner.state_dict(keep_vars=True).items():
            value = safe_get_full_fp32_param(tensor) if id(tensor) in params else None
            if value is None:  # a buffer, or a frozen parameter (not in the optimizer)
                with deepspeed.zero.GatheredParameters([tensor]) if stage3 and id(tensor) in params else nullcontext():
                    value = tensor.detach().clone()
            out[name] = value.float().cpu().reshape(self.shapes[name])
        return out

    def export(self) -> MultimodalModel:
        fresh = MultimodalModel(self.cfg.model, self.cfg.objective)
        fresh.load_state_dict(self.full_state_dict())
        return fresh

    def save_state(self, directory: Path) -> dict[str, Any]:
        """Every rank's partitions in DeepSpeed's own checkpoint, ``directory/deepspeed``."""
        self.model.save_checkpoint(str(directory / "deepspeed"), tag="state")
        return super().save_state(directory)

    def load_state(self, directory: Path, state: dict[str, Any]) -> None:
        self.model.load_checkpoint(str(directory / "deepspeed"), load_module_strict=True)
        super().load_state(directory, state)

    def check_checkpoint(self, directory: Path, state: dict[str, Any]) -> None:
        if not (directory / "deepspeed").is_dir():
            raise ConfigError(f"--resume {directory}: written without DeepSpeed, resumed with DeepSpeed")
