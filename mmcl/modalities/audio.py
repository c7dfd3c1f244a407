"""Audio: decode (torchcodec, soundfile fallback), resample to 16 kHz mono, fixed-length crop/pad,
log-mel (torchaudio); :class:`AudioTower` = AST-style: spectrogram patches + fixed sin-cos positions +
timm ViT blocks."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from mmcl.modalities.base import MissingModality, Modality, SampleError, TokenEmbedder, Tower, register_modality
from mmcl.modalities.layers import PatchTokens, Trunk, init_linear_like_vit, patch_grid, sincos_nd


@dataclass
class AudioTowerConfig:
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    #: Patch size over (mel bins, frames).
    patch: int = 16
    drop_path: float = 0.0


@dataclass
class AudioConfig:
    sample_rate: int = 16000
    seconds: float = 2.0
    n_mels: int = 64
    n_fft: int = 400
    hop: int = 160
    tower: AudioTowerConfig = field(default_factory=AudioTowerConfig)

    @property
    def n_samples(self) -> int:
        return int(round(self.seconds * self.sample_rate))

    @property
    def n_frames(self) -> int:
        """Spectrogram frames, cut down to a multiple of the patch size."""
        frames = self.n_samples // self.hop + 1
        return frames - frames % self.tower.patch


def _decode_torchcodec(data: bytes, sample_rate: int) -> torch.Tensor:
    from torchcodec.decoders import AudioDecoder

    return AudioDecoder(data, sample_rate=sample_rate, num_channels=1).get_all_samples().data[0]


def _decode_soundfile(data: bytes, sample_rate: int) -> torch.Tensor:
    import soundfile

    wav, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = torch.from_numpy(wav).mean(dim=1)
    return torchaudio.functional.resample(mono, sr, sample_rate) if sr != sample_rate else mono


_CONTAINERS = ("mp4", "webm", "mkv")
#: Added to mel power before the log (the floor of silence).
SILENCE = 1e-6


def _has_audio_stream(data: bytes) -> bool:
    """Whether a container has an audio stream (an unreadable one counts as having one: a bad sample)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            return bool(container.streams.audio)
    except Exception:
        return True


@register_modality
class Audio(Modality):
    kind = "audio"
    Config = AudioConfig
    #: A separate audio member first, else the audio track of the video container.
    members = ("flac", "wav", "mp3", "ogg", "m4a", "mp4", "webm", "mkv")

    def __init__(self, name: str, cfg: AudioConfig, base_dir=None):
        super().__init__(name, cfg, base_dir)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop, n_mels=cfg.n_mels)

    def decode(self, sample: dict) -> torch.Tensor:
        """-> log-mel ``[n_mels, frames]`` float32 of the whole clip (mono, resampled to ``sample_rate``).

        The spectrogram is computed here, not in :meth:`transform`: it is deterministic, so a RAM cache of
        decoded samples keeps it (smaller than the waveform) and later epochs only crop."""
        ext, data = self.find_member(sample)
        try:
            try:
                wav = _decode_torchcodec(data, self.cfg.sample_rate)
            except Exception:
                if ext not in _CONTAINERS:
                    wav = _decode_soundfile(data, self.cfg.sample_rate)
                elif not _has_audio_stream(data):
                    raise MissingModality(self.name) from None  # a video-only container: no audio
                else:
                    raise
        except SampleError:
            raise
        except Exception as e:
            raise SampleError("bad_audio", f"{type(e).__name__}: {e}") from None
        if wav.numel() == 0:
            raise SampleError("bad_audio", "empty audio")
        if not torch.isfinite(wav).all():
            raise SampleError("bad_audio", "non-finite samples")
        return (self.mel(wav.float()) + SILENCE).log()

    def transform(self, data: torch.Tensor, train: bool) -> torch.Tensor:
        """log-mel ``[n_mels, frames]`` -> ``[1, n_mels, n_frames]``: a window of ``seconds`` (random when
        training, centred otherwise; short clips padded with silence), standardised per clip."""
        n, frames = self.cfg.n_frames, data.shape[1]
        if frames > n:
            start = int(torch.randint(0, frames - n + 1, ())) if train else (frames - n) // 2
            data = data[:, start:start + n]
        elif frames < n:
            data = F.pad(data, (0, n - frames), value=math.log(SILENCE))
        return ((data - data.mean()) / (data.std() + 1e-5))[None]

    def empty(self) -> torch.Tensor:
        return torch.zeros(1, self.cfg.n_mels, self.cfg.n_frames)

    def build_tower(self) -> Tower:
        return AudioTower(self.cfg)

    def build_token_embedder(self, width: int) -> TokenEmbedder:
        """Shared-trunk tokens: the tower's spectrogram patches (``tower.patch``), ``width`` wide."""
        p = self.cfg.tower.patch
        grid = (patch_grid(self.cfg.n_mels, p, "audio.n_mels"), self.cfg.n_frames // p)
        return PatchTokens(nn.Conv2d(1, width, kernel_size=p, stride=p), grid, width)


class AudioTower(Tower):
    """``[N, 1, n_mels, n_frames]`` -> ``[N, width]``."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        tc = cfg.tower
        grid = (patch_grid(cfg.n_mels, tc.patch, "audio.n_mels"), cfg.n_frames // tc.patch)
        self.embed = nn.Conv2d(1, tc.width, kernel_size=tc.patch, stride=tc.patch)
        self.register_buffer("pos", sincos_nd(grid, tc.width)[None], persistent=False)
        self.trunk = Trunk(tc.width, tc.depth, tc.heads, tc.mlp_ratio, tc.drop_path)
        self.out_dim = tc.width
        init_linear_like_vit(self)

    def blocks(self) -> list[nn.Module]:
        return list(self.trunk.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.trunk(tokens)
