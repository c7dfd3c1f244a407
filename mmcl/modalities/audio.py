"""Audio: decode (torchcodec, soundfile fallback) to mono at ``sample_rate``, then the input its tower type
reads, and the tower:

- ``vit`` (default): a fixed-length log-mel window (torchaudio); :func:`vit_tower` = AST-style:
  spectrogram patch tokens + fixed sin-cos positions + timm ViT blocks, built from this config.
- ``hf``: a ``transformers`` audio encoder from a local directory (AST, the encoder of Whisper, wav2vec2,
  HuBERT, ...) fed exactly what its own feature extractor (``AutoFeatureExtractor``, same directory) makes of
  a ``seconds`` window of the waveform, with a mask of the real audio in it; :class:`HFAudioTower` pools its
  hidden states over the frames that cover real audio. A Whisper-family encoder is cut to the window
  (``chunk: window``, :func:`fit_positions`) instead of the extractor's 30 s chunk.
- ``timm``: a timm image model on the same log-mel window with one input channel, from a local checkpoint
  (:class:`~mmcl.modalities.timm_towers.TimmAudioTower`; its settings are :class:`TimmTowerConfig`).

A tower type is one :func:`~mmcl.modalities.base.register_tower` call: its config, its builder and the input
pipeline (:class:`AudioInput`) the processor runs for it.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from mmcl.config import ConfigError, TrunkFields
from mmcl.data.augment import spec_augment
from mmcl.data.context import SampleContext
from mmcl.data.window import Window
from mmcl.modalities.base import MissingModality, Processor, SampleError, register_processor, register_tower
from mmcl.modalities.layers import PatchTokens, TokenTower, Trunk, patch_grid
from mmcl.modalities.pretrained import HFTower, HFTowerFields, hf_encoder, load_hf_component, load_hf_config, pool
from mmcl.modalities.timm_towers import TimmAudioTower, TimmTowerConfig

log = logging.getLogger(__name__)

#: transformers ``model_type`` of the audio encoders whose first token is a CLS token (``pooling: cls``).
CLS_MODEL_TYPES = ("audio-spectrogram-transformer",)

#: Input layouts of an ``hf`` audio tower (see :class:`FeatureExtractorInput`).
HFLayout = Literal["spectrogram", "whisper", "waveform"]
#: Mel frames per Whisper encoder position (its second convolution has stride 2).
WHISPER_FRAMES_PER_POSITION = 2


@dataclass
class AudioTowerConfig(TrunkFields, HFTowerFields):
    #: ``vit``: the AST-style tower on log-mel built from the fields below; ``hf``: a transformers audio
    #: encoder directory (``path``) with its own feature extractor.
    type: Literal["vit", "hf"] = "vit"
    #: Patch size over (mel bins, frames).
    patch: int = 16
    drop_path: float = 0.0
    #: ``mean`` over the encoder frames that cover real audio (Whisper: 2 mel frames per position;
    #: wav2vec2 / HuBERT: the samples through their convolutions; AST: every token); ``cls``: the first token
    #: of a model that has one (AST); ``mean_padded``: every frame, padding included, unless the model takes
    #: an attention mask (what models saved before format 3 did; kept for them). The ``vit`` tower mean-pools.
    pooling: Literal["mean", "cls", "mean_padded"] = "mean"
    #: ``hf`` with a Whisper-family encoder (a fixed 30 s chunk): ``window`` cuts the extractor's chunk and the
    #: encoder's positional embeddings (their first positions, unchanged) to ``seconds``, when shorter;
    #: ``full`` feeds the whole chunk, the window padded (the encoder then attends over the padding too).
    #: Other models ignore it.
    chunk: Literal["window", "full"] = "window"

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.type == "hf" and not self.path:
            raise ConfigError(f"{where}.path: required with type 'hf' (a local transformers model directory)")
        if self.type == "vit" and self.path:
            raise ConfigError(f"{where}.path: not used by type 'vit' (a tower built from this config)")
        if self.type == "vit" and self.pooling != "mean":
            raise ConfigError(f"{where}.pooling: {self.pooling!r} is not available with type 'vit' (allowed: 'mean')")


@dataclass
class AudioConfig:
    #: Decoding rate; with an ``hf`` tower it must be its feature extractor's ``sampling_rate``.
    sample_rate: int = 16000
    #: Window of the clip the tower sees: random while training, centred otherwise; shorter clips are padded.
    seconds: float = 2.0
    #: Log-mel settings of the ``vit`` tower (an ``hf`` tower's feature extractor has its own).
    n_mels: int = 64
    n_fft: int = 400
    hop: int = 160
    #: The tower's config: a registered audio tower type (``vit``, ``hf``, ``timm``), picked by ``type``.
    tower: Any = None

    @property
    def n_samples(self) -> int:
        return int(round(self.seconds * self.sample_rate))


def _decode_torchcodec(data: bytes, sample_rate: int) -> torch.Tensor:
    from torchcodec.decoders import AudioDecoder

    return AudioDecoder(data, sample_rate=sample_rate, num_channels=1).get_all_samples().data[0]


def _decode_soundfile(data: bytes, sample_rate: int) -> torch.Tensor:
    import soundfile

    wav, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = torch.from_numpy(wav).mean(dim=1)
    return torchaudio.functional.resample(mono, sr, sample_rate) if sr != sample_rate else mono


def _fit(wav: torch.Tensor, first: float, window: Window, sample_rate: int) -> torch.Tensor:
    """Mono samples ``[S]`` whose first one is played at ``first`` s -> exactly the window's span ``[n]``,
    placed by presentation time: silence where the audio has not started yet or has ended."""
    n = int(round(window.seconds * sample_rate))
    lead = int(round((first - window.start) * sample_rate))
    wav = F.pad(wav, (lead, 0)) if lead > 0 else wav[-lead:]
    wav = wav[:n]
    return F.pad(wav, (0, n - wav.numel())) if wav.numel() < n else wav


def _decode_torchcodec_window(data: bytes, sample_rate: int, window: Window) -> torch.Tensor:
    """``AudioDecoder.get_samples_played_in_range`` over the window (a seek, only its span decoded)."""
    from torchcodec.decoders import AudioDecoder

    samples = AudioDecoder(data, sample_rate=sample_rate, num_channels=1).get_samples_played_in_range(
        max(0.0, window.start), window.end)
    return _fit(samples.data[0], samples.pts_seconds, window, sample_rate)


def _decode_soundfile_window(data: bytes, sample_rate: int, window: Window) -> torch.Tensor:
    """soundfile (wav, flac): seek to the window's first sample, read its span, resample."""
    import soundfile

    with soundfile.SoundFile(io.BytesIO(data)) as f:
        native = f.samplerate
        first = min(int(round(window.start * native)), f.frames)
        f.seek(first)
        wav = f.read(int(math.ceil(window.seconds * native)), dtype="float32", always_2d=True)
    mono = torch.from_numpy(wav).mean(dim=1)
    if native != sample_rate:
        mono = torchaudio.functional.resample(mono, native, sample_rate)
    return _fit(mono, first / native, window, sample_rate)


