"""One transformer trunk shared by every modality (VATT-style, Akbari et al. 2021), selected by
``model.shared_trunk``::

    model:
      embed_dim: 128
      shared_trunk: {width: 128, depth: 4, heads: 4}
      modalities:
        video: {frames: 8, size: 64, tower: {patch: 16, tubelet: 4, stem: conv}}
        audio: {n_mels: 64, tower: {patch: 16}}
        text: {tokenizer: tokenizer.model, max_len: 40}

Each modality's token embedder (the one its tower type registers, :func:`mmcl.modalities.build_token_embedder`:
tubelet patches, spectrogram patches, token ids, vector pieces; the same layers as its separate tower's) makes
``width``-wide tokens with their positions; the one trunk adds a learned modality embedding, runs its
:class:`~mmcl.modalities.layers.Trunk` (the separate towers' trunk class) over one modality at a time (attending only to the
valid tokens: text padding is hidden) and mean-pools the valid tokens. The model's per-modality projection
heads and objective follow as with separate towers.

In :class:`mmcl.model.MultimodalModel` the shared model's ``towers`` are each modality's token embedder plus
the trunk under the one name ``trunk`` (its parameters are held once: safetensors refuses a tensor under two
names, and ZeRO-3 gathers a module's own parameters before its forward), so ``train.towers`` controls them as
towers: ``train.towers.<modality>`` locks or sets the lr of that modality's embedder (and, for the lr, its head), ``train.towers.trunk`` the
trunk: ``lock``/``unlocked_blocks``, ``frozen_blocks`` (the modality embeddings count as its stem),
``grad_checkpointing``, ``lr``.
"""

from __future__ import annotations

import torch
from torch import nn

from mmcl.config import ConfigError, SharedTrunkConfig
from mmcl.modalities import Processor, build_token_embedder
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
        self.encoder = Trunk.of(cfg, cfg.drop_path)

    def blocks(self) -> list[nn.Module]:
        return list(self.encoder.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None, modality: str) -> torch.Tensor:
        """``tokens [N, L, width]``, ``valid [N, L]`` bool or None (all valid) -> ``[N, width]``."""
        return self.encoder(tokens + self.modality_embed[self.order[modality]], valid)


def build_shared_towers(processors: dict[str, Processor], cfg: SharedTrunkConfig) -> nn.ModuleDict:
    """``{modality: its token embedder, ..., "trunk": SharedTrunk}`` for :class:`mmcl.model.MultimodalModel`."""
    if TRUNK in processors:
        raise ConfigError(f"model.modalities.{TRUNK}: the name is taken by model.shared_trunk; rename the modality")
    towers = nn.ModuleDict({name: build_token_embedder(p, cfg.width) for name, p in processors.items()})
    towers[TRUNK] = SharedTrunk(cfg, list(processors))
    return towers


def encode_shared(towers: nn.ModuleDict, name: str, x: torch.Tensor) -> torch.Tensor:
    """Modality ``name``'s batch input -> its embedder's tokens -> the trunk -> ``[N, width]`` features."""
    tokens, valid = towers[name](x)
    return towers[TRUNK](tokens, valid, name)
