"""Text: the processor (UTF-8 caption -> token ids padded to ``max_len``) and the registered tower types. The
tower's ``type`` picks both the tower and the tokenizer the processor runs (its declared input):

- ``bert`` (default): sentencepiece ids; :class:`TextTower` = a ``transformers`` BERT-style encoder built
  from this config, with masked-mean pooling (a CLS-pooled tiny encoder starts with near-identical
  embeddings for every caption and collapses contrastive training).
- ``hf``: any ``transformers`` AutoModel directory on local disk (``tower.path``) with its own tokenizer
  (``AutoTokenizer``, from the same directory unless ``tokenizer`` names another); :class:`HFTextTower`
  pools its hidden states (``cls`` / masked ``mean`` / ``last`` non-pad token).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from transformers import BertConfig, BertModel

from mmcl.config import ConfigError, TrunkFields
from mmcl.data.context import SampleContext
from mmcl.modalities.base import Processor, SampleError, Tower, register_processor, register_tower
from mmcl.modalities.layers import IdTokens
from mmcl.modalities.pretrained import HFTower, HFTowerFields, hf_encoder, load_hf_component, load_hf_config, pool

#: The sentencepiece model a ``bert`` tower reads when neither ``tokenizer`` nor ``vocab_size`` is set.
DEFAULT_SENTENCEPIECE = "tokenizer.model"


@dataclass
class TextTowerConfig(TrunkFields, HFTowerFields):
    #: ``bert``: a BERT-style encoder built from the fields below (random init); ``hf``: a transformers model
    #: directory (``path``).
    type: Literal["bert", "hf"] = "bert"
    depth: int = 2
    #: ``cls``: first token; ``mean``: masked mean over the tokens; ``last``: last non-pad token.
    pooling: Literal["mean", "cls", "last"] = "mean"
    dropout: float = 0.0

    def validate(self, where: str) -> None:
        super().validate(where)
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
    #: The tower's config: a registered text tower type (``bert``, ``hf``), picked by ``type``.
    tower: Any = None
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

    def encode(self, text: str, max_len: int) -> torch.Tensor:
        """-> ids ``[<= max_len]`` int64 (padded by :meth:`pad`, per use)."""
        return torch.tensor(self.sp.encode(text)[:max_len], dtype=torch.long)

    def pad(self, ids: torch.Tensor, max_len: int) -> torch.Tensor:
        out = torch.full((max_len,), self.pad_id, dtype=torch.long)
        out[: ids.numel()] = ids
        return out

    def empty(self, max_len: int) -> torch.Tensor:
        return torch.full((max_len,), self.pad_id, dtype=torch.long)

    def files(self) -> dict[str, str]:
        return {"tokenizer": str(self.path)}

    def __getstate__(self) -> dict:
        return {"path": self.path, "_sp": None}


class HFTokenizer:
    """A transformers tokenizer (``AutoTokenizer``) from a local directory: text -> the rows the model reads
    (``input_names``: ids, attention mask and, where the tokenizer makes them, token type ids), padded on
    the right to ``max_len``. Read once here for its sizes, then lazily again in each loader worker (the
    pickled state leaves the tokenizer out)."""

    def __init__(self, path: Path, where: str, model_path: Path, max_len: int, modality: str):
        self.path = path
        self.where = where
        #: The model's directory: its config is saved with the tokenizer (the tower's architecture).
        self.model_path = model_path
        self.model_config = load_hf_config(model_path, f"{modality}.tower.path")
        self._tok: Any = None
        tok = self.tok
        self.vocab_size = len(tok)
        self.pad_id = int(tok.pad_token_id)
        #: Rows of an encoded caption, in order.
        self.input_names = ["input_ids", "attention_mask"] + \
            (["token_type_ids"] if "token_type_ids" in tok.model_input_names else [])
        self._check_fits(modality, max_len)

    def _check_fits(self, where: str, max_len: int) -> None:
        """The tokenizer's ids and ``max_len`` must exist in the model's embedding tables."""
        vocab = getattr(self.model_config, "vocab_size", None)
        if vocab is not None and self.vocab_size > vocab:
            raise ConfigError(f"{where}.tokenizer: tokenizer {self.path} has {self.vocab_size} tokens but the model "
                              f"{self.model_path} has vocab_size {vocab}")
        positions = getattr(self.model_config, "max_position_embeddings", None)
        if positions is not None and max_len > positions:
            raise ConfigError(f"{where}.max_len: {max_len} exceeds the model's max_position_embeddings "
                              f"{positions} ({self.model_path})")

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

    def pad(self, rows: torch.Tensor, max_len: int) -> torch.Tensor:
        """The rows ``[K, max_len]`` as they are (the tokenizer padded them)."""
        return rows

    def empty(self, max_len: int) -> torch.Tensor:
        out = torch.zeros(len(self.input_names), max_len, dtype=torch.long)
        out[0] = self.pad_id
        out[1, 0] = 1  # one attended position: a row with none can make attention NaN (masked out later)
        return out

    def save(self, out_dir: Path, name: str) -> dict[str, Any]:
        """The model's config and the tokenizer go to ``<name>_hf/`` (the weights are in the saved model's own
        file)."""
        dst = f"{name}_hf"
        self.model_config.save_pretrained(str(out_dir / dst))
        self.tok.save_pretrained(str(out_dir / dst))
        return {"tokenizer": "", "tower.path": dst}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tok": None}


@register_processor
class Text(Processor):
    kind = "text"
    Config = TextConfig
    members = ("txt", "text", "caption")
    #: The tokenizer of the tower type (None: a ``bert`` tower built from ``vocab_size`` alone).
    input: SentencePieceTokenizer | HFTokenizer | None

    @property
    def tokenizer(self) -> SentencePieceTokenizer | HFTokenizer | None:
        return self.input

    def decode(self, sample: dict, ctx: SampleContext | None = None) -> torch.Tensor:
        """-> token ids ``[<= max_len]`` int64 (``bert``), or the padded rows ``[K, max_len]`` (``hf``)."""
        _, data = self.find_member(sample)
        try:
            text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
        except UnicodeDecodeError as e:
            raise SampleError("bad_text", f"not UTF-8: {e}") from None
        return self.tokenize(text)

    def tokenize(self, text: str) -> torch.Tensor:
        if self.input is None:
            raise ConfigError(f"{self.where}.tokenizer: not set; reading text needs one")
        text = text.strip()
        if not text:
            raise SampleError("empty_text")
        if len(text) > self.cfg.max_chars:
            raise SampleError("long_text", f"{len(text)} characters > max_chars {self.cfg.max_chars}")
        return self.input.encode(text, self.cfg.max_len)

    def transform(self, data: torch.Tensor, train: bool, ctx: SampleContext | None = None) -> torch.Tensor:
        """``bert``: ids -> ``[max_len]`` padded with the pad id. ``hf``: the rows ``[K, max_len]`` as they
        are (the tokenizer padded them): ids, attention mask[, token type ids]."""
        return self.input.pad(data, self.cfg.max_len)

    def cache_window(self, data: Any, train: bool, ctx: SampleContext | None = None) -> str:
        """No train-time randomness: the sample alone fixes its input."""
        return ""

    def empty(self) -> torch.Tensor:
        if self.input is None:
            return torch.full((self.cfg.max_len,), self.pad_id, dtype=torch.long)
        return self.input.empty(self.cfg.max_len)

    @property
    def pad_id(self) -> int:
        return self.input.pad_id if self.input else 0

    @property
    def vocab_size(self) -> int:
        """The embedding table's rows: ``vocab_size``, else the tokenizer's (which must fit in it)."""
        if not self.cfg.vocab_size:
            return self.input.vocab_size
        if self.input and self.input.vocab_size > self.cfg.vocab_size:
            raise ConfigError(f"{self.where}.vocab_size: {self.cfg.vocab_size} is smaller than "
                              f"the tokenizer's vocabulary ({self.input.vocab_size}, {self.input.path})")
        return self.cfg.vocab_size


# ----------------------------------------------------------------------------------------------------
# Tower types


def _sentencepiece(text: Text) -> SentencePieceTokenizer | None:
    if text.cfg.tokenizer or not text.cfg.vocab_size:
        return SentencePieceTokenizer(text.resolve(text.cfg.tokenizer or DEFAULT_SENTENCEPIECE))
    return None  # built from ``vocab_size`` alone (named configs): reading text needs a tokenizer set later


def _hf_tokenizer(text: Text) -> HFTokenizer:
    cfg = text.cfg
    model_path = text.resolve(cfg.tower.path)
    where = f"{text.where}.tokenizer" if cfg.tokenizer else f"{text.where}.tower.path"
    return HFTokenizer(text.resolve(cfg.tokenizer) if cfg.tokenizer else model_path, where, model_path,
                       cfg.max_len, text.where)


def _hf_tower(text: Text, pretrained: bool) -> HFTextTower:
    tc, tok = text.cfg.tower, cast(HFTokenizer, text.input)
    model = hf_encoder(tok.model_path, f"{text.where}.tower.path", tc.init if pretrained else "config", tc.strict)
    return HFTextTower(model, tok.input_names, tc.pooling)


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
            hidden_dropout_prob=tc.dropout, attention_probs_dropout_prob=tc.dropout, attn_implementation="sdpa",
        )
        self.encoder = BertModel(bert, add_pooling_layer=False)
        self.out_dim = tc.width

    def blocks(self) -> list[nn.Module]:
        return list(self.encoder.encoder.layer)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:  # transformers' own (its gradient_checkpointing_* names are deprecated)
            self.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.encoder.activation_checkpointing_disable()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        valid = ids != self.pad_id
        # The 4-D boolean mask is used as given: from a 2-D one transformers would first test on the host
        # whether any token is padding (a device sync per step).
        attend = valid[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
        hidden = self.encoder(input_ids=ids, attention_mask=attend).last_hidden_state
        return pool(hidden, valid.long(), self.pooling)


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


register_tower("text", "bert", config=TextTowerConfig, inputs=_sentencepiece,
               build=lambda text, pretrained: TextTower(text.cfg, text.vocab_size, text.pad_id),
               embedder=lambda text, width: IdTokens(text.vocab_size, text.cfg.max_len, width, text.pad_id))
register_tower("text", "hf", config=TextTowerConfig, inputs=_hf_tokenizer, build=_hf_tower)