def _decode_pyav_window(data: bytes, sample_rate: int, window: Window) -> torch.Tensor:
    """PyAV (containers): seek to the window, decode its span, resample to mono ``sample_rate``."""
    import av
    import numpy as np

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise MissingModality("audio")
        stream = container.streams.audio[0]
        if window.start > 0 and stream.time_base:
            container.seek(int(window.start / stream.time_base), stream=stream)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks: list[np.ndarray] = []
        first = None
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            if frame.time + frame.samples / frame.sample_rate <= window.start:
                continue
            if first is None:
                first = frame.time
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            if frame.time >= window.end:
                break
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    if first is None:
        raise SampleError("bad_audio", "no audio in the window")
    return _fit(torch.from_numpy(np.concatenate(chunks)), first, window, sample_rate)


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


def _window_start(length: int, n: int, train: bool) -> int:
    """Start of an ``n``-long window in ``length`` (> n): random when training, centred otherwise."""
    return int(torch.randint(0, length - n + 1, ())) if train else (length - n) // 2


class AudioInput(Protocol):
    """What a tower type reads: ``features`` runs at decode time (its output is what a RAM cache keeps),
    ``transform`` per use, ``empty`` stands in for a missing clip."""

    def features(self, wav: torch.Tensor) -> torch.Tensor: ...

    def transform(self, data: torch.Tensor, train: bool) -> torch.Tensor: ...

    def empty(self) -> torch.Tensor: ...

    def random_window(self, data: torch.Tensor) -> bool:
        """Whether training draws a random window of this clip (it is longer than ``seconds``)."""
        ...


#: torchaudio's own warning (said instead by :func:`warn_empty_mel_filters`, naming the mmcl settings).
_TORCHAUDIO_EMPTY = "At least one mel filterbank has all zero values"


