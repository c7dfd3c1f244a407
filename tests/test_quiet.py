"""Quiet, useful logs: DeepSpeed's accelerator detection is told the answer on a machine without a GPU (no
"Setting accelerator to CPU" line), and empty mel filters are one warning naming the mmcl settings to change
(with the smallest n_fft that fills them, checked against torchaudio's filter bank) instead of torchaudio's."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchaudio

from mmcl.modalities import build_processor
from mmcl.modalities.audio import empty_mel_filters


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only case")
def test_deepspeed_is_told_the_cpu(tmp_path: Path) -> None:
    """Importing mmcl's model is enough: transformers' save_pretrained and accelerate (which import DeepSpeed)
    then print no accelerator detection line."""
    code = ("import sys\n"
            "import mmcl.model\n"
            "from transformers import BertConfig, BertModel\n"
            "BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,\n"
            "                     intermediate_size=8)).save_pretrained(sys.argv[1])\n"
            "import accelerate\n"
            "accelerate.Accelerator(cpu=True)\n"
            "from deepspeed.accelerator import get_accelerator\n"
            "print(get_accelerator()._name)\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bert")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cpu"
    assert "Setting accelerator" not in done.stderr + done.stdout


def test_empty_mel_filters_warn_once_naming_n_fft(caplog: pytest.LogCaptureFixture) -> None:
    spec = {"kind": "audio", "n_mels": 128, "n_fft": 400, "seconds": 1.0, "tower": {"width": 32, "depth": 1, "heads": 2}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchaudio's own warning would raise here
        build_processor("speech", spec)
        build_processor("speech", spec)
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines == ["model.modalities.speech.n_fft: 400 leaves 4 of the 128 mel filters "
                     "(model.modalities.speech.n_mels) empty at 16000 Hz: those mel channels are constant; set "
                     "model.modalities.speech.n_fft >= 574 or lower model.modalities.speech.n_mels"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fb = {n: torchaudio.functional.melscale_fbanks(n // 2 + 1, 0.0, 8000.0, 128, 16000) for n in (400, 572, 574)}
    assert [int((f.sum(0) == 0).sum()) for f in fb.values()] == [4, 1, 0]
    assert [empty_mel_filters(16000, n, 128) for n in fb] == [4, 1, 0]
    caplog.clear()
    build_processor("audio", {**spec, "n_fft": 574})
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
