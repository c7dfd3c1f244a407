"""Small layers shared by the patch-based towers (video, audio): fixed sin-cos positions and a timm
transformer trunk with optional gradient checkpointing."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sin-cos position table ``[n, dim]`` (dim even)."""
    if dim % 2:
        raise ValueError(f"sin-cos positions need an even dim, got {dim}")
    omega = 1.0 / (10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2)))
    pos = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([pos.sin(), pos.cos()], dim=1).float()


def sincos_nd(shape: tuple[int, ...], dim: int) -> torch.Tensor:
    """Fixed sin-cos positions for a grid ``shape`` (e.g. (T, H, W)) -> ``[prod(shape), dim]``.

    The channels are split between the axes (each axis gets an even share), as in MAE / VideoMAE.
    """
    n_axes = len(shape)
    per_axis = [2 * (dim // (2 * n_axes))] * n_axes
    per_axis[0] += dim - sum(per_axis)
    grids = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
    parts = [sincos_1d(s, d)[g.reshape(-1)] for s, d, g in zip(shape, per_axis, grids)]
    return torch.cat(parts, dim=1)


class Trunk(nn.Module):
    """A stack of timm ViT blocks over ``[N, L, width]`` tokens, then LayerNorm and mean pooling."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(width)
        self.grad_checkpointing = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, L, width]`` -> pooled ``[N, width]``."""
        x = tokens
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x).mean(dim=1)


def patch_grid(size: int, patch: int, name: str) -> int:
    if size % patch:
        raise ValueError(f"{name}: size {size} is not a multiple of patch {patch}")
    return size // patch


def init_linear_like_vit(module: nn.Module) -> None:
    """timm-style init: truncated normal for linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
            w = m.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

