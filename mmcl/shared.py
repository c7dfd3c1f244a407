"""One transformer trunk shared by every modality (VATT-style, Akbari et al. 2021), selected by
``model.shared_trunk``::

    model:
      embed_dim: 128
      shared_trunk: {width: 128, depth: 4, heads: 4}
      modalities:
        video: {frames: 8, size: 64, tower: {patch: 16, tubelet: 4, stem: conv}}
        audio: {n_mels: 64, tower: {patch: 16}}
        text: {tokenizer: tokenizer.model, max_len: 40}

Each modality's tokeniser (:meth:`mmcl.modalities.Modality.build_token_embedder`: tubelet patches, spectrogram
patches, token ids, vector pieces) makes ``width``-wide tokens with their positions; the trunk adds a learned
modality embedding, runs its one stack of timm ViT blocks over one modality at a time (attending only to the
valid tokens: text padding is hidden) and mean-pools the valid tokens. The model's per-modality projection
heads and objective follow as with separate towers.

In :class:`mmcl.model.MultimodalModel` the shared model's ``towers`` are each modality's tokeniser plus the
trunk under the name ``trunk``, so ``train.towers`` controls them as towers: ``train.towers.<modality>``
locks or sets the lr of that modality's tokeniser (and, for the lr, its head), ``train.towers.trunk`` the
trunk: ``lock``/``unlocked_blocks``, ``frozen_blocks`` (the modality embeddings count as its stem),
``grad_checkpointing``, ``lr``.
"""

from __future__ import annotations

import torch
from torch import nn

from mmcl.config import ConfigError, SharedTrunkConfig
from mmcl.modalities import Modality
from mmcl.modalities.layers import Trunk

#: The shared trunk's name among the model's towers (and in ``train.towers``).
TRUNK = "trunk"


class SharedTrunk(nn.Module):
    """Tokens of one modality ``[N, L, width]`` (+ its learned embedding) -> the shared blocks -> LayerNorm ->
    mean over the valid tokens ``[N, width]``."""

    def __init__(self, cfg: SharedTrunkConfig, modalities: list[str]):
        super().__init__()
        #: Row of each modality in ``modality_embed``.
        self.order = {m: i for i, m in enumerate(modalities)}
        # One parameter of the trunk itself (not a ParameterDict, whose forward never runs): DeepSpeed ZeRO-3
        # gathers a module's own parameters before its forward. Registered before the blocks, so
        # ``frozen_blocks`` freezes it with the first blocks, like a stem.
        self.modality_embed = nn.Parameter(torch.zeros(len(modalities), cfg.width))
        nn.init.trunc_normal_(self.modality_embed, std=0.02)
        self.encoder = Trunk(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.drop_path)

    def blocks(self) -> list[nn.Module]:
        return list(self.encoder.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None, modality: str) -> torch.Tensor:
        """``tokens [N, L, width]``, ``valid [N, L]`` bool or None (all valid) -> ``[N, width]``."""
        return self.encoder(tokens + self.modality_embed[self.order[modality]], valid)


def build_shared_towers(modalities: dict[str, Modality], cfg: SharedTrunkConfig) -> nn.ModuleDict:
    """``{modality: its tokeniser, ..., "trunk": SharedTrunk}`` for :class:`mmcl.model.MultimodalModel`."""
    if TRUNK in modalities:
        raise ConfigError(f"model.modalities.{TRUNK}: the name is taken by model.shared_trunk; rename the modality")
    towers = nn.ModuleDict({name: m.build_token_embedder(cfg.width) for name, m in modalities.items()})
    towers[TRUNK] = SharedTrunk(cfg, list(modalities))
    return towers


def encode_shared(towers: nn.ModuleDict, name: str, x: torch.Tensor) -> torch.Tensor:
    """Modality ``name``'s batch input -> its tokens -> the trunk -> ``[N, width]`` features."""
    tokens, valid = towers[name](x)
    return towers[TRUNK](tokens, valid, name)
