"""Whisper sized to the window: clips/s of an ``hf`` audio tower on a Whisper encoder with ``chunk: window``
(the extractor's chunk and the encoder's positions cut to ``seconds``) against ``chunk: full`` (the window
padded to the extractor's 30 s chunk), feature extraction and encoder forward (no gradient) together, with
the CPU seconds per clip (this process, all threads: the figure to trust on a shared machine).

    python bench/whisper_window.py [--seconds 2 5 10] [--batch 4] [--repeat 3] [--size tiny|base]
                                   [--threads 1] [--device cpu|cuda]

The encoder has Whisper's real architecture (``tiny``: 4 layers of width 384, 80 mel bins, 1500 positions;
``base``: 6 of 512) with random weights, built from a transformers config and saved with its feature
extractor, so nothing is downloaded: the speed is the architecture's, not the weights'. Passes over the
rows are interleaved and each row shows its best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

from mmcl.modalities import build_processor, build_tower

SR = 16000
SIZES = {"tiny": {"d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536},
         "base": {"d_model": 512, "encoder_layers": 6, "encoder_attention_heads": 8, "encoder_ffn_dim": 2048}}


def save_whisper(path: Path, size: str) -> Path:
    """A Whisper model of the named size (random weights) and the default 30 s, 80-bin feature extractor."""
    arch = SIZES[size]
    WhisperModel(WhisperConfig(**arch, decoder_layers=1, decoder_attention_heads=arch["encoder_attention_heads"],
                               decoder_ffn_dim=arch["encoder_ffn_dim"], num_mel_bins=80)).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


class Row:
    """One (window, chunk) setting: its processor and tower, built once; :meth:`run` times one batch."""

    def __init__(self, path: Path, seconds: float, chunk: str, batch: int, device: str):
        self.audio = build_processor("audio", {"seconds": seconds,
                                               "tower": {"type": "hf", "path": str(path), "chunk": chunk}})
        self.tower = build_tower(self.audio).eval().to(device)
        self.positions = self.tower.model.embed_positions.num_embeddings
        self.waves = [0.1 * torch.randn(int(seconds * SR)) for _ in range(batch)]
        self.device = device
        self.wall, self.cpu = float("inf"), float("inf")
        self.forward()  # warm-up

    def forward(self) -> None:
        x = self.audio.collate([self.audio.transform(w, train=False) for w in self.waves]).to(self.device)
        with torch.no_grad():
            self.tower(x)
        if self.device == "cuda":
            torch.cuda.synchronize()

    def run(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.forward()
        self.wall = min(self.wall, (time.perf_counter() - wall) / len(self.waves))
        self.cpu = min(self.cpu, (time.process_time() - cpu) / len(self.waves))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    parser.add_argument("--batch", type=int, default=4, help="clips per forward")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per row (best shown)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default; 1, the default, is the steady figure on a shared CPU)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_whisper(Path(tmp) / "whisper", args.size)
        rows = {(s, c): Row(path, s, c, args.batch, args.device) for s in args.seconds for c in ("full", "window")}
        for _ in range(args.repeat):
            for row in rows.values():
                row.run()
    print(f"whisper-{args.size} encoder (random weights), batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads; extractor + forward, best of {args.repeat}")
    print("| window | positions | chunk: full (30 s) clips/s | chunk: window clips/s | speed-up (wall) "
          "| CPU s/clip full -> window | speed-up (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for seconds in args.seconds:
        full, window = rows[(seconds, "full")], rows[(seconds, "window")]
        print(f"| {seconds:g} s | {full.positions} -> {window.positions} | {1 / full.wall:.2f} | {1 / window.wall:.2f} "
              f"| {full.wall / window.wall:.1f}x | {full.cpu:.3f} -> {window.cpu:.3f} | {full.cpu / window.cpu:.1f}x |")


if __name__ == "__main__":
    main()