def empty_mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> int:
    """How many of the ``n_mels`` triangular filters of ``torchaudio.transforms.MelSpectrogram`` (HTK scale,
    0 Hz to Nyquist) cover no frequency bin of an ``n_fft`` FFT (all-zero filters: constant mel channels)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHAUDIO_EMPTY)
        fb = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate)
    return int((fb.max(dim=0).values == 0).sum())


#: (where, sample rate, n_fft, n_mels) already warned about in this process.
_warned_mel: set[tuple[str, int, int, int]] = set()


def warn_empty_mel_filters(cfg: AudioConfig, where: str) -> None:
    """One warning line (once per process and setting) naming ``<where>.n_fft`` when some mel filters are
    empty, with the smallest even ``n_fft`` that fills them all."""
    empty = empty_mel_filters(cfg.sample_rate, cfg.n_fft, cfg.n_mels)
    key = (where, cfg.sample_rate, cfg.n_fft, cfg.n_mels)
    if not empty or key in _warned_mel:
        return
    _warned_mel.add(key)
    lo, hi = cfg.n_fft, cfg.n_fft * 2
    while empty_mel_filters(cfg.sample_rate, hi, cfg.n_mels) and hi < 2**16:
        lo, hi = hi, hi * 2
    while hi - lo > 2:  # the smallest even n_fft without empty filters, between lo (some) and hi (none)
        mid = (lo + hi) // 4 * 2
        lo, hi = (mid, hi) if empty_mel_filters(cfg.sample_rate, mid, cfg.n_mels) else (lo, mid)
    log.warning("%s.n_fft: %d leaves %d of the %d mel filters (%s.n_mels) empty at %d Hz: those mel channels are "
                "constant; set %s.n_fft >= %d or lower %s.n_mels", where, cfg.n_fft, empty, cfg.n_mels, where,
                cfg.sample_rate, where, hi, where)


class LogMel:
    """Log-mel input of the towers built here and of timm towers: ``[1, n_mels, n_frames]`` standardised per
    clip; ``n_frames`` is cut down to a multiple of ``multiple`` (a ViT's patch size)."""

    def __init__(self, cfg: AudioConfig, multiple: int = 1, where: str = "audio"):
        self.cfg = cfg
        frames = cfg.n_samples // cfg.hop + 1
        #: Spectrogram frames of a window.
        self.n_frames = frames - frames % multiple
        warn_empty_mel_filters(cfg, where)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TORCHAUDIO_EMPTY)
            self.mel = torchaudio.transforms.MelSpectrogram(
                sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop, n_mels=cfg.n_mels)

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """Waveform ``[S]`` -> log-mel ``[n_mels, frames]`` of the whole clip. Deterministic, so computed at
        decode time: a RAM cache of decoded samples keeps it (smaller than the waveform) and later epochs
        only crop."""
        return (self.mel(wav.float()) + SILENCE).log()

    def transform(self, data: torch.Tensor, train: bool) -> torch.Tensor:
        """log-mel ``[n_mels, frames]`` -> ``[1, n_mels, n_frames]``: a window of ``seconds`` (random when
        training, centred otherwise; short clips padded with silence), standardised per clip."""
        n, frames = self.n_frames, data.shape[1]
        if frames > n:
            start = _window_start(frames, n, train)
            data = data[:, start:start + n]
        elif frames < n:
            data = F.pad(data, (0, n - frames), value=math.log(SILENCE))
        return ((data - data.mean()) / (data.std() + 1e-5))[None]

    def empty(self) -> torch.Tensor:
        return torch.zeros(1, self.cfg.n_mels, self.n_frames)

    def random_window(self, data: torch.Tensor) -> bool:
        return data.shape[1] > self.n_frames


