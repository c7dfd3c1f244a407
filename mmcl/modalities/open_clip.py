"""open_clip checkpoints as ``clip`` towers: ``tower: {type: clip, open_clip: FILE, open_clip_config: JSON}``.

``FILE`` is the state dict open_clip saves (``torch.save(model.state_dict())``, its training checkpoints'
``{"state_dict": ...}`` with DDP's ``module.`` prefix, or a ``.safetensors`` file), in open_clip's layout, which
is OpenAI CLIP's (``visual.*``, ``transformer.resblocks.*``, ``text_projection``, ``logit_scale``). ``JSON`` is
the model config it was built from (open_clip's ``model_configs/ViT-B-32.json``: ``embed_dim``, ``quick_gelu``,
``vision_cfg``, ``text_cfg``). Only ViT vision towers with the plain transformer text tower are mapped.

- **video**: a timm ``VisionTransformer`` built as timm builds its ``vit_*_clip_*`` models (pre-norm, LayerNorm
  eps 1e-5, QuickGELU where ``quick_gelu``; the projection ``proj`` is its ``head``), the weights converted by
  timm's own ``checkpoint_filter_fn`` (the OpenAI / open_clip layout converter), then the temporal module of
  :class:`~mmcl.modalities.clip_family.ClipVideoTower`. Frames are normalised with the config's
  ``preprocess_cfg`` mean / std, else OpenAI's.
- **text**: transformers' ``CLIPTextModel`` (the same transformer) with the projection, pooled at the highest
  token id (the end-of-text token, as open_clip pools). The state-dict mapping of this side is written here by
  hand (:func:`text_state`): neither timm nor transformers ships one for open_clip's text tower. Tokens come
  from a transformers CLIP tokenizer directory (``text.tokenizer``; open_clip's BPE is CLIP's).

A config / state-dict mismatch is one line listing the missing and unexpected keys.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcl.config import ConfigError
from mmcl.modalities.base import Tower, copy_model_file
from mmcl.modalities.clip_family import ClipTextTower, ClipVideoTower, JointSpace, check_temporal
from mmcl.modalities.pretrained import check_keys, load_once, local_path, read_state_dict, shape_mismatches
from mmcl.modalities.text import HFTokenizer, Text
from mmcl.modalities.timm_towers import timm_blocks
from mmcl.modalities.video import NormalizedFrames, Video

#: OpenAI CLIP's normalisation (open_clip's default ``preprocess_cfg``).
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
#: Keys of an open_clip state dict that belong to neither tower: the joint scalars, and what OpenAI's files
#: carry beside the weights (open_clip drops them too when it reads them).
JOINT_KEYS = ("logit_scale", "logit_bias")
IGNORED_KEYS = ("attn_mask", "input_resolution", "context_length", "vocab_size")


def read_open_clip_config(path: Path, where: str) -> dict[str, Any]:
    """The model config JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``), checked for what is mapped."""
    file = local_path(path, where, kind="file")
    try:
        spec = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: {file} is not JSON ({e})") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in spec]
    if missing:
        raise ConfigError(f"{where}: {file} is not an open_clip model config (no {', '.join(missing)})")
    unmapped = [k for k in ("timm_model_name", "hf_model_name") if spec["vision_cfg"].get(k) or spec["text_cfg"].get(k)]
    if unmapped:
        raise ConfigError(f"{where}: {file} uses {unmapped[0]}; only open_clip's own ViT and text transformer are "
                          f"mapped (load that model's own checkpoint with a timm or hf tower)")
    return spec


def read_open_clip_state(path: Path, where: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors without DDP's ``module.`` prefix (read once per model build)."""
    def read() -> dict[str, torch.Tensor]:
        state = read_state_dict(path, where)
        return {k.removeprefix("module."): v for k, v in state.items()}

    return load_once(("open_clip", str(Path(path).resolve())), read)


def _act(spec: dict[str, Any]) -> str:
    return "quick_gelu" if spec.get("quick_gelu") else "gelu"


def _joint(state: dict[str, torch.Tensor], path: Path) -> JointSpace:
    values = {k: float(state[k].reshape(-1)[0]) for k in JOINT_KEYS if k in state}
    return JointSpace(str(path.resolve()), values.get("logit_scale"), values.get("logit_bias"))


# ----------------------------------------------------------------------------------------------------
# Video


def vision_transformer(spec: dict[str, Any]) -> nn.Module:
    """open_clip's ``VisionTransformer`` as timm builds its CLIP towers: ``[M, 3, S, S]`` -> ``[M, embed_dim]``."""
    from timm.layers import LayerNorm
    from timm.models.vision_transformer import VisionTransformer

    v = spec["vision_cfg"]
    width = int(v.get("width", 768))
    if isinstance(v.get("layers"), (list, tuple)):
        raise ConfigError("open_clip_config: a ResNet vision tower (vision_cfg.layers is a list) is not mapped "
                          "(only ViTs)")
    return VisionTransformer(img_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16), embed_dim=width,
                             depth=int(v.get("layers", 12)), num_heads=width // int(v.get("head_width", 64)),
                             mlp_ratio=float(v.get("mlp_ratio", 4.0)), pre_norm=True, global_pool="token",
                             num_classes=int(spec["embed_dim"]), norm_layer=partial(LayerNorm, eps=1e-5),
                             act_layer=_act(spec))


