"""Processors, towers and their registries.

The data side and the model side of a modality are apart:

- a :class:`Processor` turns the tar members of a sample into tensors (find the member, ``decode``,
  ``transform``, ``empty`` placeholder, ``collate``) and saves the files it reads (a tokenizer, an HF image
  processor or feature extractor) beside the weights. One processor class per modality kind, registered with
  :func:`register_processor`; configs name it under ``model.modalities`` with ``kind: <name>``.
- a :class:`Tower` turns a batch of those tensors into ``[N, out_dim]`` features. Tower types are registered
  per modality kind with :func:`register_tower` (as timm's ``register_model``): its config class (a dataclass
  with ``type: Literal[<name>]``), its builder and, where it needs a particular input (normalisation, an HF
  tokenizer or feature extractor, log-mel or waveform), the input pipeline the processor runs for it.
  A config picks one with ``tower: {type: <name>, ...}``; adding a tower type is one registration.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from mmcl.config import TAG, ConfigError, from_dict, to_dict
from mmcl.data.context import SampleContext

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")


def copy_model_file(src: Path, dst: Path) -> None:
    """Copy a file a processor names, or the top-level files of a directory it names except weights."""
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
    """An encoder: modality input batch -> ``[N, out_dim]`` features (before the projection head). Built from
    this project's layers (a token embedder + :class:`~mmcl.modalities.layers.Trunk`) or wrapping a pretrained
    transformers / timm model; either way ``blocks`` and ``set_grad_checkpointing`` are what the trainer's
    tower controls (lock / unlock, checkpointing) use."""

    out_dim: int

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks, first to last (for LiT-style partial unlocking and checkpointing)."""
        return []

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


def frozen_to_eval(module: nn.Module) -> None:
    """Put ``module``'s frozen parts in eval mode (call after ``module.train()``): a locked tower or a frozen
    block must give deterministic features (no dropout, drop path or batch-norm statistics updates). Frozen
    are the submodules whose parameters are all frozen, and the parameter-free ones (dropout, drop path)
    registered before the first trainable parameter (e.g. a ViT's ``pos_drop`` after a frozen stem). A module
    with no frozen parameter is left as it is."""
    if all(p.requires_grad for p in module.parameters()):
        return
    seen_trainable = False
    for m in module.modules():  # registration order, parents before their children
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()
        elif not params and not seen_trainable:
            m.eval()
        seen_trainable = seen_trainable or any(p.requires_grad for p in m.parameters(recurse=False))


class TokenEmbedder(nn.Module):
    """A modality's token embedder: modality input batch -> ``(tokens [N, L, width], valid [N, L] bool or
    None)``. The tokens carry their positions; ``valid`` marks the tokens to attend to and pool (``None``:
    all). A tower of this project's layers is one of these + a trunk; with a shared trunk
    (``model.shared_trunk``, :mod:`mmcl.shared`) every modality's embedder feeds the one trunk."""

    def blocks(self) -> list[nn.Module]:
        """None of its own: the repeated blocks are the trunk's."""
        return []


