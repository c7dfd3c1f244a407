"""Text: UTF-8 caption -> sentencepiece ids (padded to ``max_len``); :class:`TextTower` = a
``transformers`` BERT-style encoder built from a config, with masked-mean pooling (a CLS-pooled tiny
encoder starts with near-identical embeddings for every caption and collapses contrastive training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import BertConfig, BertModel

from mmcl.config import ConfigError
from mmcl.modalities.base import Modality, SampleError, TokenEmbedder, Tower, register_modality
from mmcl.modalities.layers import IdTokens


@dataclass
class TextTowerConfig:
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    pooling: Literal["mean", "cls"] = "mean"
    dropout: float = 0.0


@dataclass
class TextConfig:
    #: sentencepiece model file (relative paths resolve against the config's base directory).
    tokenizer: str = "tokenizer.model"
    max_len: int = 32
    #: Captions longer than this many characters are bad samples (protects the tokenizer from junk).
    max_chars: int = 2000
    tower: TextTowerConfig = field(default_factory=TextTowerConfig)
    #: Rows of the token embedding table; 0: the tokenizer's vocabulary. With ``tokenizer: ""`` the model builds
    #: without a tokenizer file (the named configs small and base: BERT's 30522 rows, pad id 0); reading text
    #: then needs a tokenizer whose ids fit (``--set model.modalities.text.tokenizer=FILE``).
    vocab_size: int = 0

    def validate(self, where: str) -> None:
        if self.vocab_size < 0 or not (self.tokenizer or self.vocab_size):
            raise ConfigError(f"{where}.vocab_size: must be > 0 without a tokenizer, >= 0 with one; "
                              f"got {self.vocab_size}")


class SentencePieceTokenizer:
    """Thin wrapper: text -> ids, with the pad id the model masks out. Loaded lazily so loader workers
    each hold their own processor."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise ConfigError(f"model.modalities.text.tokenizer: file not found: {path}")
        self.path = path
        self._sp = None

    @property
    def sp(self):
        if self._sp is None:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        return self._sp

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        pad = self.sp.pad_id()
        return pad if pad >= 0 else 0

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def __getstate__(self) -> dict:
        return {"path": self.path, "_sp": None}


@register_modality
class Text(Modality):
    kind = "text"
    Config = TextConfig
    members = ("txt", "text", "caption")

    def __init__(self, name: str, cfg: TextConfig, base_dir=None):
        super().__init__(name, cfg, base_dir)
        self.tokenizer = SentencePieceTokenizer(self.resolve(cfg.tokenizer)) if cfg.tokenizer else None

    def decode(self, sample: dict) -> torch.Tensor:
        """-> token ids ``[<= max_len]`` int64."""
        _, data = self.find_member(sample)
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
        except UnicodeDecodeError as e:
            raise SampleError("bad_text", f"not UTF-8: {e}") from None
        return self.tokenize(text)

    def tokenize(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            raise ConfigError(f"model.modalities.{self.name}.tokenizer: not set; reading text needs one")
        text = text.strip()
        if not text:
            raise SampleError("empty_text")
        if len(text) > self.cfg.max_chars:
            raise SampleError("long_text", f"{len(text)} characters > max_chars {self.cfg.max_chars}")
        return torch.tensor(self.tokenizer.encode(text)[: self.cfg.max_len], dtype=torch.long)

    def transform(self, data: torch.Tensor, train: bool) -> torch.Tensor:
        """ids -> ``[max_len]`` padded with the pad id."""
        out = torch.full((self.cfg.max_len,), self.pad_id, dtype=torch.long)
        out[: data.numel()] = data
        return out

    def empty(self) -> torch.Tensor:
        return torch.full((self.cfg.max_len,), self.pad_id, dtype=torch.long)

    def files(self) -> dict[str, str]:
        return {"tokenizer": str(self.tokenizer.path)} if self.tokenizer else {}

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer else 0

    @property
    def vocab_size(self) -> int:
        """The embedding table's rows: ``vocab_size``, else the tokenizer's (which must fit in it)."""
        if not self.cfg.vocab_size:
            return self.tokenizer.vocab_size
        if self.tokenizer and self.tokenizer.vocab_size > self.cfg.vocab_size:
            raise ConfigError(f"model.modalities.{self.name}.vocab_size: {self.cfg.vocab_size} is smaller than "
                              f"the tokenizer's vocabulary ({self.tokenizer.vocab_size}, {self.tokenizer.path})")
        return self.cfg.vocab_size

    def build_tower(self) -> Tower:
        return TextTower(self.cfg, self.vocab_size, self.pad_id)

    def build_token_embedder(self, width: int) -> TokenEmbedder:
        """Shared-trunk tokens: the ids embedded with learned positions, ``width`` wide; padding masked."""
        return IdTokens(self.vocab_size, self.cfg.max_len, width, self.pad_id)


class TextTower(Tower):
    """``[N, L]`` token ids (pad = ``pad_id``) -> ``[N, width]``."""

    def __init__(self, cfg: TextConfig, vocab_size: int, pad_id: int):
        super().__init__()
        tc = cfg.tower
        self.pad_id = pad_id
        self.pooling = tc.pooling
        bert = BertConfig(
            vocab_size=vocab_size, hidden_size=tc.width, num_hidden_layers=tc.depth,
            num_attention_heads=tc.heads, intermediate_size=int(tc.width * tc.mlp_ratio),
            max_position_embeddings=cfg.max_len, type_vocab_size=1, pad_token_id=pad_id,
            hidden_dropout_prob=tc.dropout, attention_probs_dropout_prob=tc.dropout,
        )
        self.encoder = BertModel(bert, add_pooling_layer=False)
        self.out_dim = tc.width

    def blocks(self) -> list[nn.Module]:
        return list(self.encoder.encoder.layer)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.encoder.gradient_checkpointing_enable()
        else:
            self.encoder.gradient_checkpointing_disable()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).long()
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
