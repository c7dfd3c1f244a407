"""The run's log: ``DIR/log.jsonl`` (one JSON object per logged step) and tensorboard under ``DIR/tb``,
written by the main process only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class RunLog:
    """``log.jsonl``: one JSON object per line, flushed as written, and the same scalars in tensorboard.
    A resumed run (``resumed_at``: the checkpoint's step) first drops the records after that step (and a
    line torn by a crash), so the file tells the history of the weights the run ends with; tensorboard
    purges its later events likewise."""

    def __init__(self, out: Path, enabled: bool, resumed_at: int | None = None):
        path = out / "log.jsonl"
        if enabled and resumed_at is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= resumed_at]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, path)
        self.f = open(path, "a") if enabled else None
        self.tb: SummaryWriter | None = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=None if resumed_at is None else resumed_at + 1)

    def write(self, record: dict[str, Any], scalars: dict[str, float]) -> None:
        """Append ``record`` (it has a ``step``) to log.jsonl and ``scalars`` to tensorboard at that step."""
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tb:
            self.tb.close()


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