class Processor:
    """Base class of a registered modality's data side. Subclasses set ``kind``, ``Config`` and ``members``.

    ``cfg.tower`` is the parsed config of the modality's tower type; the input pipeline that tower type
    declares (:func:`register_tower` ``inputs``) is :attr:`input` (None when it declares none)."""

    kind: ClassVar[str]
    #: Dataclass with this modality's settings (decoding, transforms, and ``tower``: its tower's config).
    Config: ClassVar[type]
    #: Tar member extensions this modality can read, in order of preference (e.g. ``("flac", "wav", "mp4")``).
    members: ClassVar[tuple[str, ...]]
    #: Whether this modality lives in time (video, audio): it then decodes the sample's ``ctx.window`` when
    #: ``data.clip`` is set, and its media give the sample's duration when the metadata lacks one.
    timed: ClassVar[bool] = False

    def __init__(self, name: str, cfg: Any, base_dir: str | Path | None = None):
        self.name = name
        self.cfg = cfg
        #: Relative file paths in ``cfg`` (e.g. a tokenizer) resolve against this directory.
        self.base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
        #: Config fields are named from here in errors (``model.modalities.<name>``).
        self.where = f"model.modalities.{name}"
        inputs = tower_type(self.kind, cfg.tower.type).inputs
        self.input: Any = inputs(self) if inputs is not None else None

    #: Train-time augmentation of this modality (its kind's part of ``data.augment``, :mod:`mmcl.data.augment`):
    #: None except on the training loader's copies (:meth:`with_augment`); never saved with the model.
    augment: Any = None

    def with_augment(self, augment: Any) -> Processor:
        """A shallow copy of this processor that augments with ``augment`` when it transforms for training."""
        out = copy.copy(self)
        out.augment = augment
        return out

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def find_member(self, sample: dict[str, Any]) -> tuple[str, bytes]:
        """The first member of ``sample`` this modality reads; :class:`MissingModality` if none."""
        for ext in self.members:
            if sample.get(ext) is not None:
                return ext, sample[ext]
        raise MissingModality(self.name)

    def check_window(self, seconds: float, where: str) -> None:
        """Refuse (``ConfigError``) a ``data.clip`` window of ``seconds`` this modality's settings contradict."""

    def decode(self, sample: dict[str, Any], ctx: SampleContext | None = None) -> Any:
        """Raw tar members of one sample -> decoded data. Raises :class:`SampleError` on bad input. ``ctx`` (None
        outside the loader) says which sample this is, for anything drawn per sample (:class:`SampleContext`)."""
        raise NotImplementedError

    def transform(self, data: Any, train: bool, ctx: SampleContext | None = None) -> torch.Tensor:
        """Decoded data -> the tensor for one sample (augment only when ``train``; per-sample randomness from
        ``ctx`` when given, so that it is the same on every rank and after a resume)."""
        raise NotImplementedError

    def empty(self) -> torch.Tensor:
        """Placeholder input for a sample missing this modality (masked out downstream)."""
        raise NotImplementedError

    def cache_window(self, data: Any, train: bool, ctx: SampleContext | None = None) -> str | None:
        """What fixes this sample's transformed input besides its key, for the frozen-feature cache
        (:mod:`mmcl.train.feature_cache`): ``""`` (the sample alone: ``transform`` is deterministic), a window's
        description (a time window that is a function of the sample: it joins the cache key), or None (drawn
        at random: never cached). Default: deterministic outside training, unknown (None) in training;
        processors without train-time randomness return ``""``."""
        return "" if not train else None

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        """Stack per-sample tensors into the tower's batch input."""
        return torch.stack(items)

    def files(self) -> dict[str, str]:
        """Files this processor's config points to (e.g. a tokenizer): ``{config field: path}``, by default its
        input's (``input.files()``). :meth:`save` copies them beside the weights."""
        files = getattr(self.input, "files", None)
        return files() if files is not None else {}

    def save(self, out_dir: Path) -> dict[str, Any]:
        """Write the files this processor reads into ``out_dir`` (the input's own ``save``, else a copy of each
        of :meth:`files`, named ``<modality>_<file name>``); returns the config fields to rewrite so that the
        saved model reads them from there: ``{dotted field (e.g. "tower.path"): value}``."""
        save = getattr(self.input, "save", None)
        if save is not None:
            return save(out_dir, self.name)
        updates: dict[str, Any] = {}
        for field_name, src in self.files().items():
            dst = f"{self.name}_{Path(src).name}"
            if Path(src).resolve() != (out_dir / dst).resolve():
                copy_model_file(Path(src), out_dir / dst)
            updates[field_name] = dst
        return updates

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **to_dict(self.cfg)}


# ----------------------------------------------------------------------------------------------------
# Registries


@dataclass(frozen=True)
class TowerType:
    """One registered tower type of a modality kind."""

    kind: str
    name: str
    #: Its config dataclass (``type: Literal[name]`` and its own fields), the modality's ``tower``.
    config: type
    #: ``(processor, pretrained)`` -> the tower. ``pretrained=False``: the architecture alone, no checkpoint
    #: read (``MultimodalModel.from_pretrained`` loads every weight from its own file afterwards).
    build: Callable[[Any, bool], Tower]
    #: ``processor`` -> the input pipeline the processor runs for this tower type (None: the kind's default).
    inputs: Callable[[Any], Any] | None = None
    #: ``(processor, width)`` -> its token embedder for a shared trunk (None: not available with one).
    embedder: Callable[[Any, int], TokenEmbedder] | None = None