class FeatureExtractorInput:
    """The input of a transformers audio encoder: a ``seconds`` window of the waveform through the model's
    own feature extractor, so the tower gets exactly what the extractor makes of the window (``layout``):

    - ``spectrogram`` (AST): ``[frames, mel]``, padded / cut by the extractor to the model's length;
    - ``whisper``: ``[mel + 1, frames]``, the extractor's log-mel with its frame mask of real audio as the last
      row; ``frames`` is the extractor's 30 s chunk, or with ``chunk: window`` the window rounded up to whole
      encoder positions (:attr:`positions`);
    - ``waveform`` (wav2vec2, HuBERT, WavLM): ``[2, S]``, the values padded to ``seconds`` and the mask of real
      samples (the model receives the mask only where its extractor makes one: :attr:`model_mask`).

    Reads the model's config (``model_config``) and the extractor here, then the extractor lazily again in
    each loader worker (it is left out of the pickled state)."""

    def __init__(self, cfg: AudioConfig, path: Path, where: str):
        self.cfg = cfg
        self.path = path
        self.where = f"{where}.tower.path"
        self.model_config = load_hf_config(path, self.where)
        if getattr(cfg.tower, "pooling", "mean") == "cls" and self.model_config.model_type not in CLS_MODEL_TYPES:
            raise ConfigError(f"{where}.tower.pooling: 'cls' needs a model with a CLS token "
                              f"({', '.join(CLS_MODEL_TYPES)}); {self.model_config.model_type} has none "
                              f"(allowed: 'mean')")
        self._fe: Any = None
        fe = self.fe
        if fe.sampling_rate != cfg.sample_rate:
            raise ConfigError(f"{where}.sample_rate: {cfg.sample_rate} differs from the feature extractor's "
                              f"sampling_rate {fe.sampling_rate} ({path})")
        self.input_name: str = fe.model_input_names[0]
        from transformers import Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

        # Waveform extractors (wav2vec2, HuBERT, WavLM) pad to what they are asked; AST and Whisper pad or cut
        # the features to their model's fixed length themselves (Whisper's: ``max_length`` samples).
        self.layout: HFLayout = "waveform" if isinstance(fe, Wav2Vec2FeatureExtractor) else \
            "whisper" if isinstance(fe, WhisperFeatureExtractor) else "spectrogram"
        #: Whether the model itself takes the attention mask (its extractor makes one).
        self.model_mask = self.layout == "waveform" and bool(fe.return_attention_mask)
        #: Encoder positions of a Whisper-family model cut to the window (None: the checkpoint's all).
        self.positions: int | None = None
        self.max_length: int | None = None
        if self.layout == "whisper" and cfg.tower.chunk == "window":
            positions = math.ceil(math.ceil(cfg.n_samples / fe.hop_length) / WHISPER_FRAMES_PER_POSITION)
            # A model without a fixed length is refused by fit_positions, naming this field.
            if positions < getattr(self.model_config, "max_source_positions", math.inf):
                self.positions = positions
                self.max_length = positions * WHISPER_FRAMES_PER_POSITION * fe.hop_length
        self._empty: torch.Tensor | None = None

    @property
    def fe(self) -> Any:
        if self._fe is None:
            from transformers import AutoFeatureExtractor

            self._fe = load_hf_component(AutoFeatureExtractor, self.path, self.where)
        return self._fe

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """The waveform ``[S]`` itself: the window is cut per use."""
        return wav.float()

    def extract(self, wav: torch.Tensor) -> torch.Tensor:
        """One waveform window ``[<= n_samples]`` -> the extractor's model input for it (see ``layout``)."""
        kwargs: dict[str, Any] = {}
        if self.layout == "waveform":
            kwargs = {"padding": "max_length", "max_length": self.cfg.n_samples, "truncation": True}
        elif self.layout == "whisper":
            kwargs = {"return_attention_mask": True, "max_length": self.max_length}
        out = self.fe(wav.numpy(), sampling_rate=self.fe.sampling_rate, return_tensors="pt", **kwargs)
        x = out[self.input_name][0]
        if self.layout == "whisper":
            return torch.cat([x, out["attention_mask"][0, None].to(x.dtype)])
        if self.layout == "waveform":
            real = (torch.arange(x.numel()) < wav.numel()).to(x.dtype)
            return torch.stack([x, real])
        return x

    def transform(self, data: torch.Tensor, train: bool) -> torch.Tensor:
        n = self.cfg.n_samples
        if data.numel() > n:
            start = _window_start(data.numel(), n, train)
            data = data[start:start + n]
        return self.extract(data)

    def random_window(self, data: torch.Tensor) -> bool:
        return data.numel() > self.cfg.n_samples

    def empty(self) -> torch.Tensor:
        if self._empty is None:
            self._empty = self.extract(torch.zeros(self.cfg.n_samples))
        return self._empty

    def save(self, out_dir: Path, name: str) -> dict[str, Any]:
        """The model's config and feature extractor go to ``<name>_hf/`` (the weights are in the saved model's
        own file)."""
        dst = f"{name}_hf"
        self.model_config.save_pretrained(str(out_dir / dst))
        self.fe.save_pretrained(str(out_dir / dst))
        return {"tower.path": dst}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fe": None}


