"""Who a sample is and when it is read: :class:`SampleContext`.

Everything random about one sample (its time window, its augmentation) is drawn from a generator that is a
function of ``(seed, epoch, key, purpose)`` alone, never of the rank, the worker, the shuffle order or how many
samples came before. So two ranks, a resumed run and a re-run give a sample the same window and the same
crop, whatever order the loader reads it in.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmcl.data.window import Window


@dataclass(frozen=True)
class SampleContext:
    """One sample's identity in the loader: its ``key``, the ``epoch`` it is read in, the run's ``seed`` and
    whether it is read for training (random windows and augmentation) or for evaluation (fixed ones).
    ``window``: the sample's time window (``data.clip``, :mod:`mmcl.data.window`) that every time-based
    modality decodes; None without one (the whole clip, as before ``data.clip`` existed). ``adjusted``: the
    reasons the sample was changed to fit while decoding (``short_source``: a source shorter than its window or
    its ``fps`` span, padded), appended by whoever changed it and counted by the loader."""

    key: str
    epoch: int = 0
    seed: int = 0
    train: bool = False
    window: Window | None = None
    adjusted: list[str] = field(default_factory=list, compare=False)

    def seed_for(self, purpose: str) -> int:
        """A 63-bit seed for ``purpose`` (e.g. ``"window"``, ``"augment.video"``): blake2b of the fields, so it is
        the same in every process and Python version (``hash()`` of a string is salted per process)."""
        text = f"{self.seed}\x1f{self.epoch}\x1f{self.key}\x1f{purpose}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded for ``purpose``."""
        return torch.Generator().manual_seed(self.seed_for(purpose))

    def random(self, purpose: str) -> random.Random:
        """A ``random.Random`` seeded for ``purpose``."""
        return random.Random(self.seed_for(purpose))