class OpenClipFrames(NormalizedFrames):
    """Frames resized to ``video.size`` (the config's ``vision_cfg.image_size``) and normalised with its
    ``preprocess_cfg`` mean / std (OpenAI's by default). The config JSON is copied on save."""

    def __init__(self, video: Video):
        tc = video.cfg.tower
        where = f"{video.where}.tower.open_clip_config"
        self.config_path = video.resolve(tc.open_clip_config)
        self.spec = read_open_clip_config(self.config_path, where)
        size = int(self.spec["vision_cfg"].get("image_size", 224))
        if size != video.cfg.size:
            raise ConfigError(f"{video.where}.size: {video.cfg.size} does not fit {self.config_path} (its vision_cfg "
                              f"has image_size {size}: set size: {size})")
        pre = self.spec.get("preprocess_cfg", {})
        super().__init__(pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD))

    def files(self) -> dict[str, str]:
        return {"tower.open_clip_config": str(self.config_path)}


class OpenClipVideoTower(ClipVideoTower):
    """:class:`~mmcl.modalities.clip_family.ClipVideoTower` over a timm ViT (its head is open_clip's
    projection)."""

    def layer_stack(self) -> nn.Module:
        return self.encoder.blocks

    def divided(self, layer: nn.Module, first: bool, frames: int, prefix: int) -> nn.Module:
        from mmcl.modalities.timm_towers import DividedBlock

        return DividedBlock(layer, self.encoder.embed_dim, layer.attn.num_heads, frames, prefix, first)

    def own_blocks(self) -> list[nn.Module]:
        return timm_blocks(self.encoder)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
        if self.temporal == "transformer":
            self.temporal_module.trunk.grad_checkpointing = enable

    def frame_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels)


def open_clip_video_tower(video: Video, pretrained: bool) -> Tower:
    from timm.models.vision_transformer import checkpoint_filter_fn

    tc, inputs = video.cfg.tower, video.input
    where = f"{video.where}.tower.open_clip"
    model = vision_transformer(inputs.spec)
    joint = None
    if pretrained:
        path = video.resolve(tc.open_clip)
        state = read_open_clip_state(path, where)
        if "visual.class_embedding" not in state:
            raise ConfigError(f"{where}: {path} has no open_clip ViT vision tower (no visual.class_embedding; "
                              f"{len(state)} keys)")
        converted = checkpoint_filter_fn(state, model)  # timm's OpenAI / open_clip layout conversion
        own = model.state_dict()
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in converted.items()
                 if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in converted]
        unexpected = [f"visual.{k}" for k in converted if k not in own and k not in IGNORED_KEYS]
        if wrong:
            raise ConfigError(f"{where}: checkpoint {path} does not fit {inputs.config_path}: {len(wrong)} shape "
                              f"mismatches ({', '.join(wrong[:5])})")
        check_keys(missing, unexpected, where, str(path), f"the ViT of {inputs.config_path}", tc.strict)
        model.load_state_dict(converted, strict=False)
        joint = _joint(state, path)
    width = int(inputs.spec["embed_dim"])
    check_temporal(tc, width, f"{video.where}.tower")
    return OpenClipVideoTower(model, None, width, joint, tc, video.cfg.frames, prefix=model.num_prefix_tokens)


# ----------------------------------------------------------------------------------------------------
# Text


def text_config(spec: dict[str, Any]) -> Any:
    """open_clip's ``text_cfg`` as the transformers ``CLIPTextConfig`` of the same transformer."""
    from transformers import CLIPTextConfig

    t = spec["text_cfg"]
    width = int(t.get("width", 512))
    vocab = int(t.get("vocab_size", 49408))
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=int(width * t.get("mlp_ratio", 4.0)),
                          num_hidden_layers=int(t.get("layers", 12)), num_attention_heads=int(t.get("heads", 8)),
                          max_position_embeddings=int(t.get("context_length", 77)), hidden_act=_act(spec),
                          layer_norm_eps=1e-5, projection_dim=int(spec["embed_dim"]), eos_token_id=vocab - 1,
                          bos_token_id=vocab - 2, pad_token_id=vocab - 1)