@register_processor
class Audio(Processor):
    kind = "audio"
    Config = AudioConfig
    #: A separate audio member first, else the audio track of the video container.
    members = ("flac", "wav", "mp3", "ogg", "m4a", "mp4", "webm", "mkv")
    timed = True
    input: AudioInput

    def decode(self, sample: dict, ctx: SampleContext | None = None) -> torch.Tensor:
        """-> the whole clip (mono, resampled to ``sample_rate``) as its tower type's input keeps it: log-mel
        ``[n_mels, frames]`` float32 (``vit``, ``timm``), the waveform ``[S]`` (``hf``). With ``ctx.window``:
        exactly the window's span (``seconds``), placed by presentation time (silence where the track has not
        started or has ended), only that span decoded (torchcodec; soundfile or PyAV as fallbacks)."""
        ext, data = self.find_member(sample)
        window = ctx.window if ctx is not None else None
        sr = self.cfg.sample_rate
        try:
            try:
                wav = _decode_torchcodec(data, sr) if window is None else _decode_torchcodec_window(data, sr, window)
            except Exception:
                if ext not in _CONTAINERS:
                    wav = _decode_soundfile(data, sr) if window is None else _decode_soundfile_window(data, sr, window)
                elif not _has_audio_stream(data):
                    raise MissingModality(self.name) from None  # a video-only container: no audio
                elif window is not None:
                    wav = _decode_pyav_window(data, sr, window)
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
        return self.input.features(wav)

    def transform(self, data: torch.Tensor, train: bool, ctx: SampleContext | None = None) -> torch.Tensor:
        """Decoded clip -> the tower's input for its window (a decoded ``ctx.window`` is the span itself: no
        second, random window inside it); training with ``data.augment.audio``, SpecAugment masks on the
        log-mel window (:func:`spec_augment`, drawn from ``ctx.generator("augment.audio")``)."""
        x = self.input.transform(data, train and (ctx is None or ctx.window is None))
        if train and ctx is not None and self.augment is not None:
            x = spec_augment(x, self.augment, ctx.generator("augment.audio"))
        return x

    def check_window(self, seconds: float, where: str) -> None:
        if abs(self.cfg.seconds - seconds) > 1e-9:
            raise ConfigError(f"{where}.seconds: {seconds:g} differs from {self.where}.seconds {self.cfg.seconds:g} "
                              f"(the audio is the window's span: make them equal)")

    def with_augment(self, augment: Any) -> Audio:
        """SpecAugment needs the log-mel input (tower types ``vit``, ``timm``)."""
        if not isinstance(self.input, LogMel):
            raise ConfigError(f"data.augment.audio: SpecAugment masks a log-mel input; {self.where} has tower type "
                              f"{self.cfg.tower.type!r} (allowed with it: no data.augment.audio)")
        return cast(Audio, super().with_augment(augment))

    def empty(self) -> torch.Tensor:
        return self.input.empty()

    def cache_window(self, data: torch.Tensor, train: bool, ctx: SampleContext | None = None) -> str | None:
        """Training draws a random window of a clip longer than ``seconds`` (not cached); a shorter clip, or
        the centred window outside training, is fixed by the sample."""
        return None if train and self.input.random_window(data) else ""

    @property
    def n_frames(self) -> int:
        """Spectrogram frames of the log-mel window (``vit`` and ``timm`` towers)."""
        return self.input.n_frames


# ----------------------------------------------------------------------------------------------------
# Tower types


