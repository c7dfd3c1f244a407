"""MultimodalModel: ``{modality: tower}`` + projection heads + the objective (which owns the learnable
temperature), with the ``save_pretrained`` / ``from_pretrained`` contract of Hugging Face models."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mmcl.config import (FORMAT_VERSION, ClipConfig, ConfigError, ModelConfig, ObjectiveConfig, from_dict, to_dict,
                         upgrade_config)
from mmcl.modalities import Modality, build_modality
from mmcl.modalities.pretrained import architecture_only
from mmcl.objectives import build_objective
from mmcl.shared import build_shared_towers, encode_shared

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


#: Weight files left out when a modality's directory (an HF model's config and processor) is copied into a
#: saved model: the saved safetensors hold the tower's weights.
class MultimodalModel(nn.Module):
    """Separate towers per modality, or one shared trunk behind per-modality tokenisers
    (``model.shared_trunk``, :mod:`mmcl.shared`), each modality followed by a linear projection to
    ``embed_dim``. ``towers`` holds what ``train.towers`` controls: the towers, or the tokenisers and ``trunk``.

    ``encode`` returns L2-normalised ``[N, embed_dim]`` embeddings per modality, and so does ``forward``
    (the training step runs it through the distributed wrapper); the trainer computes the loss with
    ``model.objective(emb, present)``.
    """

    def __init__(self, model_cfg: ModelConfig, objective_cfg: ObjectiveConfig | None = None,
                 base_dir: str | Path | None = None, device: str | torch.device | None = None):
        """``device``: where the parameters are made (``"meta"``: shapes only, no memory or time: how
        :meth:`parameter_counts` of a config is taken); the modalities' data side is built on the CPU."""
        super().__init__()
        self.model_cfg = model_cfg
        self.objective_cfg = objective_cfg or ClipConfig()
        self.modalities: dict[str, Modality] = {
            name: build_modality(name, spec, base_dir) for name, spec in model_cfg.modalities.items()
        }
        if len(self.modalities) < 2:
            raise ConfigError("model.modalities: at least two modalities are required")
        with torch.device(device) if device is not None else nullcontext():
            if model_cfg.shared_trunk is None:
                self.towers = nn.ModuleDict({name: m.build_tower() for name, m in self.modalities.items()})
                widths = {name: tower.out_dim for name, tower in self.towers.items()}
            else:
                self.towers = build_shared_towers(self.modalities, model_cfg.shared_trunk)
                widths = dict.fromkeys(self.modalities, model_cfg.shared_trunk.width)
            self.heads = nn.ModuleDict({
                name: nn.Linear(width, model_cfg.embed_dim, bias=False) for name, width in widths.items()
            })
            self.objective = build_objective(self.objective_cfg, list(self.modalities), model_cfg.embed_dim)

    @property
    def modality_names(self) -> list[str]:
        return list(self.modalities)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: ``{tower name: n, ..., "heads": n, "objective": n, "total": n}`` (the tower
        names are the modalities, plus ``trunk`` with a shared trunk)."""
        counts = {name: sum(p.numel() for p in tower.parameters()) for name, tower in self.towers.items()}
        counts["heads"] = sum(p.numel() for p in self.heads.parameters())
        counts["objective"] = sum(p.numel() for p in self.objective.parameters())
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts

    def encode(self, inputs: dict[str, torch.Tensor], normalize: bool = True) -> dict[str, torch.Tensor]:
        """``{modality: batch input}`` (any subset) -> ``{modality: [N, embed_dim]}``."""
        out = {}
        for name, x in inputs.items():
            if name not in self.modalities:
                raise KeyError(f"model has no modality {name!r} (has: {', '.join(self.modalities)})")
            features = encode_shared(self.towers, name, x) if self.model_cfg.shared_trunk else self.towers[name](x)
            z = self.heads[name](features)
            out[name] = F.normalize(z, dim=-1) if normalize else z
        return out

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One batch ``{modality: input}`` -> L2-normalised embeddings ``{modality: [N, embed_dim]}``."""
        return self.encode(inputs)

    # -- persistence -------------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"mmcl_format": FORMAT_VERSION, "model": to_dict(self.model_cfg),
                "objective": to_dict(self.objective_cfg)}

    def save_pretrained(self, save_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None, *,
                        eval_results: list[dict[str, Any]] | dict[str, Any] | None = None,
                        train_config: dict[str, Any] | None = None, model_name: str = "") -> Path:
        """Write ``config.json``, ``model.safetensors``, the modalities' files (tokenizers),
        ``preprocessor_config.json`` and a ``README.md`` model card to ``save_dir``.

        Files a modality needs are written in (:meth:`Modality.save_files`: tokenizers; the config, tokenizer,
        feature extractor or image processor of a transformers tower, not its weights) and referenced by
        relative name, so the directory is self-contained. ``state_dict`` overrides the live weights (e.g. one
        gathered from ZeRO-3).
        ``eval_results`` (a suite's results, or per-task records as :func:`mmcl.hub.read_eval_dir` returns
        them) go into the card as ``model-index`` metadata, ``train_config`` as a YAML block.
        """
        from mmcl.hub import PREPROCESSOR_NAME, eval_records, write_model_card

        out = Path(save_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.config_dict()
        preprocessing = {}
        for name, mod in self.modalities.items():
            updates = mod.save_files(out)
            for dotted, value in updates.items():
                *parents, last = dotted.split(".")
                node = cfg["model"]["modalities"][name]
                for key in parents:
                    node = node.setdefault(key, {})
                node[last] = value
            spec = {k: v for k, v in mod.to_dict().items() if k != "tower"}
            preprocessing[name] = {**spec, **{k: v for k, v in updates.items() if "." not in k}}
        sd = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(out / WEIGHTS_NAME),
                  metadata={"format": "pt", "mmcl_format": str(FORMAT_VERSION)})
        (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        (out / PREPROCESSOR_NAME).write_text(json.dumps(preprocessing, indent=2))
        records = eval_records(eval_results) if isinstance(eval_results, dict) else eval_results
        write_model_card(out, records, train_config, model_name)
        return out

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any], base_dir: str | Path | None = None) -> MultimodalModel:
        model_cfg = from_dict(ModelConfig, cfg["model"], "model")
        objective_cfg = from_dict(ObjectiveConfig, cfg.get("objective", {}), "objective")
        return cls(model_cfg, objective_cfg, base_dir)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, map_location: str = "cpu", *, revision: str | None = None,
                        cache_dir: str | Path | None = None, local_files_only: bool = False,
                        token: str | None = None) -> MultimodalModel:
        """Load a directory written by :meth:`save_pretrained`, or a Hub repo id (downloaded into, or when
        offline found in, the local HF cache). Weights are read from safetensors only; a directory with
        pickle-based weights alone, or a ``model.safetensors`` that is not one, is refused."""
        from mmcl.hub import check_weights, resolve_pretrained

        path = resolve_pretrained(name_or_path, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only, token=token)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"not an mmcl model directory (no {CONFIG_NAME}): {path}")
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path} (mmcl loads safetensors weights only)")
        check_weights(weights)
        with architecture_only():  # every weight comes from the safetensors: no pretrained checkpoint is read
            model = cls.from_config_dict(upgrade_config(json.loads(config_file.read_text())), base_dir=path)
        model.load_state_dict(load_file(str(weights), device=map_location))
        return model
