"""Train-time augmentation (``data.augment``): one crop for every frame of a clip (frames whose pixels encode
their own coordinates and frame number), flip off by default, SpecAugment masks inside the window and of the
configured sizes, the same augmentation for the same (seed, epoch, key) whatever process or run draws it, and
nothing changed without the block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mmcl.config import ConfigError, DataConfig, from_dict, load_config
from mmcl.data.augment import AudioAugment, AugmentConfig, VideoAugment, augment_frames, crop_box, spec_augment
from mmcl.data.context import SampleContext
from mmcl.data.shards import build_loader
from mmcl.modalities import Processor, build_processor

ROOT = Path(__file__).resolve().parents[1]
T, H, W = 6, 48, 64


def coordinate_clip() -> torch.Tensor:
    """uint8 ``[T, 3, H, W]``: channel 0 = 4 x column, channel 1 = 5 x row, channel 2 = 40 x frame number."""
    x = torch.arange(W).view(1, 1, W).expand(T, H, W) * 4
    y = torch.arange(H).view(1, H, 1).expand(T, H, W) * 5
    t = torch.arange(T).view(T, 1, 1).expand(T, H, W) * 40
    return torch.stack([x, y, t], dim=1).to(torch.uint8)


def test_the_same_crop_on_every_frame_of_a_clip():
    clip = coordinate_clip()
    cfg = VideoAugment(scale=[0.2, 0.6], ratio=[0.5, 2.0])
    for seed in range(20):
        ctx = SampleContext(f"clip-{seed}", epoch=1, seed=3, train=True)
        out = augment_frames(clip, cfg, ctx.generator("augment.video"))
        assert out.shape == clip.shape and out.dtype == torch.uint8
        # every frame shows the same region of the scene, and its own frame number
        for i in range(T):
            assert torch.equal(out[i, :2], out[0, :2]), (seed, i)
            assert (out[i, 2].int() - 40 * i).abs().max() <= 1
        # the region is the box drawn for this sample, read back from the pixels' coordinates
        top, left, h, w = crop_box(H, W, cfg.scale, cfg.ratio, ctx.generator("augment.video"))
        assert 0.2 * H * W * 0.9 <= h * w <= 0.6 * H * W * 1.1
        cols, rows = out[0, 0].float() / 4, out[0, 1].float() / 5
        assert abs(cols[:, 0].mean() - left) <= 1.0 and abs(cols[:, -1].mean() - (left + w - 1)) <= 1.0
        assert abs(rows[0].mean() - top) <= 1.0 and abs(rows[-1].mean() - (top + h - 1)) <= 1.0
        # columns still grow left to right: no flip by default
        assert (cols[:, 1:] >= cols[:, :-1] - 0.5).all()


def test_flip_is_off_by_default_and_flips_whole_clips_when_on():
    clip = coordinate_clip()[:, :, :, :H]  # square frames: scale = ratio = 1 is no crop at all
    assert VideoAugment().flip is False
    still = VideoAugment(scale=[1.0, 1.0], ratio=[1.0, 1.0])
    flipping = VideoAugment(scale=[1.0, 1.0], ratio=[1.0, 1.0], flip=True)
    flipped = 0
    for seed in range(32):
        gen = SampleContext(str(seed), train=True).generator("augment.video")
        assert torch.equal(augment_frames(clip, still, gen), clip)
        out = augment_frames(clip, flipping, SampleContext(str(seed), train=True).generator("augment.video"))
        assert torch.equal(out, clip) or torch.equal(out, clip.flip(-1))
        flipped += torch.equal(out, clip.flip(-1))
    assert 6 <= flipped <= 26  # about half of 32


def test_colour_jitter_is_one_draw_per_clip():
    clip = torch.full((T, 3, H, H), 100, dtype=torch.uint8)
    clip[:, 0] = 180
    cfg = VideoAugment(scale=[1.0, 1.0], ratio=[1.0, 1.0], brightness=0.4, saturation=0.4, hue=0.1)
    out = augment_frames(clip, cfg, SampleContext("a", train=True).generator("augment.video"))
    assert not torch.equal(out, clip)
    assert all(torch.equal(out[i], out[0]) for i in range(T))  # identical frames stay identical


def test_spec_augment_masks_lie_inside_the_window_and_have_the_configured_sizes():
    mel = torch.randn(1, 64, 200) + 5.0  # no cell is 0 before masking
    cfg = AudioAugment(time_masks=3, time_width=25, freq_masks=2, freq_width=8)
    masked_any = 0
    for seed in range(40):
        out = spec_augment(mel, cfg, SampleContext(str(seed), train=True).generator("augment.audio"))
        assert out.shape == mel.shape and torch.equal(mel, mel)  # the input (a cache may hold it) is untouched
        zero = out[0] == 0
        rows = zero.all(dim=1)  # masked mel bins
        cols = zero.all(dim=0)  # masked frames
        assert int(rows.sum()) <= 2 * 8 and int(cols.sum()) <= 3 * 25
        # every changed cell lies in a masked bin or frame; all others are the input's
        assert (zero == (rows[:, None] | cols[None, :])).all()
        assert torch.equal(out[0][~zero], mel[0][~zero])
        masked_any += bool(rows.any() or cols.any())
    assert masked_any >= 35
    # masks wider than the window are clipped to it
    short = torch.randn(1, 8, 5) + 5.0
    out = spec_augment(short, AudioAugment(time_masks=4, time_width=50, freq_masks=4, freq_width=50),
                       torch.Generator().manual_seed(0))
    assert out.shape == short.shape


def test_the_same_context_gives_the_same_augmentation():
    clip = coordinate_clip()
    cfg = VideoAugment(scale=[0.3, 1.0], flip=True, contrast=0.3, hue=0.05)
    ctx = SampleContext("clip-7", epoch=2, seed=11, train=True)
    a = augment_frames(clip, cfg, ctx.generator("augment.video"))
    b = augment_frames(clip, cfg, SampleContext("clip-7", epoch=2, seed=11, train=True).generator("augment.video"))
    assert torch.equal(a, b)
    others = [augment_frames(clip, cfg, SampleContext(k, e, 11, True).generator("augment.video"))
              for k, e in (("clip-8", 2), ("clip-7", 3))]
    assert not any(torch.equal(a, o) for o in others)
    mel = torch.randn(1, 32, 100)
    spec = AudioAugment()
    assert torch.equal(spec_augment(mel, spec, ctx.generator("augment.audio")),
                       spec_augment(mel, spec, ctx.generator("augment.audio")))


def test_config_block_is_off_by_default_and_checked():
    assert from_dict(DataConfig, {}).augment == AugmentConfig()
    demo = load_config(ROOT / "configs" / "train" / "demo.yaml")
    assert demo.data.augment.video is None and demo.data.augment.audio is None
    cfg = from_dict(DataConfig, {"augment": {"video": {"flip": True}, "audio": {"time_masks": 1}}})
    assert cfg.augment.video.flip and cfg.augment.video.scale == [0.5, 1.0] and cfg.augment.audio.time_masks == 1
    with pytest.raises(ConfigError, match=r"^augment\.video\.scale: \[0\.9, 0\.2\] must be \[min, max\]"):
        from_dict(DataConfig, {"augment": {"video": {"scale": [0.9, 0.2]}}})
    with pytest.raises(ConfigError, match=r"^augment\.text: unknown field \(allowed: audio, video\)"):
        from_dict(DataConfig, {"augment": {"text": {}}})
    with pytest.raises(ConfigError, match=r"^augment\.audio\.freq_width: must be >= 0"):
        from_dict(DataConfig, {"augment": {"audio": {"freq_width": -1}}})


@pytest.fixture(scope="module")
def modalities(synthetic_data: Path) -> dict[str, Processor]:
    specs = yaml.safe_load((ROOT / "configs" / "models" / "tiny.yaml").read_text())["modalities"]
    specs["text"]["tokenizer"] = str(synthetic_data / "tokenizer.model")
    # a window longer than the 2 s clips: the audio window draws nothing, so only the augmentation differs
    specs["audio"]["seconds"] = 3.0
    return {name: build_processor(name, spec) for name, spec in specs.items()}


def _epoch(loader, epoch: int) -> dict[str, dict[str, torch.Tensor]]:
    loader.set_epoch(epoch)
    return {k: {m: x[i] for m, x in b["inputs"].items()} for b in loader for i, k in enumerate(b["keys"])}


def test_training_loader_augments_reproducibly_and_only_with_the_block(synthetic_data: Path,
                                                                       modalities: dict[str, Processor]):
    spec = str(synthetic_data / "train-{000000..000001}.tar")
    augment = AugmentConfig(video=VideoAugment(scale=[0.3, 0.8]), audio=AudioAugment(time_masks=2, freq_masks=2))
    kwargs = dict(train=True, shuffle_buffer=8, seed=5)
    plain = _epoch(build_loader(spec, modalities, 8, **kwargs), 1)
    unset = _epoch(build_loader(spec, modalities, 8, augment=AugmentConfig(), **kwargs), 1)
    one = _epoch(build_loader(spec, modalities, 8, augment=augment, **kwargs), 1)
    again = _epoch(build_loader(spec, modalities, 8, augment=augment, workers=1, **kwargs), 1)
    assert plain.keys() == unset.keys() == one.keys() == again.keys() and len(plain) == 32
    for key in plain:
        for m in ("video", "audio", "text"):
            assert torch.equal(plain[key][m], unset[key][m])  # an empty block changes nothing
            assert torch.equal(one[key][m], again[key][m])  # the same draws in a worker and in another run
        assert torch.equal(one[key]["text"], plain[key]["text"])
        assert not torch.equal(one[key]["video"], plain[key]["video"])
    assert sum(not torch.equal(one[k]["audio"], plain[k]["audio"]) for k in plain) >= 28
    # the model's own processors are left alone, and evaluation never augments
    assert all(p.augment is None for p in modalities.values())
    evaluation = build_loader(spec, modalities, 8, train=False, augment=augment)
    assert all(p.augment is None for p in evaluation.stream.processors.values())
    # another epoch draws other crops
    later = _epoch(build_loader(spec, modalities, 8, augment=augment, **kwargs), 2)
    assert sum(not torch.equal(later[k]["video"], one[k]["video"]) for k in plain) >= 28


def test_spec_augment_needs_a_log_mel_input(synthetic_data: Path, tmp_path: Path):
    from transformers import HubertConfig, Wav2Vec2FeatureExtractor

    HubertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "hubert")
    Wav2Vec2FeatureExtractor(return_attention_mask=False).save_pretrained(tmp_path / "hubert")
    audio = build_processor("audio", {"seconds": 1.0, "tower": {"type": "hf", "path": str(tmp_path / "hubert")}})
    spec = str(synthetic_data / "train-000000.tar")
    with pytest.raises(ConfigError, match=r"^data\.augment\.audio: SpecAugment masks a log-mel input; "
                                          r"model\.modalities\.audio has tower type 'hf'"):
        build_loader(spec, {"audio": audio}, 4, train=True, augment=AugmentConfig(audio=AudioAugment()))
    build_loader(spec, {"audio": audio}, 4, train=False, augment=AugmentConfig(audio=AudioAugment()))  # eval: unused
