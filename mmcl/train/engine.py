"""The engine under the training loop: one interface over how a step is distributed, picked once per run by
:func:`make_engine` from the config and the launcher.

* :class:`AccelerateEngine`: single process (CPU/GPU) and DDP (``torchrun`` / ``accelerate launch``).
* :class:`mmcl.train.zero.ZeroEngine`: DeepSpeed ZeRO-1/2/3 through accelerate's DeepSpeed plugin
  (``train.deepspeed``, or a DeepSpeed config given to ``accelerate launch``).

The loop drives either one the same way: ``prepare`` the model and optimizer, ``backward`` each
micro-batch's loss (``last`` marks the accumulation boundary, the others run under ``no_sync``), ``step``
(clip, optimizer step, zero_grad, the objective's clamp), ``save_state`` / ``load_state`` into a
checkpoint directory, ``full_state_dict`` / ``export`` for the plain fp32 model, ``log_values`` for the
log (one host read for all its values), and the few collectives the loop needs.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, gather_object
from torch import nn

from mmcl.config import Config, ConfigError
from mmcl.model import MultimodalModel


class Engine:
    """How the wrapped model is stepped, saved and gathered; see the module doc. ``model`` is the wrapped
    model (call it for embeddings), ``inner`` the plain :class:`MultimodalModel` inside it."""

    def __init__(self, accelerator: Accelerator, cfg: Config):
        self.accelerator = accelerator
        self.cfg = cfg
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device
        self.model: nn.Module
        self.inner: MultimodalModel
        self.optimizer: torch.optim.Optimizer
        #: The model's own parameter shapes (an engine may reshape parameters; exports restore them).
        self.shapes: dict[str, torch.Size] = {}

    def describe(self) -> str:
        raise NotImplementedError

    def build_model(self) -> MultimodalModel:
        """This rank's model (call it after seeding with ``train.seed``): built as ever on rank 0, so its
        weights are the seeded construction's; on the other ranks of a multi-process launch the architecture
        alone with uninitialised parameters (no initialisation, no checkpoint read; buffers as constructed):
        :meth:`prepare` gives every rank rank 0's weights (DDP and DeepSpeed broadcast the parameters)."""
        if self.world == 1 or self.rank == 0:
            return MultimodalModel(self.cfg.model, self.cfg.objective)
        model = self.architecture()
        materialize_parameters(model)
        return model

    def architecture(self) -> MultimodalModel:
        """The model's architecture alone: parameters on the meta device (no memory, no initialisation, no
        checkpoint read), buffers as constructed."""
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            return MultimodalModel(self.cfg.model, self.cfg.objective, pretrained=False)

    def load_weights(self, model: MultimodalModel, weights: dict[str, torch.Tensor]) -> None:
        """A checkpoint's weights into the model :meth:`build_model` made (resume, before :meth:`prepare`)."""
        model.load_state_dict(weights)

    def prepare(self, model: MultimodalModel, optimizer: torch.optim.Optimizer) -> None:
        """Wrap ``model`` and ``optimizer`` (built on ``model``'s parameters) for this launch."""
        self.shapes = {k: v.shape for k, v in model.state_dict().items()}
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.inner = self.accelerator.unwrap_model(self.model)

    def no_sync(self) -> AbstractContextManager:
        """Context of the micro-batches before the accumulation boundary (no gradient all-reduce)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's loss; ``last``: the accumulation boundary (the step follows)."""
        raise NotImplementedError

    def step(self) -> None:
        """After the boundary's backward: clip, optimizer step, zero the gradients, clamp the objective."""
        raise NotImplementedError

    def objective_scalars(self) -> dict[str, torch.Tensor]:
        """The objective's scalars (logit scale ...) as device tensors; a collective where parameters are
        partitioned."""
        return self.inner.objective.log_tensors()

    def log_values(self, loss: torch.Tensor) -> dict[str, float]:
        """``{"loss": mean over ranks, **objective scalars}`` as floats: one host read for all of them (a
        collective)."""
        scalars = self.objective_scalars()
        mean = self.accelerator.reduce(loss, "mean") if self.world > 1 else loss
        values = torch.stack([v.detach().float().reshape(()) for v in (mean, *scalars.values())]).tolist()
        return dict(zip(["loss", *scalars], values))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's fp32 weights in the model's own shapes (a collective: every rank gets them)."""
        raise NotImplementedError

    def export(self) -> MultimodalModel:
        """A plain single-device model with the trained fp32 weights, for save and eval (a collective)."""
        return self.inner

    def save_state(self, directory: Path) -> dict[str, Any]:
        """Write this rank's engine state into the checkpoint ``directory``; returns the entries for
        ``state.pt`` (written by the main process). Every rank calls it."""
        state = {}
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def load_state(self, directory: Path, state: dict[str, Any]) -> None:
        """Restore what :meth:`save_state` wrote (after :meth:`prepare`)."""
        if self.accelerator.scaler is not None and state.get("scaler"):
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def check_checkpoint(self, directory: Path, state: dict[str, Any]) -> None:
        """One-line error for a checkpoint written by another kind of engine."""
        raise NotImplementedError

    # -- collectives -----------------------------------------------------------------------------------
    def gather_object(self, items: list[Any]) -> list[Any]:
        """Every rank's ``items``, concatenated in rank order."""
        return gather_object(items) if self.world > 1 else items

    def broadcast_object(self, obj: Any) -> Any:
        """The main process's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def end(self) -> None:
        self.accelerator.end_training()


class AccelerateEngine(Engine):
    """Single process or DDP through accelerate (autocast and the fp16 grad scaler included)."""

    def describe(self) -> str:
        return "no DeepSpeed"

    def no_sync(self) -> AbstractContextManager:
        return self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.accelerator.backward(loss)

    def step(self) -> None:
        if self.cfg.train.clip_grad > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.inner.objective.clamp_()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() for k, v in self.inner.state_dict().items()}

    def save_state(self, directory: Path) -> dict[str, Any]:
        return {**super().save_state(directory), "optimizer": self.optimizer.state_dict()}

    def load_state(self, directory: Path, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        super().load_state(directory, state)

    def check_checkpoint(self, directory: Path, state: dict[str, Any]) -> None:
        if "optimizer" not in state:
            raise ConfigError(f"--resume {directory}: written under DeepSpeed, resumed without it")


def materialize_parameters(module: nn.Module) -> None:
    """Give every meta-device parameter of ``module`` uninitialised CPU storage (shared parameters stay
    shared); buffers are left as they are."""
    done: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                sub._parameters[name] = done[id(p)]


def resolve_precision(cfg: Config, cuda: bool) -> str:
    """The autocast of this launch: ``train.precision`` as given (bf16 autocast runs on CPU too); fp16 needs
    CUDA (its grad scaler) and DeepSpeed on CPU runs fp32 only (one-line errors otherwise)."""
    precision = cfg.train.precision
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision: fp16 needs a CUDA GPU (its grad scaler); on CPU use fp32 or bf16")
    deepspeed = cfg.train.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if precision != "fp32" and not cuda and deepspeed:
        raise ConfigError(f"train.precision: {precision} under DeepSpeed needs a CUDA GPU; on CPU DeepSpeed "
                          f"runs fp32 (allowed here: fp32)")
    return precision


def set_tf32(cfg: Config) -> None:
    """TF32 matmuls and convolutions on Ampere and newer GPUs unless ``train.tf32`` is off (fp32 runs then
    trade about 10 mantissa bits for tensor-core speed, as PyTorch recommends for training)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        mode = "tf32" if cfg.train.tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode


