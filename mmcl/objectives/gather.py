"""Cross-rank gathering for global negatives.

Embeddings are gathered *with gradient* through :func:`torch.distributed.nn.functional.all_gather`:
its backward sums, over ranks, the gradients every rank computed for this rank's rows. Each rank then
computes only its own rows against the gathered columns (open_clip's local-loss trick), so the loss costs
``O(N_local x N_global)`` memory. Local batch sizes may differ between ranks (rows are padded for the
collective and the padding is cut off again). The sizes are a host-side fact: given by the caller when it
knows them (every rank's batch is full), else exchanged once per call (:func:`local_sizes`, the one host read
of a gather).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def world_size() -> int:
    """Number of processes in the default group; 1 when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group; 0 when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def local_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's local row count (this rank's is ``n``): one small all-gather and one host read."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return torch.cat(sizes).tolist()


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def all_gather_rows(x: Tensor, *, grad: bool = True, sizes: list[int] | None = None) -> tuple[Tensor, int]:
    """Concatenate every rank's ``x`` along dim 0.

    Args:
        x: ``[N_local, ...]`` this rank's rows (``N_local`` may differ between ranks).
        grad: keep the gradient path (the backward sums over ranks the gradients of this rank's rows).
        sizes: every rank's ``N_local`` when known (no exchange, no host read), else :func:`local_sizes`.

    Returns:
        ``([N_global, ...], offset)`` where ``offset`` is the index of this rank's first row, so that
        ``x_all[offset + arange(N_local)]`` are this rank's rows. Without an initialised process group of
        more than one rank this is ``(x, 0)``.
    """
    ws = world_size()
    if ws == 1:
        return x, 0
    if sizes is None:
        sizes = local_sizes(x.shape[0], x.device)
    elif len(sizes) != ws or sizes[rank()] != x.shape[0]:
        raise ValueError(f"sizes {sizes} do not match world size {ws} and this rank's {x.shape[0]} rows")
    longest = max(sizes)
    padded = _pad_rows(x, longest)
    if grad:
        parts = list(dist_fn.all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(ws)]
        dist.all_gather(parts, padded.contiguous())
    x_all = torch.cat(parts) if longest * ws == sum(sizes) else torch.cat([p[:n] for p, n in zip(parts, sizes)])
    return x_all, sum(sizes[: rank()])


def shared_permutations(count: int, n: int, device: torch.device) -> Tensor:
    """``count`` permutations of ``range(n)``, ``[count, n]`` on ``device``, drawn with ``torch.randperm`` from
    rank 0's global torch RNG (every rank draws, rank 0's are broadcast), so they are identical on all ranks
    and seeding torch reproduces them; no value is read back to the host.

    Used for Symile's ``negatives: n``.
    """
    perms = torch.stack([torch.randperm(n) for _ in range(count)]).to(device)
    if world_size() > 1:
        dist.broadcast(perms, src=0)
    return perms
