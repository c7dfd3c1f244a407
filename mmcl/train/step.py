"""Forward and backward of one optimizer step over its micro-batches: the model returns the embeddings,
the trainer computes the objective (``model.objective``, whose parameters are trained and saved with the
model) on them.

Gradient accumulation keeps the contrastive negatives of the whole accumulated batch (open_clip's
accum-freq): every micro-batch is first encoded without gradient, then re-encoded with gradient one at a
time and the loss computed against the cached embeddings of the others. Each of those backward passes
carries the whole batch's gradient for its own micro-batch's embeddings, so their sum is the large-batch
gradient of the towers; the objective's own parameters (logit scale, bias) see the whole loss every
time, so their gradient is divided by the number of micro-batches. The update therefore equals the
large-batch update, provided the towers are deterministic between the two passes (no dropout).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from mmcl.train.engine import Engine


def micro_batches(loader: Iterable[dict[str, Any]], accum: int) -> Iterator[list[dict[str, Any]]]:
    """Group the loader's batches ``accum`` at a time (a short group at the end of an epoch is kept)."""
    group: list[dict[str, Any]] = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum:
            yield group
            group = []
    if group:
        yield group


def to_device(group: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    """The micro-batches with their tensors on the training device (the loader yields CPU tensors)."""
    if device.type == "cpu":
        return group
    return [{**b, "inputs": {k: v.to(device, non_blocking=True) for k, v in b["inputs"].items()},
             "present": {k: v.to(device, non_blocking=True) for k, v in b["present"].items()}} for b in group]


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class ObjectiveGradScale:
    """Divides the gradient of the objective's parameters by the number of micro-batches of the step: each
    micro-batch's backward carries the whole accumulated batch's gradient for them (see the module doc)."""

    def __init__(self, objective: nn.Module):
        self.micro_batches = 1
        self.handles = [p.register_hook(self._scale) for p in objective.parameters() if p.requires_grad]

    def _scale(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / self.micro_batches if self.micro_batches > 1 else grad


class ForwardBackward:
    """``step(group)``: the forward and backward passes of one optimizer step over ``group`` (micro-batches
    on the engine's device; a batch's ``features``, where the frozen-feature cache gave them, go through the
    heads in place of the towers) on a prepared engine; returns the (local, detached) loss of the whole group.
    The update itself is ``engine.step()``."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.objective = engine.inner.objective
        self.scale = ObjectiveGradScale(self.objective)

    def __call__(self, group: list[dict[str, Any]]) -> torch.Tensor:
        engine, model = self.engine, self.engine.model
        self.scale.micro_batches = len(group)
        if len(group) == 1:
            loss = self.objective(model(group[0]["inputs"], group[0].get("features")), group[0]["present"])
            engine.backward(loss, True)
            return loss.detach()
        present = _cat([b["present"] for b in group])
        with torch.no_grad():
            cached = [model(b["inputs"], b.get("features")) for b in group]
        for j, b in enumerate(group):
            last = j == len(group) - 1
            with nullcontext() if last else engine.no_sync():
                fresh = model(b["inputs"], b.get("features"))
                emb = _cat([fresh if i == j else c for i, c in enumerate(cached)])
                loss = self.objective(emb, present)
                engine.backward(loss, last)
        return loss.detach()

