"""Typed, validated configuration: model / data / objective / train / eval.

Configs are plain dataclasses. ``from_dict`` checks every field against its type (``Literal`` choices
included) and raises :class:`ConfigError` with one line naming the dotted field and what is allowed. A field
typed as a union of dataclasses that each declare their tag field as a ``Literal`` is a tagged union: the
mapping's tag picks the dataclass (the union's first when left out). The tag field is ``type`` unless the
members name another in ``TAG_FIELD`` (the objective's ``name``); a modality's ``tower`` is picked by its
``type`` from the tower registry (``mmcl.modalities.base``). Members that set ``SWITCH_KEEPS_OPTIONS`` ignore the fields of the union's other members, so
that one override of the tag (``--set objective.name=gram``) switches a recipe's member and keeps the
options the two share; a field no member has is still an error.
YAML files are loaded with :func:`load_config`; ``--set a.b=value`` overrides are applied with
:func:`apply_overrides` before validation, so a mistyped override fails exactly like a mistyped file.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from mmcl.data.augment import AugmentConfig
from mmcl.data.window import WindowConfig
from mmcl.errors import ConfigError

#: Top of the source tree, where the named configs live (``configs/``).
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


# ----------------------------------------------------------------------------------------------------
# Generic dataclass <-> dict conversion with validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


#: The field that picks one dataclass of a tagged union (e.g. ``tower: {type: timm, ...}``), unless the
#: members declare another as ``TAG_FIELD: ClassVar[str]``.
TAG = "type"


def _tag_field(cls: type) -> str:
    return getattr(cls, "TAG_FIELD", TAG)


def _tagged_choices(args: tuple[Any, ...]) -> tuple[str, dict[str, type]] | None:
    """A union of dataclasses that each declare their tag field (one field name for all of them) as a
    ``Literal[...]`` (one or more values, no value in two of them) -> ``(tag field, {value: dataclass})`` (in
    the union's order: the first value is the default when the tag is left out); None for any other union."""
    choices: dict[str, type] = {}
    members = [a for a in args if a is not type(None)]
    if not members or not all(dataclasses.is_dataclass(a) for a in members):
        return None
    name = _tag_field(members[0])
    for a in members:
        tag = typing.get_type_hints(a).get(name)
        values = typing.get_args(tag) if typing.get_origin(tag) is Literal else ()
        if _tag_field(a) != name or not values or any(v in choices for v in values):
            return None
        choices.update(dict.fromkeys(values, a))
    return name, choices


def _member_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert (dict -> dataclass, int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed (allowed: {', '.join(map(repr, args))})")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tagged = _tagged_choices(args)
        if tagged and isinstance(value, dict):
            name, choices = tagged
            tag = value.get(name, next(iter(choices)))
            if tag not in choices:
                raise ConfigError(f"{where}.{name}: {tag!r} is not allowed (allowed: {', '.join(map(repr, choices))})")
            cls = choices[tag]
            if getattr(cls, "SWITCH_KEEPS_OPTIONS", False):
                # Options of the union's other members are dropped, so that one override of the tag switches
                # a recipe's member and keeps the options the new one shares (--set objective.name=gram).
                others = set().union(*(_member_fields(c) for c in choices.values())) - _member_fields(cls)
                value = {k: v for k, v in value.items() if k not in others}
            return from_dict(cls, value, where)
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error names the exact field (e.g. a dataclass's)
            return _coerce(value, options[0], where)
        for a in options:
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: Any, data: dict | None, where: str = "") -> Any:
    """Build dataclass ``cls`` (or a member of the tagged union ``cls``) from ``data``, validating every
    field; unknown keys are errors."""
    if not dataclasses.is_dataclass(cls):
        return _coerce({} if data is None else data, cls, where or "config")
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{name}: unknown field (allowed: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}: required field is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where or cls.__name__)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config (dataclasses -> dicts, a tagged union's tag first), suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        names = sorted((f.name for f in dataclasses.fields(obj)), key=lambda n: n != getattr(obj, "TAG_FIELD", None))
        return {n: to_dict(getattr(obj, n)) for n in names}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _positive(where: str, **values: float) -> None:
    for k, v in values.items():
        if v is not None and v <= 0:
            raise ConfigError(f"{where}.{k}: must be > 0, got {v}")


# ----------------------------------------------------------------------------------------------------
# The configuration tree


@dataclass
class TrunkFields:
    """The shape of a transformer trunk: a tower's (video, audio, text) or the shared one."""

    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0

    def validate(self, where: str) -> None:
        _positive(where, width=self.width, depth=self.depth, heads=self.heads, mlp_ratio=self.mlp_ratio)
        if self.width % self.heads:
            raise ConfigError(f"{where}.width: {self.width} is not a multiple of heads {self.heads}")


@dataclass
class SharedTrunkConfig(TrunkFields):
    """One transformer trunk shared by every modality (VATT-style, ``mmcl/shared.py``): each modality's
    token embedder turns its input into ``width``-wide tokens, a learned modality embedding is added, the same
    ``depth`` timm ViT blocks encode them and the modality's valid tokens are mean-pooled."""

    #: Stochastic depth, rising linearly to this rate over the blocks.
    drop_path: float = 0.0

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.width % 2:  # sin-cos positions of the patch tokenisers split the channels in sin/cos halves
            raise ConfigError(f"{where}.width: must be even, got {self.width}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"{where}.drop_path: must be in [0, 1), got {self.drop_path}")


@dataclass
class ModelConfig:
    """Towers and heads. ``modalities`` maps a modality name to its own config (see ``mmcl.modalities``):
    decoding/transform settings plus the tower that encodes it; ``kind`` picks the registered modality
    (defaults to the name itself)."""

    embed_dim: int = 128
    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: One shared transformer trunk for all modalities instead of separate towers (each modality's ``tower``
    #: settings then only shape its tokeniser: patch, tubelet, stem).
    shared_trunk: SharedTrunkConfig | None = None
    #: The projection head of every modality to ``embed_dim``: a bias-free linear layer with random initial
    #: weights, or one that starts as the identity (towers already in one embedding space, e.g. video and
    #: text of one CLIP: the tower's width must be ``embed_dim``). ``heads`` overrides it per modality.
    head: Literal["linear", "identity"] = "linear"
    heads: dict[str, Literal["linear", "identity"]] = field(default_factory=dict)
    #: The objective's initial logit scale (and SigLIP bias): its own ``init_logit_scale``, or the
    #: checkpoint's that the identity-headed towers come from (``checkpoint``: they must share one two-tower
    #: checkpoint, e.g. one CLIPModel directory).
    logit_scale_init: Literal["objective", "checkpoint"] = "objective"

    def validate(self, where: str) -> None:
        _positive(where, embed_dim=self.embed_dim)
        if not self.modalities:
            raise ConfigError(f"{where}.modalities: at least two modalities are required")
        unknown = [m for m in self.heads if m not in self.modalities]
        if unknown:
            raise ConfigError(f"{where}.heads.{unknown[0]}: no such modality (allowed: {', '.join(self.modalities)})")

    def head_of(self, modality: str) -> str:
        """The head type of ``modality``: its ``heads`` entry, else ``head``."""
        return self.heads.get(modality, self.head)


@dataclass
class _ObjectiveOptions:
    """Options every objective has (formulas in DESIGN section 3); each objective's config adds its own."""

    TAG_FIELD: ClassVar[str] = "name"
    SWITCH_KEEPS_OPTIONS: ClassVar[bool] = True

    #: Upper bound of the logit scale s (GRAM: of 1/tau).
    max_logit_scale: float = 100.0
    #: Learn the scale (GRAM: the temperature); else it stays at its initial value.
    learn_logit_scale: bool = True
    #: Missing modalities: use the present ones of each sample, or a learned per-modality embedding.
    missing: Literal["present", "learned"] = "present"
    #: Gather embeddings across ranks (with gradient) for global negatives.
    gather: bool = True

    def validate(self, where: str) -> None:
        _positive(where, max_logit_scale=self.max_logit_scale)


@dataclass
class ClipConfig(_ObjectiveOptions):
    """CLIP / InfoNCE. Over several modalities: mean over all pairs, or each modality against ``anchor``."""

    name: Literal["clip"] = "clip"
    mode: Literal["all_pairs", "anchor"] = "all_pairs"
    anchor: str = "text"
    #: Initial logit scale s (the multiplier; t = log s is learned).
    init_logit_scale: float = 1 / 0.07


@dataclass
class SiglipConfig(_ObjectiveOptions):
    """SigLIP (sigmoid pairwise loss), pairs as for CLIP."""

    name: Literal["siglip"] = "siglip"
    mode: Literal["all_pairs", "anchor"] = "all_pairs"
    anchor: str = "text"
    init_logit_scale: float = 10.0
    init_logit_bias: float = -10.0


@dataclass
class SymileConfig(_ObjectiveOptions):
    """Symile (multilinear inner product of all modalities)."""

    name: Literal["symile"] = "symile"
    #: O(N) negatives (one permutation per non-anchor modality) or all N^(M-1) combinations.
    negatives: Literal["n", "n_squared"] = "n"
    init_logit_scale: float = 1 / 0.07


@dataclass
class GramConfig(_ObjectiveOptions):
    """GRAM (Gramian volume of the anchor with the other modalities)."""

    name: Literal["gram"] = "gram"
    anchor: str = "text"
    #: Initial temperature tau (the divisor).
    init_temperature: float = 0.07

    def validate(self, where: str) -> None:
        _positive(where, max_logit_scale=self.max_logit_scale, init_temperature=self.init_temperature)


#: The objective section: a tagged union on ``name``, each objective with its own options.
ObjectiveConfig = Union[ClipConfig, SiglipConfig, SymileConfig, GramConfig]


@dataclass
class DataConfig:
    """Where samples come from and how they are batched."""

    #: Brace-expanded shard list for training, e.g. ``data/train-{000000..000007}.tar`` (``pipe:`` allowed).
    train: str = ""
    #: Held-out shards (eval suites may name their own).
    test: str = ""
    batch_size: int = 64
    workers: int = 0
    shuffle_buffer: int = 1000
    shard_shuffle: bool = True
    #: Sample shards with replacement forever (epochs then have no end; use train.steps).
    resample: bool = False
    #: Keep decoded samples in RAM after the first pass (small datasets: skips decoding later epochs).
    cache: bool = False
    #: A sample missing a modality: skip it (counted) or keep it with that modality masked out.
    on_missing: Literal["skip", "mask"] = "skip"
    #: One time window per sample shared by video and audio, decoded alone (:mod:`mmcl.data.window`):
    #: ``{seconds, train: random|center, eval: center, eval_clips}``. None: each modality reads the whole
    #: clip (video: frames spread over all of it; audio: its own ``seconds`` window).
    clip: WindowConfig | None = None
    #: Train-time augmentation per modality kind (``video``: crop / flip / colour jitter, ``audio``:
    #: SpecAugment; see mmcl.data.augment); absent: none.
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    #: Training drops each loader's last partial batch (a contrastive objective needs enough negatives); eval
    #: never drops a sample.
    drop_last: bool = True
    #: Loader workers live across epochs (seeded per epoch as fresh ones would be).
    persistent_workers: bool = True
    #: Batches each loader worker prepares ahead.
    prefetch_factor: int = 4

    def validate(self, where: str) -> None:
        _positive(where, batch_size=self.batch_size, prefetch_factor=self.prefetch_factor)
        if self.workers < 0:
            raise ConfigError(f"{where}.workers: must be >= 0, got {self.workers}")


@dataclass
class TowerControl:
    """Training controls of one tower (``train.towers.<name>``; with a shared trunk the modalities'
    tokenisers and ``trunk``, see mmcl.shared)."""

    #: LiT: the whole tower frozen (``unlocked_blocks`` of its last blocks trainable again).
    lock: bool = False
    unlocked_blocks: int | None = None
    #: The first N blocks frozen, with the stem registered before them (patch or token embedding, positions).
    frozen_blocks: int | None = None
    #: The tower's learning rate instead of ``train.lr``.
    lr: float | None = None
    #: Its projection head's learning rate instead of ``train.lr`` (with a shared trunk: the modality's head;
    #: the trunk has none).
    head_lr: float | None = None
    grad_checkpointing: bool = False

    def validate(self, where: str) -> None:
        if self.lock and self.frozen_blocks is not None:
            raise ConfigError(f"{where}: lock and frozen_blocks exclude each other (lock freezes the whole tower; "
                              f"unlocked_blocks then unfreezes its last blocks)")
        if self.unlocked_blocks is not None and not self.lock:
            raise ConfigError(f"{where}.unlocked_blocks: only meaningful with lock: true")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {value}")


@dataclass
class TrainConfig:
    epochs: int = 1
    #: Stop after this many optimizer steps (overrides epochs when > 0).
    steps: int = 0
    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    clip_grad: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    log_keys: bool = False
    checkpoint_every: int = 0
    keep_last: int = 2
    #: Per-tower controls (:class:`TowerControl`): {modality: ...}; with a shared trunk, {modality: its
    #: tokeniser, trunk: the shared blocks}.
    towers: dict[str, TowerControl] = field(default_factory=dict)
    progress: bool = True
    #: Torch intra-op threads (0: leave torch's default).
    threads: int = 0
    #: Frozen-feature cache of the fully locked towers whose input is fixed per sample
    #: (:mod:`mmcl.train.feature_cache`): ``auto`` (in RAM when the features of a data set of known size fit in
    #: ``feature_cache_ram_gb``, else on disk beside the run), ``ram``, ``disk`` or ``none``.
    feature_cache: Literal["auto", "ram", "disk", "none"] = "auto"
    feature_cache_ram_gb: float = 2.0
    #: DeepSpeed config JSON (ZeRO stage etc.; "auto" values are filled from this config). Empty: no
    #: DeepSpeed, unless ``accelerate launch`` was given a DeepSpeed config.
    deepspeed: str = ""
    #: TF32 tensor-core matmuls / convolutions for fp32 math on Ampere+ GPUs (no effect elsewhere).
    tf32: bool = True
    #: ``torch.compile`` each tower (and its head) before training.
    compile: bool = False

    def validate(self, where: str) -> None:
        _positive(where, lr=self.lr, grad_accum=self.grad_accum)
        if self.epochs <= 0 and self.steps <= 0:
            raise ConfigError(f"{where}: set epochs > 0 or steps > 0")


@dataclass
class EvalConfig:
    #: Eval suite file (``configs/eval/*.yaml``), relative paths resolved against configs/eval.
    suite: str = ""
    #: Run the suite every N steps during training (0: only at the end).
    every: int = 0
    batch_size: int = 128


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ClipConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------------
# Loading


def resolve_config_path(path: str | Path, kind: str = "train") -> Path:
    """``path`` as given, or a named config under ``configs/<kind>/`` (``demo`` -> configs/train/demo.yaml)."""
    p = Path(path)
    if p.is_file():
        return p
    named = CONFIG_DIR / kind / (p.name if p.suffix else f"{p.name}.yaml")
    if named.exists():
        return named
    raise ConfigError(f"config file not found: {path}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string; a number is meant
            value = float(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a raw config dict (returns a copy)."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {k} is not a mapping")
            node = nxt
        node[keys[-1]] = value
    return data


def _read_yaml(path: Path) -> dict:
    with open(path) as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded


def named_model(name: str) -> dict:
    """``model: tiny`` -> the model block in ``configs/models/tiny.yaml`` (or a YAML path)."""
    p = Path(name)
    if not p.is_file():
        p = CONFIG_DIR / "models" / f"{name}.yaml"
        if not p.is_file():
            names = sorted(f.stem for f in (CONFIG_DIR / "models").glob("*.yaml"))
            raise ConfigError(f"model: unknown named model {name!r} (allowed: {', '.join(names)})")
    return _read_yaml(p)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Load a YAML config (or start from ``base``), apply ``key=value`` overrides, validate.

    ``model`` may name a model config (``model: tiny`` or ``--set model=small``). A named model is the base
    that field overrides refine, so it replaces the model first, wherever it stands in ``overrides``; the
    field overrides (``--set model.embed_dim=256``) then apply in order, the last one winning. A caller's
    fixed paths placed before the user's overrides (the demo's tokenizer) thus survive ``--set model=NAME``.
    """
    data: dict = copy.deepcopy(base) if base else {}
    if path is not None:
        data.update(_read_yaml(resolve_config_path(path)))
    if isinstance(data.get("model"), str):
        data["model"] = named_model(data["model"])
    fields = []
    for text in overrides or []:
        keys, value = parse_override(text)
        if keys == ["model"] and isinstance(value, str):
            data["model"] = named_model(value)
        else:
            fields.append(text)
    return from_dict(Config, apply_overrides(data, fields))


#: Version of a saved model's ``config.json`` (``mmcl_format``). 1: the objective was one flat mapping of
#: every objective's options; 2: only the chosen objective's own options; 3: ``hf`` audio towers pool over the
#: frames of real audio and cut a Whisper-family encoder to the window (``pooling``, ``chunk``).
FORMAT_VERSION = 3


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A saved model's ``config.json`` mapping of any earlier format -> this format (a new mapping).

    v1 -> v2: the objective keeps the chosen objective's own fields and drops the others' (the objective
    it builds is the same: ``init_logit_scale: null``, v1's "the objective's default", is dropped too).
    v2 -> v3: an ``hf`` audio tower keeps what it computed: the extractor's whole chunk (``chunk: full``) and
    ``pooling: mean`` over every frame (``mean_padded``).
    """
    version = config.get("mmcl_format", 1)
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ConfigError(f"mmcl_format: {version!r} is not allowed (allowed: 1..{FORMAT_VERSION}; a newer mmcl "
                          f"wrote this model)")
    out = copy.deepcopy(config)
    if version == 1:
        objective = out.get("objective") or {}
        _, choices = _tagged_choices(typing.get_args(ObjectiveConfig))
        cls = choices.get(objective.get("name", "clip"))
        if cls is not None:  # an unknown name is left for from_dict to report
            own = _member_fields(cls)
            out["objective"] = {k: v for k, v in objective.items() if k in own and v is not None}
    if version < 3:
        for name, spec in (out.get("model") or {}).get("modalities", {}).items():
            tower = spec.get("tower") or {}
            if spec.get("kind", name) == "audio" and tower.get("type") == "hf":
                tower.setdefault("chunk", "full")
                if tower.get("pooling", "mean") == "mean":
                    tower["pooling"] = "mean_padded"
    out["mmcl_format"] = FORMAT_VERSION
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
