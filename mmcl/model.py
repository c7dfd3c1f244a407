"""MultimodalModel: per modality a processor (data side, ``model.processors``) and a tower (``model.towers``),
projection heads and the objective (which owns the learnable temperature), with the ``from_config`` /
``from_pretrained`` / ``save_pretrained`` contract of Hugging Face models."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import (FORMAT_VERSION, ClipConfig, Config, ConfigError, ModelConfig, ObjectiveConfig, from_dict,
                         to_dict, upgrade_config)
from mmcl.data.window import WindowConfig
from mmcl.errors import HubError
from mmcl.hub import check_weights, eval_records, resolve_pretrained, write_model_card
from mmcl.modalities import Processor, build_processor, build_tower
from mmcl.modalities.pretrained import build_session
from mmcl.modalities.base import frozen_to_eval
from mmcl.objectives import build_objective
from mmcl.persistence import CONFIG_NAME, read_config, read_model_dir, weights_file, write_model_dir
from mmcl.shared import build_shared_towers, encode_shared


def param_numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also of one that DeepSpeed ZeRO-3 partitions (``.data`` is then an empty
    placeholder and ``ds_numel`` the full count)."""
    return getattr(p, "ds_numel", None) or p.numel()


def param_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's full shape, also under ZeRO-3 partitioning (``ds_shape``)."""
    return getattr(p, "ds_shape", None) or p.shape


def make_head(name: str, width: int, model_cfg: ModelConfig) -> nn.Linear:
    """The bias-free ``[width] -> [embed_dim]`` projection of modality ``name``: random (``linear``) or the
    identity matrix (``identity``: the tower's width must be ``embed_dim``)."""
    head = nn.Linear(width, model_cfg.embed_dim, bias=False)
    if model_cfg.head_of(name) == "identity":
        if width != model_cfg.embed_dim:
            field_ = f"model.heads.{name}" if name in model_cfg.heads else "model.head"
            raise ConfigError(f"{field_}: identity needs the {name} tower's width {width} to equal model.embed_dim "
                              f"{model_cfg.embed_dim} (set embed_dim: {width}, or a linear head for {name})")
        with torch.no_grad():
            head.weight.copy_(torch.eye(width))
    return head


def init_scale_from_checkpoint(model: MultimodalModel) -> None:
    """``model.logit_scale_init: checkpoint``: the objective's logit scale (and SigLIP bias) become those of the
    two-tower checkpoint that at least two identity-headed towers come from (their :attr:`joint` space)."""
    where = "model.logit_scale_init"
    by_source: dict[str, list[Any]] = {}
    for name, tower in model.towers.items():
        joint = getattr(tower, "joint", None)
        if joint is not None and joint.logit_scale is not None and model.model_cfg.head_of(name) == "identity":
            by_source.setdefault(joint.source, []).append(joint)
    shared = [joints for joints in by_source.values() if len(joints) >= 2]
    if len(shared) != 1:
        found = ", ".join(f"{src} ({len(j)} towers)" for src, j in by_source.items()) or "none"
        raise ConfigError(f"{where}: 'checkpoint' needs identity-headed towers from exactly one two-tower checkpoint "
                          f"(CLIP / SigLIP / CLAP directory) shared by two or more of them; found: {found} "
                          f"(allowed: 'objective', 'checkpoint')")
    joint = shared[0][0]
    objective = model.objective
    if not hasattr(objective, "logit_scale") or "logit_scale" not in objective.scalars:
        raise ConfigError(f"{where}: 'checkpoint' needs an objective with a logit scale (clip, siglip, symile), "
                          f"not {model.objective_cfg.name!r}")
    with torch.no_grad():
        objective.logit_scale.fill_(joint.logit_scale)
        if joint.logit_bias is not None and hasattr(objective, "logit_bias"):
            objective.logit_bias.fill_(joint.logit_bias)


