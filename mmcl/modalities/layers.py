"""The layers towers are made of: token embedders (patch tokens of a grid with fixed sin-cos positions:
video, audio; token ids: text), a timm transformer :class:`Trunk` with optional gradient checkpointing, and
:class:`TokenTower` = embedder + trunk (+ its pooling). A shared trunk (:mod:`mmcl.shared`) is one trunk
behind every modality's embedder."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmcl.config import ConfigError, TrunkFields
from mmcl.modalities.base import TokenEmbedder, Tower


def use_fused_attention(module: nn.Module) -> int:
    """Make every timm attention layer in ``module`` call ``F.scaled_dot_product_attention`` (FlashAttention /
    memory-efficient kernels on GPUs) whatever ``TIMM_FUSED_ATTN`` says; returns how many were set."""
    layers = [m for m in module.modules() if hasattr(m, "fused_attn")]
    for m in layers:
        m.fused_attn = True
    return len(layers)


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

    @classmethod
    def of(cls, fields: TrunkFields, drop_path: float = 0.0) -> Trunk:
        return cls(fields.width, fields.depth, fields.heads, fields.mlp_ratio, drop_path)

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=r) for r in rates
        )
        self.norm = nn.LayerNorm(width)
        self.grad_checkpointing = False
        use_fused_attention(self)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, L, width]`` -> pooled ``[N, width]``: the mean over every token, or over the ``valid`` ones
        (``[N, L]`` bool), which are then also the only ones attended to."""
        x = tokens
        kwargs = {}
        if valid is not None:
            # A row with no valid token (a missing modality's placeholder) uses all of its tokens: its output
            # stays finite (attention over no key is NaN) and is masked out downstream.
            valid = valid | ~valid.any(dim=1, keepdim=True)
            kwargs["attn_mask"] = valid[:, None, None, :]
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False, **kwargs)
            else:
                x = blk(x, **kwargs)
        x = self.norm(x)
        if valid is None:
            return x.mean(dim=1)
        w = valid.unsqueeze(-1).to(x.dtype)
        return (x * w).sum(dim=1) / w.sum(dim=1)


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


class TokenTower(Tower):
    """A tower of this project's layers: ``x`` -> ``embed`` (a :class:`TokenEmbedder`) -> ``trunk`` (mean
    over the valid tokens) -> ``[N, width]``. ``init_vit``: timm-style init of the whole tower once both
    are built (the from-scratch video and audio towers)."""

    def __init__(self, embed: TokenEmbedder, trunk: Trunk, width: int, init_vit: bool = False):
        super().__init__()
        self.embed = embed
        self.trunk = trunk
        self.out_dim = width
        if init_vit:
            init_linear_like_vit(self)

    def blocks(self) -> list[nn.Module]:
        return list(self.trunk.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(*self.embed(x))


# ----------------------------------------------------------------------------------------------------
# Token embedders


def tubelet_stem(width: int, patch: int, tubelet: int, stem: str, stem_channels: int, where: str) -> nn.Module:
    """``[N, 3, T, S, S]`` -> ``[N, width, T / tubelet, S / patch, S / patch]``: one linear tubelet projection
    (``stem: patch``), or a 3x3 stride-2 convolution per frame then the projection of ``patch / 2`` cells
    (``stem: conv``)."""
    if stem == "patch":
        return nn.Conv3d(3, width, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))
    if patch % 2:
        raise ConfigError(f"{where}.patch: the conv stem needs an even patch, got {patch}")
    half = patch // 2
    return nn.Sequential(
        nn.Conv3d(3, stem_channels, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        nn.GELU(),
        nn.Conv3d(stem_channels, width, kernel_size=(tubelet, half, half), stride=(tubelet, half, half)),
    )


class PatchTokens(TokenEmbedder):
    """A grid input -> ``[N, L, width]`` patch tokens plus fixed sin-cos positions over the patch ``grid``
    (every token valid). ``embed`` maps ``[N, C, *size]`` to ``[N, width, *grid]``; ``time_first``: batches
    come as ``[N, T, C, H, W]`` (video) and are fed to it as ``[N, C, T, H, W]``. ``init``: timm-style init
    here (off when the tower that holds it initialises itself and its trunk at once)."""

    def __init__(self, embed: nn.Module, grid: tuple[int, ...], width: int, time_first: bool = False,
                 init: bool = True):
        super().__init__()
        self.embed = embed
        self.time_first = time_first
        self.register_buffer("pos", sincos_nd(grid, width)[None], persistent=False)
        if init:
            init_linear_like_vit(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        if self.time_first:
            x = x.transpose(1, 2)
        return self.embed(x).flatten(2).transpose(1, 2) + self.pos, None


class IdTokens(TokenEmbedder):
    """Token ids ``[N, L]`` (``L <= max_len``) -> embeddings plus learned positions ``[N, L, width]``, valid
    where the id is not ``pad_id``."""

    def __init__(self, vocab_size: int, max_len: int, width: int, pad_id: int):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        nn.init.trunc_normal_(self.embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(ids) + self.pos[: ids.shape[1]], ids != self.pad_id
