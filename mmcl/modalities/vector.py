"""Vector: a generic feature vector or tabular row per sample, read from a ``.npy`` tar member;
:class:`VectorTower` = an MLP. Any modality that arrives as a fixed-size vector (precomputed features,
sensor summaries, tabular records, one-hot labels) is this one, named in a config::

    model:
      modalities:
        ecg: {kind: vector, dim: 12, standardize: features, mean: [...], std: [...],
              tower: {hidden: 256, depth: 2, activation: gelu}}

reads the member ``ecg.npy`` of every sample (``member`` picks another name).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mmcl.config import ConfigError
from mmcl.data.context import SampleContext
from mmcl.modalities.base import MissingModality, Processor, SampleError, TokenEmbedder, Tower, register_processor, register_tower
from mmcl.modalities.layers import init_linear_like_vit

#: Activations a :class:`VectorTower` can use between its layers.
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class VectorTowerConfig:
    type: Literal["mlp"] = "mlp"
    #: Width of the hidden layers (and the tower's output when ``depth > 0``).
    hidden: int = 128
    #: Hidden layers (Linear + activation). 0: no hidden layer, the tower passes the vector through and the
    #: model's projection head makes the whole encoder linear.
    depth: int = 2
    activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu"
    #: With a shared trunk (``model.shared_trunk``): the tokens one linear map makes of the vector (the MLP
    #: settings above are then unused).
    tokens: int = 1

    def validate(self, where: str) -> None:
        if self.hidden <= 0:
            raise ConfigError(f"{where}.hidden: must be > 0, got {self.hidden}")
        if self.depth < 0:
            raise ConfigError(f"{where}.depth: must be >= 0, got {self.depth}")
        if self.tokens <= 0:
            raise ConfigError(f"{where}.tokens: must be > 0, got {self.tokens}")


@dataclass
class VectorConfig:
    #: Length of the vector; an array of another shape is a bad sample.
    dim: int
    #: Tar member to read (its extension, e.g. ``feats.npy``); empty: ``<modality name>.npy``.
    member: str = ""
    #: ``none``; ``sample``: each vector to zero mean and unit std over its own entries; ``features``: each
    #: entry ``(x - mean) / std`` with the per-feature statistics below (e.g. of the training set).
    standardize: Literal["none", "sample", "features"] = "none"
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    #: The tower's config: a registered vector tower type (``mlp``).
    tower: Any = None

    def validate(self, where: str) -> None:
        if self.dim <= 0:
            raise ConfigError(f"{where}.dim: must be > 0, got {self.dim}")
        if self.standardize == "features":
            for name, values in (("mean", self.mean), ("std", self.std)):
                if len(values) != self.dim:
                    raise ConfigError(f"{where}.{name}: standardize 'features' needs {self.dim} values "
                                      f"(dim), got {len(values)}")
            if not all(math.isfinite(s) and s > 0 for s in self.std) or not all(map(math.isfinite, self.mean)):
                raise ConfigError(f"{where}: standardize 'features' needs finite mean and std > 0")
        elif self.mean or self.std:
            raise ConfigError(f"{where}.mean/std: only used with standardize 'features' "
                              f"(got standardize {self.standardize!r})")


@register_processor
class Vector(Processor):
    kind = "vector"
    Config = VectorConfig
    #: The one member read is per instance (config ``member``, default ``<name>.npy``): see :attr:`member`.
    members = ()

    def __init__(self, name: str, cfg: VectorConfig, base_dir: Any = None):
        super().__init__(name, cfg, base_dir)
        self.member = (cfg.member or f"{name}.npy").lower()
        self.bad = f"bad_{name}"
        if cfg.standardize == "features":
            self.mean = torch.tensor(cfg.mean, dtype=torch.float32)
            self.std = torch.tensor(cfg.std, dtype=torch.float32)

    def find_member(self, sample: dict[str, Any]) -> tuple[str, bytes]:
        if sample.get(self.member) is None:
            raise MissingModality(self.name)
        return self.member, sample[self.member]

    def decode(self, sample: dict[str, Any], ctx: SampleContext | None = None) -> torch.Tensor:
        """``<member>`` (``.npy`` bytes of a numeric array of shape ``[dim]``) -> float32 ``[dim]``.

        Unreadable bytes, a pickled object, another shape, a non-numeric dtype or a non-finite entry raise
        ``SampleError("bad_<name>")``.
        """
        _, data = self.find_member(sample)
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:
            raise SampleError(self.bad, f"unreadable npy: {type(e).__name__}: {e}") from None
        if not isinstance(array, np.ndarray) or array.shape != (self.cfg.dim,):
            shape = getattr(array, "shape", type(array).__name__)
            raise SampleError(self.bad, f"expected shape ({self.cfg.dim},), got {shape}")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) \
                or np.issubdtype(array.dtype, np.complexfloating):
            raise SampleError(self.bad, f"expected a real numeric array, got dtype {array.dtype}")
        with np.errstate(over="ignore"):  # out of float32 range becomes inf, reported just below
            out = torch.from_numpy(array.astype(np.float32))
        if not torch.isfinite(out).all():
            raise SampleError(self.bad, "non-finite entries (or out of float32 range)")
        return out

    def transform(self, data: torch.Tensor, train: bool, ctx: SampleContext | None = None) -> torch.Tensor:
        """``[dim]`` -> standardised float32 ``[dim]`` (no augmentation)."""
        if self.cfg.standardize == "sample":
            return (data - data.mean()) / (data.std(correction=0) + 1e-6)
        if self.cfg.standardize == "features":
            return (data - self.mean) / self.std
        return data

    def cache_window(self, data: Any, train: bool, ctx: SampleContext | None = None) -> str:
        """No train-time randomness: the sample alone fixes its input."""
        return ""

    def empty(self) -> torch.Tensor:
        return torch.zeros(self.cfg.dim)


class VectorTower(Tower):
    """MLP ``[N, dim] -> [N, out_dim]``: ``depth`` x (Linear -> activation); ``out_dim`` is ``hidden``, or
    ``dim`` when ``depth == 0`` (the identity: the projection head alone then encodes the vector)."""

    def __init__(self, dim: int, cfg: VectorTowerConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for _ in range(cfg.depth):
            layers.append(nn.Sequential(nn.Linear(width, cfg.hidden), ACTIVATIONS[cfg.activation]()))
            width = cfg.hidden
        self.layers = nn.ModuleList(layers)
        self.out_dim = width

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VectorTokens(TokenEmbedder):
    """Shared-trunk tokens of a vector: ``[N, dim]`` -> ``[N, tokens, width]``, one linear map whose output is
    cut into ``tokens`` pieces (each piece has its own weights, so the tokens need no positions)."""

    def __init__(self, dim: int, width: int, tokens: int):
        super().__init__()
        self.tokens, self.width = tokens, width
        self.proj = nn.Linear(dim, tokens * width)
        init_linear_like_vit(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.proj(x).view(x.shape[0], self.tokens, self.width), None


register_tower("vector", "mlp", config=VectorTowerConfig,
               build=lambda vector, pretrained: VectorTower(vector.cfg.dim, vector.cfg.tower),
               embedder=lambda vector, width: VectorTokens(vector.cfg.dim, width, vector.cfg.tower.tokens))