def make_accelerator(cfg: Config, model: nn.Module) -> Accelerator:
    """The Accelerator for this launch (DeepSpeed when ``train.deepspeed`` or ``accelerate launch`` names a
    config; ``model`` sizes its "auto" buckets)."""
    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg, cuda)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # On CPU accelerate must be told gloo, else it believes the world size is 1 (see shared/ENV.md).
    handlers = [InitProcessGroupKwargs(backend="gloo")] if world > 1 and not cuda else []
    kwargs: dict[str, Any] = {}
    ds_path = cfg.train.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if ds_path:
        from accelerate.utils import DeepSpeedPlugin

        from mmcl.train.zero import bucket_size, deepspeed_config

        os.environ.pop("ACCELERATE_DEEPSPEED_CONFIG_FILE", None)
        ds_config = deepspeed_config(cfg, ds_path, world, bucket_size(model))
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config)
    mixed = {"fp32": "no"}.get(precision, precision)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed:
        # accelerate keeps its state per process: a later run in the same process (tests, notebooks) with
        # another precision starts it afresh (the process group, in PartialState, is kept).
        AcceleratorState._reset_state()
    # accelerate drops a DeepSpeed plugin without a word when told cpu=True; it runs on CPU regardless.
    accelerator = Accelerator(cpu=not cuda and not ds_path, kwargs_handlers=handlers, mixed_precision=mixed,
                              **kwargs)
    if accelerator.num_processes != world:
        raise ConfigError(f"the launcher started {world} process(es) but accelerate sees "
                          f"{accelerator.num_processes}: check the launcher settings")
    if bool(ds_path) != (accelerator.state.deepspeed_plugin is not None):
        hint = " (ACCELERATE_USE_CPU=1 in the environment drops it)" if os.environ.get("ACCELERATE_USE_CPU") else ""
        raise ConfigError(f"DeepSpeed config {ds_path} given but accelerate set up "
                          f"{accelerator.distributed_type}{hint}")
    return accelerator


def make_engine(cfg: Config, model: nn.Module) -> Engine:
    """The engine of this launch: DeepSpeed's when accelerate set up its plugin, else accelerate's."""
    set_tf32(cfg)
    accelerator = make_accelerator(cfg, model)
    if accelerator.state.deepspeed_plugin is None:
        return AccelerateEngine(accelerator, cfg)
    from mmcl.train.zero import ZeroEngine

    return ZeroEngine(accelerator, cfg)
