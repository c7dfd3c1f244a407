"""Text: UTF-8 caption -> token ids padded to ``max_len``, and the tower that encodes them. The tower's
``type`` picks both:

- ``bert`` (default): sentencepiece ids; :class:`TextTower` = a ``transformers`` BERT-style encoder built
  from this config, with masked-mean pooling (a CLS-pooled tiny encoder starts with near-identical
  embeddings for every caption and collapses contrastive training).
- ``hf``: any ``transformers`` AutoModel directory on local disk (``tower.path``) with its own tokenizer
  (``AutoTokenizer``, from the same directory unless ``tokenizer`` names another); :class:`HFTextTower`
  pools its hidden states (``cls`` / masked ``mean`` / ``last`` non-pad token).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import BertConfig, BertModel

from mmcl.config import ConfigError
from mmcl.modalities.base import Modality, SampleError, TokenEmbedder, Tower, register_modality
from mmcl.modalities.layers import IdTokens
from mmcl.modalities.pretrained import HFTower, HFTowerFields, hf_encoder, load_hf_component, load_hf_config, pool

#: The sentencepiece model a ``bert`` tower reads when neither ``tokenizer`` nor ``vocab_size`` is set.
DEFAULT_SENTENCEPIECE = "tokenizer.model"


@dataclass
class TextTowerConfig(HFTowerFields):
    #: ``bert``: a BERT-style encoder built from the fields below (random init); ``hf``: a transformers model
    #: directory (``path``).
    type: Literal["bert", "hf"] = "bert"
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    #: ``cls``: first token; ``mean``: masked mean over the tokens; ``last``: last non-pad token.
    pooling: Literal["mean", "cls", "last"] = "mean"
    dropout: float = 0.0

    def validate(self, where: str) -> None:
        if self.type == "hf" and not self.path:
            raise ConfigError(f"{where}.path: required with type 'hf' (a local transformers model directory)")
        if self.type != "hf" and self.path:
            raise ConfigError(f"{where}.path: only used with type 'hf' (type is {self.type!r})")


@dataclass
class TextConfig:
    #: ``bert`` tower: sentencepiece model file (default ``tokenizer.model``); ``hf`` tower: a transformers
    #: tokenizer directory (default: the model's ``tower.path``). Relative paths resolve against the
    #: config's base directory.
    tokenizer: str = ""
    max_len: int = 32
    #: Captions longer than this many characters are bad samples (protects the tokenizer from junk).
    max_chars: int = 2000
    tower: TextTowerConfig = field(default_factory=TextTowerConfig)
    #: Rows of the token embedding table (``bert`` towers); 0: the tokenizer's vocabulary. With ``tokenizer: ""``
    #: and ``vocab_size > 0`` the model builds without a tokenizer file (the named configs small and base: BERT's 30522 rows, pad id 0); reading text
    #: then needs a tokenizer whose ids fit (``--set model.modalities.text.tokenizer=FILE``).
    vocab_size: int = 0

    def validate(self, where: str) -> None:
        if self.vocab_size < 0:
            raise ConfigError(f"{where}.vocab_size: must be >= 0, got {self.vocab_size}")


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


class HFTokenizer:
    """A transformers tokenizer (``AutoTokenizer``) from a local directory: text -> the rows the model reads
    (``input_names``: ids, attention mask and, where the tokenizer makes them, token type ids), padded on
    the right to ``max_len``. Read once here for its sizes, then lazily again in each loader worker (the
    pickled state leaves the tokenizer out)."""

    def __init__(self, path: Path, where: str):
        self.path = path
        self.where = where
        self._tok: Any = None
        tok = self.tok
        self.vocab_size = len(tok)
        self.pad_id = int(tok.pad_token_id)
        #: Rows of an encoded caption, in order.
        self.input_names = ["input_ids", "attention_mask"] + \
            (["token_type_ids"] if "token_type_ids" in tok.model_input_names else [])

    @property
    def tok(self) -> Any:
        if self._tok is None:
            from transformers import AutoTokenizer

            tok = load_hf_component(AutoTokenizer, self.path, self.where)
            if tok.pad_token is None:
                if tok.eos_token is None:
                    raise ConfigError(f"{self.where}: tokenizer {self.path} has neither a pad nor an end token "
                                      f"to pad captions with")
                tok.pad_token = tok.eos_token  # decoder-only models: padded positions are masked out anyway
            self._tok = tok
        return self._tok

    def encode(self, text: str, max_len: int) -> torch.Tensor:
        """-> ``[len(input_names), max_len]`` int64."""
        enc = self.tok(text, truncation=True, max_length=max_len, padding="max_length", padding_side="right",
                       return_attention_mask=True, return_tensors="pt")
        return torch.cat([enc[name] for name in self.input_names]).long()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tok": None}


@register_modality
class Text(Modality):
    kind = "text"
    Config = TextConfig
    members = ("txt", "text", "caption")

    def __init__(self, name: str, cfg: TextConfig, base_dir=None):
        super().__init__(name, cfg, base_dir)
        where = f"model.modalities.{name}"
        self.tokenizer: SentencePieceTokenizer | HFTokenizer | None
        if cfg.tower.type == "hf":
            self.model_path = self.resolve(cfg.tower.path)
            self.model_config = load_hf_config(self.model_path, f"{where}.tower.path")
            tokenizer_where = f"{where}.tokenizer" if cfg.tokenizer else f"{where}.tower.path"
            self.tokenizer = HFTokenizer(self.resolve(cfg.tokenizer) if cfg.tokenizer else self.model_path,
                                         tokenizer_where)
            self._check_fits(where)
        elif cfg.tokenizer or not cfg.vocab_size:
            self.tokenizer = SentencePieceTokenizer(self.resolve(cfg.tokenizer or DEFAULT_SENTENCEPIECE))
        else:  # built from ``vocab_size`` alone (named configs): reading text needs a tokenizer set later
            self.tokenizer = None

    def _check_fits(self, where: str) -> None:
        """The tokenizer's ids and ``max_len`` must exist in the model's embedding tables."""
        config, tok = self.model_config, self.tokenizer
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and tok.vocab_size > vocab:
            raise ConfigError(f"{where}.tokenizer: tokenizer {tok.path} has {tok.vocab_size} tokens but the model "
                              f"{self.model_path} has vocab_size {vocab}")
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and self.cfg.max_len > positions:
            raise ConfigError(f"{where}.max_len: {self.cfg.max_len} exceeds the model's max_position_embeddings "
                              f"{positions} ({self.model_path})")

    def decode(self, sample: dict) -> torch.Tensor:
        """-> token ids ``[<= max_len]`` int64 (``bert``), or the padded rows ``[K, max_len]`` (``hf``)."""
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
        if isinstance(self.tokenizer, HFTokenizer):
            return self.tokenizer.encode(text, self.cfg.max_len)
        return torch.tensor(self.tokenizer.encode(text)[: self.cfg.max_len], dtype=torch.long)

    def transform(self, data: torch.Tensor, train: bool) -> torch.Tensor:
        """``bert``: ids -> ``[max_len]`` padded with the pad id. ``hf``: the rows ``[K, max_len]`` as they
        are (the tokenizer padded them): ids, attention mask[, token type ids]."""
        if isinstance(self.tokenizer, HFTokenizer):
            return data
        out = torch.full((self.cfg.max_len,), self.pad_id, dtype=torch.long)
        out[: data.numel()] = data
        return out

    def empty(self) -> torch.Tensor:
        if isinstance(self.tokenizer, HFTokenizer):
            out = torch.zeros(len(self.tokenizer.input_names), self.cfg.max_len, dtype=torch.long)
            out[0] = self.tokenizer.pad_id
            out[1, 0] = 1  # one attended position: a row with none can make attention NaN (masked out later)
            return out
        return torch.full((self.cfg.max_len,), self.pad_id, dtype=torch.long)

    def files(self) -> dict[str, str]:
        if self.tokenizer is None or isinstance(self.tokenizer, HFTokenizer):
            return {}
        return {"tokenizer": str(self.tokenizer.path)}

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

    def save_files(self, out_dir: Path) -> dict[str, Any]:
        """``hf``: the model's config and the tokenizer go to ``<name>_hf/`` (the weights are in the saved
        model's own file), and the saved config builds the tower from there with ``init: config``."""
        if not isinstance(self.tokenizer, HFTokenizer):
            return super().save_files(out_dir)
        dst = f"{self.name}_hf"
        self.model_config.save_pretrained(str(out_dir / dst))
        self.tokenizer.tok.save_pretrained(str(out_dir / dst))
        return {"tokenizer": "", "tower.path": dst, "tower.init": "config"}

    def build_tower(self) -> Tower:
        tc = self.cfg.tower
        if isinstance(self.tokenizer, HFTokenizer):
            model = hf_encoder(self.model_path, f"model.modalities.{self.name}.tower.path", tc.init, tc.strict)
            return HFTextTower(model, self.tokenizer.input_names, tc.pooling)
        return TextTower(self.cfg, self.vocab_size, self.pad_id)

    def build_token_embedder(self, width: int) -> TokenEmbedder:
        """Shared-trunk tokens: the ids embedded with learned positions, ``width`` wide; padding masked."""
        if isinstance(self.tokenizer, HFTokenizer):
            raise ConfigError(f"model.modalities.{self.name}.tower.type: a shared trunk embeds token ids itself; "
                              f"'hf' towers are not available with model.shared_trunk (allowed: 'bert')")
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
        return pool(hidden, mask, self.pooling)


class HFTextTower(HFTower):
    """``[N, K, L]`` rows named ``input_names`` (ids, attention mask[, token type ids]: see
    :class:`HFTokenizer`) -> ``[N, hidden]``. Rows the model's ``forward`` does not take are left out."""

    def __init__(self, model: nn.Module, input_names: list[str], pooling: str):
        super().__init__(model)
        takes = inspect.signature(model.forward).parameters
        self.rows = [(i, name) for i, name in enumerate(input_names) if name in takes]
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model(**{name: x[:, i] for i, name in self.rows}).last_hidden_state
        return pool(hidden, x[:, 1], self.pooling)
