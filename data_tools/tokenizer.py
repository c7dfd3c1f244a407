"""``mmcl tokenizer``: a sentencepiece tokenizer trained on the captions (``txt`` members) of shards.

The captions are streamed shard by shard through the loader's tar reader (:func:`mmcl.data.shards.read_samples`,
media members skipped over unread); only the caption text is kept (sentencepiece needs it in memory; ``max_sentences`` bounds it on large corpora).
The model has the ids the text modality expects: ``<pad>`` = 0, ``<unk>`` = 1, no bos / eos.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm
from tqdm import tqdm

from data_tools.check import TEXT_EXTS
from mmcl.data.shards import dataset_size, expand_shards, read_samples
from mmcl.data.synthetic import UNK_ID, train_tokenizer
from mmcl.errors import DataError

#: Caption characters kept when training: the rarest 0.05 % map to ``<unk>`` (sentencepiece's default for
#: large alphabets such as CJK; with a Latin alphabet every character stays).
CHARACTER_COVERAGE = 0.9995
#: Captions sentencepiece keeps (a uniform sample of larger corpora).
MAX_SENTENCES = 2_000_000


class _Captions:
    """The captions of ``urls`` as one stream, counting samples, captions and caption characters."""

    def __init__(self, urls: list[str], progress: bool):
        self.urls = urls
        self.progress = progress
        self.samples = 0
        self.captions = 0
        self.undecodable = 0
        self.chars: Counter[str] = Counter()

    def __iter__(self) -> Iterator[str]:
        bar = tqdm(total=dataset_size(self.urls), desc="captions", unit="sample", dynamic_ncols=True,
                   disable=not self.progress)
        try:
            for url in self.urls:
                for sample in read_samples(url, lambda *problem, url=url: self._report(url, *problem),
                                           read=lambda ext: ext in TEXT_EXTS):
                    self.samples += 1
                    bar.update(1)
                    text = self._caption(sample)
                    if text:
                        self.captions += 1
                        self.chars.update(text)
                        bar.set_postfix(captions=self.captions, refresh=False)
                        yield text
        finally:
            bar.close()

    def _report(self, url: str, reason: str, detail: str, key: str | None) -> None:
        """A shard that cannot be read to its end stops the command; a sample the reader drops (a member
        twice) is only left out."""
        if key is None:
            raise DataError(f"{url}: {reason}: {detail}")

    def _caption(self, sample: dict[str, Any]) -> str:
        raw = next((sample[ext] for ext in TEXT_EXTS if ext in sample), None)
        if raw is None:
            return ""
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            self.undecodable += 1
            return ""


def character_coverage(model: Path, chars: Counter[str]) -> float:
    """Share of the caption characters (whitespace excluded) that the model encodes without ``<unk>``."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    counted = {c: n for c, n in chars.items() if not c.isspace()}
    total = sum(counted.values())
    covered = sum(n for c, n in counted.items() if UNK_ID not in sp.encode(c))
    return covered / total if total else 1.0


def tokenizer_from_shards(spec: str, out: str | Path, vocab_size: int = 8000,
                          model_type: Literal["unigram", "bpe"] = "unigram", max_sentences: int = MAX_SENTENCES,
                          progress: bool = True) -> dict[str, Any]:
    """Train a sentencepiece model on the captions of ``spec`` and write it to ``out``.

    ``vocab_size`` is an upper bound (a small corpus yields fewer pieces). Returns ``{"file", "shards",
    "samples", "captions", "undecodable", "pieces", "vocab_size", "model_type", "coverage"}``; coverage is
    the share of caption characters (whitespace excluded) that encode without ``<unk>``.
    """
    if model_type not in ("unigram", "bpe"):
        raise DataError(f"--model-type: {model_type!r} is not allowed (allowed: 'unigram', 'bpe')")
    if vocab_size < 3:
        raise DataError(f"--vocab-size: must be >= 3 (<pad>, <unk> and one piece), got {vocab_size}")
    urls = expand_shards(spec)
    captions = _Captions(urls, progress)
    out = Path(out)
    try:
        train_tokenizer(captions, out, vocab_size=vocab_size, required_chars="", model_type=model_type,
                        character_coverage=CHARACTER_COVERAGE, max_sentences=max_sentences)
    except RuntimeError as e:
        if not captions.captions:
            raise DataError(f"no captions (txt members) in {captions.samples} sample(s) of {spec}") from None
        raise DataError(f"sentencepiece: {str(e).strip().splitlines()[-1]}") from None
    return {"file": str(out), "shards": len(urls), "samples": captions.samples, "captions": captions.captions,
            "undecodable": captions.undecodable, "pieces": spm.SentencePieceProcessor(model_file=str(out)).get_piece_size(),
            "vocab_size": vocab_size, "model_type": model_type,
            "coverage": character_coverage(out, captions.chars)}


def format_summary(s: dict[str, Any]) -> str:
    """The one-line summary ``mmcl tokenizer`` prints."""
    bad = f", {s['undecodable']} not UTF-8" if s["undecodable"] else ""
    return (f"{s['captions']:,} captions read ({s['samples']:,} samples in {s['shards']} shard(s){bad}): "
            f"{s['model_type']} tokenizer of {s['pieces']:,} pieces (asked {s['vocab_size']:,}), "
            f"character coverage {100 * s['coverage']:.2f} % -> {s['file']}")