def spectrogram_tokens(audio: Audio, width: int, init: bool = True) -> PatchTokens:
    """``[N, 1, n_mels, n_frames]`` -> ``[N, (n_mels/patch) * (n_frames/patch), width]`` patch tokens with
    sin-cos positions."""
    p = audio.cfg.tower.patch
    grid = (patch_grid(audio.cfg.n_mels, p, "audio.n_mels"), audio.n_frames // p)
    return PatchTokens(nn.Conv2d(1, width, kernel_size=p, stride=p), grid, width, init=init)


def vit_tower(audio: Audio, pretrained: bool) -> TokenTower:
    """AST-style: spectrogram patch tokens + timm ViT blocks + mean pooling."""
    tc = audio.cfg.tower
    return TokenTower(spectrogram_tokens(audio, tc.width, init=False), Trunk.of(tc, tc.drop_path), tc.width,
                      init_vit=True)


def timm_tower(audio: Audio, pretrained: bool) -> TimmAudioTower:
    tc = audio.cfg.tower
    checkpoint = audio.resolve(tc.checkpoint) if tc.checkpoint and pretrained else None
    return TimmAudioTower(tc, (audio.cfg.n_mels, audio.n_frames), checkpoint, f"{audio.where}.tower")


def hf_tower(audio: Audio, pretrained: bool) -> HFAudioTower:
    tc, inputs = audio.cfg.tower, cast(FeatureExtractorInput, audio.input)
    model = hf_encoder(inputs.path, inputs.where, tc.init if pretrained else "config", tc.strict)
    if inputs.positions is not None:
        fit_positions(model, inputs.positions, f"{audio.where}.tower.chunk")
    return HFAudioTower(model, inputs.input_name, inputs.layout, inputs.model_mask, tc.pooling)


def fit_positions(model: nn.Module, positions: int, where: str) -> None:
    """Cut a Whisper-family encoder (fixed ``max_source_positions``, learned or sinusoidal position table
    ``embed_positions``) to its first ``positions``: the table keeps the checkpoint's first rows exactly and
    the encoder then takes ``WHISPER_FRAMES_PER_POSITION * positions`` mel frames."""
    table = getattr(model, "embed_positions", None)
    if not isinstance(table, nn.Embedding) or not hasattr(model.config, "max_source_positions"):
        raise ConfigError(f"{where}: 'window' needs a Whisper-family encoder (embed_positions, "
                          f"max_source_positions); {type(model).__name__} has none (allowed: 'full')")
    cut = nn.Embedding(positions, table.embedding_dim, device=table.weight.device, dtype=table.weight.dtype)
    with torch.no_grad():
        cut.weight.copy_(table.weight[:positions])
    cut.weight.requires_grad_(table.weight.requires_grad)
    model.embed_positions = cut
    model.config.max_source_positions = positions
    if hasattr(model, "max_source_positions"):
        model.max_source_positions = positions


class HFAudioTower(HFTower):
    """A transformers audio encoder: the feature extractor's batch (see :class:`FeatureExtractorInput`;
    ``[N, mel + 1, frames]`` Whisper, ``[N, 2, S]`` waveform, ``[N, frames, mel]`` AST) -> ``[N, hidden]``,
    pooled over the encoder frames that cover real audio. A batch without the mask (``[N, mel, frames]``,
    ``[N, S]``: the extractor's output alone) counts every frame as real."""

    def __init__(self, model: nn.Module, input_name: str, layout: HFLayout, model_mask: bool, pooling: str):
        super().__init__(model)
        self.input_name = input_name
        self.layout = layout
        self.model_mask = model_mask
        self.pooling = pooling

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (the model input, the mask of real input ``[N, frames or S]`` or None)."""
        if self.layout == "whisper" and x.shape[1] == self.model.config.num_mel_bins + 1:
            return x[:, :-1], x[:, -1]
        if self.layout == "waveform" and x.ndim == 3:
            return x[:, 0], x[:, 1]
        return x, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, real = self._split(x)
        kwargs = {self.input_name: values}
        if self.model_mask and real is not None:
            kwargs["attention_mask"] = real.long()
        hidden = self.model(**kwargs).last_hidden_state
        frames = None
        if real is not None and (self.pooling == "mean" or self.model_mask):
            if self.layout == "whisper":
                frames = real[:, ::WHISPER_FRAMES_PER_POSITION][:, :hidden.shape[1]]
            else:
                # The model's own mapping of samples to output frames through its convolutions (the one its
                # sequence-classification head pools with).
                frames = self.model._get_feature_vector_attention_mask(hidden.shape[1], real.long())
        return pool(hidden, frames, "mean" if self.pooling == "mean_padded" else self.pooling)


register_tower("audio", "vit", config=AudioTowerConfig, build=vit_tower,
               inputs=lambda audio: LogMel(audio.cfg, multiple=audio.cfg.tower.patch, where=audio.where),
               embedder=spectrogram_tokens)
register_tower("audio", "hf", config=AudioTowerConfig, build=hf_tower,
               inputs=lambda audio: FeatureExtractorInput(audio.cfg, audio.resolve(audio.cfg.tower.path), audio.where))
register_tower("audio", "timm", config=TimmTowerConfig, build=timm_tower,
               inputs=lambda audio: LogMel(audio.cfg, where=audio.where))