def text_state(state: dict[str, torch.Tensor], layers: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """open_clip's text tower keys -> ``CLIPTextModel`` keys (``encoder.``) and the projection (``projection.``),
    written by hand (no library ships this direction): the fused ``in_proj`` split into q, k, v, and
    ``text_projection`` (``x @ P``) transposed into a ``Linear`` weight. Returns the mapped tensors and the
    open_clip keys that were used."""
    swaps = {"token_embedding.weight": "embeddings.token_embedding.weight",
             "positional_embedding": "embeddings.position_embedding.weight",
             "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    out: dict[str, torch.Tensor] = {}
    used: list[str] = []
    for src, dst in swaps.items():
        if src in state:
            out[f"encoder.{dst}"] = state[src]
            used.append(src)
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.encoder.layers.{i}."
        for a, b in block.items():
            for p in ("weight", "bias"):
                if f"{src}{a}.{p}" in state:
                    out[f"{dst}{b}.{p}"] = state[f"{src}{a}.{p}"]
                    used.append(f"{src}{a}.{p}")
        for p in ("weight", "bias"):
            key = f"{src}attn.in_proj_{p}"
            if key in state:
                for name, part in zip(("q", "k", "v"), state[key].chunk(3, dim=0)):
                    out[f"{dst}self_attn.{name}_proj.{p}"] = part
                used.append(key)
    if "text_projection" in state:
        out["projection.weight"] = state["text_projection"].T
        used.append("text_projection")
    return out, used


class OpenClipTokenizer(HFTokenizer):
    """A transformers CLIP tokenizer directory (``text.tokenizer``) for an open_clip text tower, checked against
    the config's ``text_cfg`` (vocabulary, ``context_length``) and its own ``model_max_length``. Saved as the
    tokenizer and the config JSON."""

    def __init__(self, text: Text):
        tc = text.cfg.tower
        if not text.cfg.tokenizer:
            raise ConfigError(f"{text.where}.tokenizer: required with tower.open_clip (a transformers CLIP tokenizer "
                              f"directory: open_clip's BPE is CLIP's)")
        self.path = local_path(text.resolve(text.cfg.tokenizer), f"{text.where}.tokenizer")
        self.where = f"{text.where}.tokenizer"
        self.config_path = text.resolve(tc.open_clip_config)
        self.spec = read_open_clip_config(self.config_path, f"{text.where}.tower.open_clip_config")
        self.model_path = self.config_path
        self.model_config = text_config(self.spec)
        self._tok = None
        tok = self.tok
        self.vocab_size = len(tok)
        self.pad_id = int(tok.pad_token_id)
        self.input_names = ["input_ids", "attention_mask"]
        max_len, cfg = text.cfg.max_len, self.model_config
        if self.vocab_size > cfg.vocab_size:
            raise ConfigError(f"{self.where}: tokenizer {self.path} has {self.vocab_size} tokens but "
                              f"{self.config_path} has vocab_size {cfg.vocab_size}")
        if int(tok.model_max_length) < max_len:
            raise ConfigError(f"{text.where}.max_len: {max_len} exceeds the tokenizer's model_max_length "
                              f"{tok.model_max_length} ({self.path})")
        if max_len > cfg.max_position_embeddings:
            raise ConfigError(f"{text.where}.max_len: {max_len} exceeds the context_length "
                              f"{cfg.max_position_embeddings} of {self.config_path}")

    def save(self, out_dir: Path, name: str) -> dict[str, Any]:
        """The tokenizer to ``<name>_tokenizer/``, the config JSON beside it (the weights are in the model)."""
        dst = f"{name}_{self.config_path.name}"
        copy_model_file(self.config_path, out_dir / dst)
        self.tok.save_pretrained(str(out_dir / f"{name}_tokenizer"))
        return {"tokenizer": f"{name}_tokenizer", "tower.open_clip_config": dst}


class OpenClipTextTower(ClipTextTower):
    """``CLIPTextModel`` + projection, pooled at the highest token id as open_clip pools (the end-of-text
    token is the last id of CLIP's vocabulary; causal attention makes the padding after it irrelevant)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, 0]
        hidden = self.encoder(input_ids=ids).last_hidden_state
        return self.project(hidden[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)])


def open_clip_text_tower(text: Text, pretrained: bool) -> Tower:
    from transformers import CLIPTextModel

    tc, tok = text.cfg.tower, text.input
    cfg = tok.model_config
    encoder = CLIPTextModel(cfg)
    projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
    tower = OpenClipTextTower(encoder, projection, cfg.projection_dim, None, use_mask=False)
    if pretrained:
        where = f"{text.where}.tower.open_clip"
        path = text.resolve(tc.open_clip)
        state = read_open_clip_state(path, where)
        mapped, used = text_state(state, cfg.num_hidden_layers)
        own = tower.state_dict()
        wrong = shape_mismatches(mapped, own)
        if wrong:
            raise ConfigError(f"{where}: checkpoint {path} does not fit {tok.config_path}: {len(wrong)} shape "
                              f"mismatches ({', '.join(wrong[:5])})")
        taken = set(used) | set(JOINT_KEYS) | set(IGNORED_KEYS)
        missing = [k for k in own if k not in mapped]
        unexpected = [k for k in state if k not in taken and not k.startswith("visual.")]
        check_keys(missing, unexpected, where, str(path), f"the text transformer of {tok.config_path}", tc.strict)
        tower.load_state_dict(mapped, strict=False)
        tower.joint = _joint(state, path)
    return tower