_PROCESSORS: dict[str, type[Processor]] = {}
_TOWERS: dict[str, dict[str, TowerType]] = {}


def register_processor(cls: type[Processor]) -> type[Processor]:
    """Class decorator: make ``cls`` available as ``kind: cls.kind`` in model configs."""
    if cls.kind in _PROCESSORS and _PROCESSORS[cls.kind] is not cls:
        raise ValueError(f"modality kind {cls.kind!r} registered twice")
    _PROCESSORS[cls.kind] = cls
    return cls


def register_tower(kind: str, name: str, *, config: type, build: Callable[[Any, bool], Tower],
                   inputs: Callable[[Any], Any] | None = None,
                   embedder: Callable[[Any, int], TokenEmbedder] | None = None) -> TowerType:
    """Register tower type ``name`` for modality ``kind``. The first one registered for a kind is its default
    (``tower.type`` left out)."""
    if TAG not in {f.name for f in dataclasses.fields(config)}:
        raise ValueError(f"tower type {name!r} of modality kind {kind!r}: its config needs a {TAG!r} field")
    types = _TOWERS.setdefault(kind, {})
    if name in types:
        raise ValueError(f"tower type {name!r} of modality kind {kind!r} registered twice")
    types[name] = TowerType(kind, name, config, build, inputs, embedder)
    return types[name]


def available_modalities() -> list[str]:
    return sorted(_PROCESSORS)


def tower_type(kind: str, name: str) -> TowerType:
    return _TOWERS[kind][name]


def parse_tower(kind: str, spec: Any, where: str) -> Any:
    """``tower`` of a modality config (a mapping whose ``type`` picks a registered tower type) -> its config."""
    types = _TOWERS.get(kind, {})
    if not types:
        raise ConfigError(f"{where}: modality kind {kind!r} has no registered tower type")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping, got {spec!r}")
    name = spec.get(TAG, next(iter(types)))
    if name not in types:
        raise ConfigError(f"{where}.{TAG}: {name!r} is not allowed (allowed: {', '.join(map(repr, types))})")
    return from_dict(types[name].config, spec, where)


def build_processor(name: str, spec: dict[str, Any], base_dir: str | Path | None = None) -> Processor:
    """``model.modalities.<name>`` (a dict with optional ``kind``) -> its configured :class:`Processor`."""
    spec = dict(spec)
    kind = spec.pop("kind", name)
    where = f"model.modalities.{name}"
    if kind not in _PROCESSORS:
        raise ConfigError(f"{where}.kind: unknown modality {kind!r} (allowed: {', '.join(available_modalities())})")
    cls = _PROCESSORS[kind]
    tower = parse_tower(kind, spec.pop("tower", {}), f"{where}.tower")
    return cls(name, from_dict(cls.Config, {**spec, "tower": tower}, where), base_dir)


def build_tower(processor: Processor, pretrained: bool = True) -> Tower:
    """The tower of ``processor``'s modality (its ``cfg.tower``), with its pretrained weights unless
    ``pretrained`` is False (the architecture alone)."""
    return tower_type(processor.kind, processor.cfg.tower.type).build(processor, pretrained)


def build_token_embedder(processor: Processor, width: int) -> TokenEmbedder:
    """``processor``'s modality's token embedder for a shared trunk of ``width`` channels."""
    kind, name = processor.kind, processor.cfg.tower.type
    embedder = tower_type(kind, name).embedder
    if embedder is None:
        able = [n for n, t in _TOWERS[kind].items() if t.embedder is not None]
        if able:
            raise ConfigError(f"{processor.where}.tower.type: {name!r} towers are not available with "
                              f"model.shared_trunk (allowed: {', '.join(map(repr, able))})")
        kinds = sorted(k for k, types in _TOWERS.items() if any(t.embedder is not None for t in types.values()))
        raise ConfigError(f"model.shared_trunk: modality {processor.name!r} (kind {kind!r}) has no tokeniser "
                          f"for a shared trunk (kinds that have one: {', '.join(kinds)})")
    return embedder(processor, width)
