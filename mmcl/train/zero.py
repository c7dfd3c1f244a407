"""The DeepSpeed ZeRO-1/2/3 engine (accelerate's DeepSpeed plugin) and the DeepSpeed JSON it runs on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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


def partition_model(model: nn.Module, ds_config: dict[str, Any]) -> None:
    """Partition every parameter of ``model`` as ZeRO-3 keeps it, module by module, children before their
    parents: a module's parameters (meta ones given storage of their full size first) go through
    ``deepspeed.zero.Init``'s conversion, which broadcasts rank 0's values, keeps this rank's ``1/world`` slice
    in ``p.ds_tensor`` (on the device, or where the config's ``offload_param`` puts it, pinned if it says so) and
    leaves an empty placeholder in ``p.data``; then the next module. No rank holds more than one module's
    parameters in full beyond what it was handed (rank 0: its own build). Floating parameters take the dtype
    DeepSpeed computes in (bf16 / fp16 when the config enables it), as it would cast them in ``prepare``."""
    import deepspeed

    dtype = next((d for key, d in (("bf16", torch.bfloat16), ("fp16", torch.float16))
                  if ds_config.get(key, {}).get("enabled") is True), torch.float32)
    anchor: nn.Parameter | None = None
    done: dict[int, nn.Parameter] = {}
    for module in reversed(list(model.modules())):  # every module after all of its descendants
        fresh = []
        for name, p in list(module._parameters.items()):
            if p is None or id(p) in done:
                if p is not None:
                    module._parameters[name] = done[id(p)]  # shared with a module converted before
                continue
            q = (nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad) if p.is_meta
                 else p)
            if q.is_floating_point():
                q.data = q.data.to(dtype)
            done[id(p)] = module._parameters[name] = q
            fresh.append(q)
        if not fresh:
            continue
        if anchor is None:  # its descendants hold no parameters: the conversion takes exactly ``fresh``
            deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)
            anchor = fresh[0]
        else:
            anchor.convert_to_zero_parameters(param_list=fresh)


@contextmanager
def without_transformers_zero3() -> Iterator[None]:
    """Models built inside it are plain ones: accelerate's ZeRO-3 plugin makes transformers construct its
    models under a ``zero.Init`` of its own (a collective: a build on rank 0 alone hangs, one on the meta device
    fails); :func:`partition_model` partitions them after the build instead."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def load_partitioned(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``state`` (the model's own shapes) into a model partitioned by :func:`partition_model`, one module's
    parameters gathered at a time and written from rank 0's copy; buffers (never partitioned) directly."""
    import deepspeed

    for prefix, module in model.named_modules():
        params = {n: p for n, p in module.named_parameters(prefix=prefix, recurse=False) if n in state}
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                with torch.no_grad():
                    for n, p in params.items():
                        p.data.copy_(state[n].reshape(p.shape))
    buffers = {n for n, _ in model.named_buffers()}
    model.load_state_dict({k: v for k, v in state.items() if k in buffers}, strict=False)


def partitioned(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitions (:func:`partition_model` ran on it)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


class ZeroEngine(Engine):
    """DeepSpeed's engine clips, steps and zeroes; its optimizer keeps the fp32 master weights, partitioned
    from ZeRO-1 on (ZeRO-3 partitions the module's parameters too)."""

    @property
    def stage(self) -> int:
        return int(self.accelerator.state.deepspeed_plugin.zero_stage)

    def describe(self) -> str:
        return f"DeepSpeed ZeRO stage {self.stage}"

    def build_model(self) -> MultimodalModel:
        """Under ZeRO-3 partitioned as it is built (:func:`partition_model`): rank 0 builds the seeded model as
        ever (reading checkpoints), the other ranks the architecture on the meta device; every rank ends with
        its ``1/world`` of each parameter, rank 0's weights. ZeRO-1/2: :meth:`Engine.build_model`."""
        if self.stage != 3:
            return super().build_model()
        with without_transformers_zero3():
            model = MultimodalModel(self.cfg.model, self.cfg.objective) if self.rank == 0 else self.architecture()
        self.shapes = {k: v.shape for k, v in model.state_dict().items()}
        lift_scalar_parameters(model)
        partition_model(model, self.accelerator.state.deepspeed_plugin.deepspeed_config)
        return model

    def load_weights(self, model: MultimodalModel, weights: dict[str, torch.Tensor]) -> None:
        if partitioned(model):
            load_partitioned(model, weights)
        else:
            super().load_weights(model, weights)

    def prepare(self, model: MultimodalModel, optimizer: torch.optim.Optimizer) -> None:
        if not partitioned(model):  # else build_model took them
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
        with without_transformers_zero3() if self.stage == 3 else nullcontext():
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
