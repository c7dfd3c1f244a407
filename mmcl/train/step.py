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

from mmcl.objectives.base import check_present
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
    """The micro-batches with their tensors on the training device (the loader yields CPU tensors, pinned
    on CUDA, so the copies are asynchronous). A modality's ``present`` masks are dropped when they are all
    true in every micro-batch: decided here on the host copies, so the objective takes its no-mask path
    without reading anything back from the device. A sample with fewer than two present modalities is a
    ``ValueError`` here (the objective's own check, on the host)."""
    for b in group:  # the objective's per-sample check, on the host copies (the step itself skips it)
        if b["present"]:
            # modalities the feature cache serves are in features, not inputs
            names = [*b["inputs"], *(m for m in b.get("features", {}) if m not in b["inputs"])]
            n = len(b["keys"])
            some = next(iter(b["present"].values()))
            ones = torch.ones(n, dtype=torch.bool, device=some.device)
            check_present(torch.stack([b["present"].get(m, ones) for m in names], 1), names, n)
    incomplete = {m for b in group for m, p in b["present"].items() if not p.all()}
    group = [{**b, "present": {m: p for m, p in b["present"].items() if m in incomplete}} for b in group]
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
    on the engine's device, :func:`to_device`; a batch's ``features``, where the frozen-feature cache gave them,
    go through the heads in place of the towers) on a prepared engine; returns the (local, detached) loss of
    the whole group. The update itself is ``engine.step()``. Nothing in it reads a device value back to the
    host: the objective runs with ``check=False`` and, when ``full_batches`` (every rank's batches are full:
    ``data.resample`` or ``data.drop_last``), with the ranks' batch sizes known instead of exchanged."""

    def __init__(self, engine: Engine, full_batches: bool = False):
        self.engine = engine
        self.objective = engine.inner.objective
        self.scale = ObjectiveGradScale(self.objective)
        self.full_batches = full_batches

    def loss(self, emb: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
        n = next(iter(emb.values())).shape[0]
        sizes = [n] * self.engine.world if self.full_batches and self.engine.world > 1 else None
        return self.objective(emb, present, check=False, sizes=sizes)

    def __call__(self, group: list[dict[str, Any]]) -> torch.Tensor:
        engine, model = self.engine, self.engine.model
        self.scale.micro_batches = len(group)
        if len(group) == 1:
            loss = self.loss(model(group[0]["inputs"], group[0].get("features")), group[0]["present"])
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
                loss = self.loss(emb, present)
                engine.backward(loss, last)
        return loss.detach()