class MultimodalModel(nn.Module):
    """Separate towers per modality, or one shared trunk behind per-modality token embedders
    (``model.shared_trunk``, :mod:`mmcl.shared`), each modality followed by a linear projection to
    ``embed_dim``. ``towers`` holds what ``train.towers`` controls: the towers, or the embedders and ``trunk``;
    ``processors`` the data side (what the loader and the eval suite take).

    ``encode`` returns L2-normalised ``[N, embed_dim]`` embeddings per modality, and so does ``forward``
    (the training step runs it through the distributed wrapper); the trainer computes the loss with
    ``model.objective(emb, present)``.
    """

    def __init__(self, model_cfg: ModelConfig, objective_cfg: ObjectiveConfig | None = None,
                 base_dir: str | Path | None = None, device: str | torch.device | None = None, *,
                 pretrained: bool = True):
        """``device``: where the parameters are made (``"meta"``: shapes only, no memory or time: how
        :meth:`parameter_counts` of a config is taken); the processors are built on the CPU. ``pretrained``:
        towers that start from checkpoints read them; False builds every tower's architecture alone."""
        super().__init__()
        self.model_cfg = model_cfg
        self.objective_cfg = objective_cfg or ClipConfig()
        #: The training run's ``data.clip`` (saved as ``config.json`` ``data.clip``; None: not recorded), the
        #: time window the benchmarks evaluate in by default.
        self.data_clip: WindowConfig | None = None
        self.processors: dict[str, Processor] = {
            name: build_processor(name, spec, base_dir) for name, spec in model_cfg.modalities.items()
        }
        if len(self.processors) < 2:
            raise ConfigError("model.modalities: at least two modalities are required")
        with torch.device(device) if device is not None else nullcontext():
            if model_cfg.shared_trunk is None:
                with build_session():  # a checkpoint feeding two towers is read once
                    self.towers = nn.ModuleDict({name: build_tower(p, pretrained)
                                                 for name, p in self.processors.items()})
                widths = {name: tower.out_dim for name, tower in self.towers.items()}
            else:
                self.towers = build_shared_towers(self.processors, model_cfg.shared_trunk)
                widths = dict.fromkeys(self.processors, model_cfg.shared_trunk.width)
            self.heads = nn.ModuleDict({name: make_head(name, width, model_cfg) for name, width in widths.items()})
            self.objective = build_objective(self.objective_cfg, list(self.processors), model_cfg.embed_dim)
        if model_cfg.logit_scale_init == "checkpoint" and pretrained:
            init_scale_from_checkpoint(self)

    def train(self, mode: bool = True) -> MultimodalModel:
        """Training mode, except the frozen parts of the towers (a locked tower, frozen blocks and stem), which
        stay in eval mode (:func:`~mmcl.modalities.base.frozen_to_eval`): what is frozen is decided by
        ``requires_grad`` at the time of the call (``train.towers``, :func:`mmcl.train.optim.apply_tower_controls`)."""
        super().train(mode)
        if mode:
            for tower in self.towers.values():
                frozen_to_eval(tower)
        return self

    @property
    def modality_names(self) -> list[str]:
        return list(self.processors)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: ``{tower name: n, ..., "heads": n, "objective": n, "total": n}`` (the tower
        names are the modalities, plus ``trunk`` with a shared trunk)."""
        counts = {name: sum(map(param_numel, tower.parameters())) for name, tower in self.towers.items()}
        counts["heads"] = sum(map(param_numel, self.heads.parameters()))
        counts["objective"] = sum(map(param_numel, self.objective.parameters()))
        counts["total"] = sum(map(param_numel, self.parameters()))
        return counts

    def compile_towers(self, **options: Any) -> None:
        """``torch.compile`` every tower in place (``train.compile``; with a shared trunk, the embedders and
        the trunk): parameter names and saved weights are unchanged; ``options`` go to ``torch.compile``."""
        for tower in self.towers.values():
            tower.compile(**options)

    def tower_features(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Modality ``name``'s batch input -> its tower's pooled features ``[N, F]``, before the projection head
        (with a shared trunk: its embedder, then the trunk). What a frozen-feature cache keeps of a locked
        tower (:mod:`mmcl.train.feature_cache`)."""
        if name not in self.processors:
            raise KeyError(f"model has no modality {name!r} (has: {', '.join(self.processors)})")
        return encode_shared(self.towers, name, x) if self.model_cfg.shared_trunk else self.towers[name](x)

    def encode(self, inputs: dict[str, torch.Tensor], normalize: bool = True,
               features: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``{modality: batch input}`` (any subset) -> ``{modality: [N, embed_dim]}``. ``features``:
        ``{modality: [N, F]}`` tower features computed before (:meth:`tower_features`), which go through the
        head in place of running the tower."""
        given = features or {}
        out = {}
        for name in [*inputs, *(m for m in given if m not in inputs)]:
            f = given[name] if name in given else self.tower_features(name, inputs[name])
            z = self.heads[name](f)
            out[name] = F.normalize(z.float(), dim=-1) if normalize else z  # unit norm in fp32 under autocast
        return out

    def forward(self, inputs: dict[str, torch.Tensor],
                features: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """One batch ``{modality: input}`` (and ``features``, see :meth:`encode`) -> L2-normalised embeddings
        ``{modality: [N, embed_dim]}``."""
        return self.encode(inputs, features=features)

    # -- persistence -------------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"mmcl_format": FORMAT_VERSION, "model": to_dict(self.model_cfg),
                "objective": to_dict(self.objective_cfg)}

    def save_pretrained(self, save_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None, *,
                        eval_results: list[dict[str, Any]] | dict[str, Any] | None = None,
                        train_config: dict[str, Any] | None = None, model_name: str = "",
                        data_clip: WindowConfig | None = None) -> Path:
        """Write ``config.json``, ``model.safetensors``, the processors' files and a ``README.md`` model card
        to ``save_dir`` (:mod:`mmcl.persistence`).

        Each processor writes the files it reads (:meth:`Processor.save`: a sentencepiece model; the config
        and tokenizer, feature extractor or image processor of a transformers tower, not its weights) and the
        saved config references them by relative name, so the directory is self-contained. ``state_dict``
        overrides the live weights (e.g. one gathered from ZeRO-3).
        ``eval_results`` (a suite's results, or per-task records as :func:`mmcl.hub.read_eval_dir` returns
        them) go into the card as ``model-index`` metadata, ``train_config`` as a YAML block. ``data_clip`` (default:
        :attr:`data_clip`), the run's time window, is kept as ``config.json`` ``data.clip`` (absent when None;
        earlier versions ignore it).
        """
        out = Path(save_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.config_dict()
        data_clip = data_clip if data_clip is not None else self.data_clip
        if data_clip is not None:
            cfg["data"] = {"clip": to_dict(data_clip)}
        for name, processor in self.processors.items():
            for dotted, value in processor.save(out).items():
                *parents, last = dotted.split(".")
                node = cfg["model"]["modalities"][name]
                for key in parents:
                    node = node.setdefault(key, {})
                node[last] = value
        write_model_dir(out, cfg, state_dict if state_dict is not None else self.state_dict())
        records = eval_records(eval_results) if isinstance(eval_results, dict) else eval_results
        write_model_card(out, records, train_config, model_name)
        return out

    @classmethod
    def from_config(cls, cfg: dict[str, Any], base_dir: str | Path | None = None, *,
                    pretrained: bool = True) -> MultimodalModel:
        """A model from a ``config.json``-style dict (``{"model": ..., "objective": ...}``): towers that start
        from checkpoints read them unless ``pretrained`` is False."""
        model_cfg = from_dict(ModelConfig, cfg["model"], "model")
        objective_cfg = from_dict(ObjectiveConfig, cfg.get("objective", {}), "objective")
        return cls(model_cfg, objective_cfg, base_dir, pretrained=pretrained)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, map_location: str = "cpu", *, revision: str | None = None,
                        cache_dir: str | Path | None = None, local_files_only: bool = False,
                        token: str | None = None) -> MultimodalModel:
        """Load a directory written by :meth:`save_pretrained`, or a Hub repo id (downloaded into, or when
        offline found in, the local HF cache): every tower is built architecture-only and every weight read
        from the safetensors (a directory with pickle-based weights alone, or a ``model.safetensors`` that is
        not one, is refused); a directory of an older format is converted on load."""
        path = resolve_pretrained(name_or_path, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only, token=token)
        check_weights(weights_file(path))
        cfg, state = read_model_dir(path, map_location)
        model = cls.from_config(cfg, base_dir=path, pretrained=False)
        model.load_state_dict(state)
        clip = (cfg.get("data") or {}).get("clip")
        model.data_clip = from_dict(WindowConfig, clip, "data.clip") if clip is not None else None
        return model


def load_processors(path: str | Path) -> dict[str, Processor]:
    """The processors of a saved model directory, without building its towers."""
    p = Path(path)
    cfg = upgrade_config(read_config(p))
    return {name: build_processor(name, spec, p) for name, spec in cfg["model"]["modalities"].items()}


#: ``mmcl eval --model config:FILE``: the model a train config builds, before any step.
CONFIG_PREFIX = "config:"


def train_config_spec(model_arg: str) -> str | None:
    """The train config ``mmcl eval --model`` names (``config:FILE``, or a ``.yaml`` / ``.yml`` file), else
    None (a model directory or Hub id)."""
    if model_arg.startswith(CONFIG_PREFIX):
        return model_arg[len(CONFIG_PREFIX):]
    p = Path(model_arg)
    return model_arg if p.suffix in (".yaml", ".yml") and p.is_file() else None


def untrained_model(cfg: Config) -> MultimodalModel:
    """The model ``mmcl train`` starts from for ``cfg`` (same seed, so the same initial weights on one
    process; pretrained towers read their checkpoints), in eval mode: "zero-shot before training"."""
    torch.manual_seed(cfg.train.seed)
    return MultimodalModel(cfg.model, cfg.objective).eval()


def load_model(name_or_path: str | Path, map_location: str = "cpu") -> MultimodalModel:
    """What ``mmcl eval --model`` accepts: a ``save_pretrained`` directory, a training checkpoint
    (``checkpoints/step_N``, same format) or a Hub repo id."""
    p = Path(name_or_path)
    if p.is_dir() and not (p / CONFIG_NAME).is_file():
        raise HubError(f"{name_or_path}: not a model directory (no {CONFIG_NAME}); give a run's final/ or "
                       f"checkpoints/step_N/ directory, or a Hub repo id")
    return MultimodalModel.from_pretrained(name_or_path, map_location=map_location)
