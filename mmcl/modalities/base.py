"""The modality protocol and its registry.

A modality says how its tar members become tensors (``decode`` -> ``transform`` -> ``collate``) and builds
the tower that encodes them (``build_tower``). Adding one (depth, IMU, ECG) is one new file in this folder
that subclasses :class:`Modality` and registers itself with :func:`register_modality`; configs then name
it under ``model.modalities`` with ``kind: <name>``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mmcl.config import ConfigError, from_dict, to_dict


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")


def copy_model_file(src: Path, dst: Path) -> None:
    """Copy a file a modality names, or the top-level files of a directory it names except weights."""
    if not src.is_dir():
        shutil.copyfile(src, dst)
        return
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copyfile(f, dst / f.name)


class SampleError(Exception):
    """A sample cannot be used. ``reason`` is the short key it is counted under (``data.skipped``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class MissingModality(SampleError):
    """The sample has none of the members this modality reads."""

    def __init__(self, modality: str):
        super().__init__(f"missing_{modality}")
        self.modality = modality


class Tower(nn.Module):
    """An encoder: modality input batch -> ``[N, out_dim]`` features (before the projection head)."""

    out_dim: int

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks, first to last (for LiT-style partial unlocking and checkpointing)."""
        return []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


class TokenEmbedder(nn.Module):
    """A modality's tokeniser for a shared trunk (``model.shared_trunk``, :mod:`mmcl.shared`): modality input
    batch -> ``(tokens [N, L, width], valid [N, L] bool or None)``. The tokens carry their positions (the
    trunk adds the modality embedding); ``valid`` marks the tokens to attend to and pool (``None``: all)."""

    def blocks(self) -> list[nn.Module]:
        """None of its own: the repeated blocks are the shared trunk's (``train.towers.trunk``)."""
        return []


class Modality:
    """Base class of a registered modality. Subclasses set ``kind``, ``Config`` and ``members``."""

    kind: ClassVar[str]
    #: Dataclass with this modality's settings (decoding, transforms, tower).
    Config: ClassVar[type]
    #: Tar member extensions this modality can read, in order of preference (e.g. ``("flac", "wav", "mp4")``).
    members: ClassVar[tuple[str, ...]]

    def __init__(self, name: str, cfg: Any, base_dir: str | Path | None = None):
        self.name = name
        self.cfg = cfg
        #: Relative file paths in ``cfg`` (e.g. a tokenizer) resolve against this directory.
        self.base_dir = Path(base_dir) if base_dir is not None else Path.cwd()

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    # -- data side -------------------------------------------------------------------------------------
    def find_member(self, sample: dict[str, Any]) -> tuple[str, bytes]:
        """The first member of ``sample`` this modality reads; :class:`MissingModality` if none."""
        for ext in self.members:
            if sample.get(ext) is not None:
                return ext, sample[ext]
        raise MissingModality(self.name)

    def decode(self, sample: dict[str, Any]) -> Any:
        """Raw tar members of one sample -> decoded data. Raises :class:`SampleError` on bad input."""
        raise NotImplementedError

    def transform(self, data: Any, train: bool) -> torch.Tensor:
        """Decoded data -> the tensor for one sample (augment only when ``train``)."""
        raise NotImplementedError

    def empty(self) -> torch.Tensor:
        """Placeholder input for a sample missing this modality (masked out downstream)."""
        raise NotImplementedError

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        """Stack per-sample tensors into the tower's batch input."""
        return torch.stack(items)

    # -- model side ------------------------------------------------------------------------------------
    def build_tower(self) -> Tower:
        raise NotImplementedError

    def build_token_embedder(self, width: int) -> TokenEmbedder:
        """This modality's tokeniser for a shared trunk of ``width`` channels (a modality that can share a
        trunk overrides this)."""
        able = sorted(k for k, c in _REGISTRY.items() if c.build_token_embedder is not Modality.build_token_embedder)
        raise ConfigError(f"model.shared_trunk: modality {self.name!r} (kind {self.kind!r}) has no tokeniser for "
                          f"a shared trunk (kinds that have one: {', '.join(able)})")

    def files(self) -> dict[str, str]:
        """Files this modality's config points to (e.g. a tokenizer): ``{config field: path}``.
        ``save_pretrained`` copies them beside the weights and rewrites the field to the copy's name."""
        return {}

    def save_files(self, out_dir: Path) -> dict[str, Any]:
        """Write what this modality needs besides the weights into ``out_dir`` (by default a copy of each of
        :meth:`files`, named ``<modality>_<file name>``); returns the config fields to rewrite so that the
        saved model reads them from there: ``{dotted field (e.g. "tower.path"): value}``."""
        updates: dict[str, Any] = {}
        for field_name, src in self.files().items():
            dst = f"{self.name}_{Path(src).name}"
            if Path(src).resolve() != (out_dir / dst).resolve():
                copy_model_file(Path(src), out_dir / dst)
            updates[field_name] = dst
        return updates

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **to_dict(self.cfg)}


_REGISTRY: dict[str, type[Modality]] = {}


def register_modality(cls: type[Modality]) -> type[Modality]:
    """Class decorator: make ``cls`` available as ``kind: cls.kind`` in model configs."""
    if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
        raise ValueError(f"modality kind {cls.kind!r} registered twice")
    _REGISTRY[cls.kind] = cls
    return cls


def available_modalities() -> list[str]:
    return sorted(_REGISTRY)


def build_modality(name: str, spec: dict[str, Any], base_dir: str | Path | None = None) -> Modality:
    """``model.modalities.<name>`` (a dict with optional ``kind``) -> a configured :class:`Modality`."""
    spec = dict(spec)
    kind = spec.pop("kind", name)
    if kind not in _REGISTRY:
        raise ConfigError(f"model.modalities.{name}.kind: unknown modality {kind!r} "
                          f"(allowed: {', '.join(available_modalities())})")
    cls = _REGISTRY[kind]
    cfg = from_dict(cls.Config, spec, f"model.modalities.{name}")
    return cls(name, cfg, base_dir)
