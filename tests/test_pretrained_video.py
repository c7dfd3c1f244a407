"""Pretrained video towers (a timm image model per frame + a temporal module; an HF VideoMAE / TimeSformer)
and the timm audio tower, from real checkpoints written here: tiny timm models (timm's own ``test_vit`` /
``test_resnet`` architectures) with random weights saved as safetensors and torch files, a tiny VideoMAE and
TimeSformer saved with ``save_pretrained`` beside a ``VideoMAEImageProcessor``. Each tower is built through
an mmcl config and compared with the same model run directly with timm / transformers; then the synthetic
world's mp4s go through the whole pipeline, training leaves locked towers bit-identical, a saved model
loads without its checkpoints, and every bad input is one line."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
import webdataset as wds
from safetensors.torch import load_file, save_file
from test_distributed import tiny_config
from torchcodec.decoders import VideoDecoder
from transformers import (
    TimesformerConfig,
    TimesformerModel,
    VideoMAEConfig,
    VideoMAEImageProcessor,
    VideoMAEModel,
)

from mmcl.config import ConfigError, ModelConfig, from_dict, load_config
from mmcl.data.shards import build_loader
from mmcl.hub import model_files
from mmcl.model import MultimodalModel
from mmcl.modalities import build_processor, build_tower
from mmcl.modalities.timm_towers import TimmVideoTower
from mmcl.modalities.video import uniform_indices
from mmcl.train.loop import seed_everything, train
from mmcl.train.optim import apply_tower_controls

T, S = 4, 32  # frames per clip, frame size
#: timm's test ViT, 2 blocks of width 64 on 32 px, its input size fixed like the real ViTs'.
SMALL = {"depth": 2, "dynamic_img_size": False}
VIT = {"type": "timm", "model": "test_vit", "img_size": S, "kwargs": SMALL}


def vit(**kwargs: Any) -> torch.nn.Module:
    """The tiny timm ViT the checkpoints come from, with a 5-class head (a classification checkpoint)."""
    return timm.create_model("test_vit", pretrained=False, num_classes=5, img_size=S, **{**SMALL, **kwargs}).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoint files and HF directories with random weights (fixed seeds)."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    state = vit().state_dict()
    save_file(state, str(d / "vit.safetensors"))
    torch.save({"state_dict": state}, d / "vit.pth")  # timm's train script wraps weights this way
    save_file(vit(depth=3).state_dict(), str(d / "vit_depth3.safetensors"))
    save_file(vit(embed_dim=32).state_dict(), str(d / "vit_narrow.safetensors"))
    save_file(timm.create_model("test_resnet", pretrained=False, num_classes=5).state_dict(),
              str(d / "resnet.safetensors"))
    processor = VideoMAEImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    VideoMAEModel(VideoMAEConfig(image_size=S, patch_size=16, num_frames=T, tubelet_size=2, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
                  ).save_pretrained(d / "videomae")
    TimesformerModel(TimesformerConfig(image_size=S, patch_size=16, num_frames=T, hidden_size=32,
                                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
                     ).save_pretrained(d / "timesformer")
    for name in ("videomae", "timesformer"):
        processor.save_pretrained(d / name)
    return {"vit": d / "vit.safetensors", "vit_pth": d / "vit.pth", "vit_depth3": d / "vit_depth3.safetensors",
            "vit_narrow": d / "vit_narrow.safetensors", "resnet": d / "resnet.safetensors",
            "videomae": d / "videomae", "timesformer": d / "timesformer"}


def video_model(video: dict[str, Any], audio: dict[str, Any] | None = None, **extra: dict[str, Any]) -> MultimodalModel:
    """A two-modality model: ``video`` (its tower spec) beside an audio tower (``audio`` or a small default)
    on [32 mels x 96 frames] (0.95 s: a ViT of 16 px patches needs a multiple of 16)."""
    spec = {"embed_dim": 16, "modalities": {
        "video": {"frames": T, "size": S, "tower": video},
        "audio": {"n_mels": 32, "seconds": 0.95, "tower": audio or {"width": 32, "depth": 1, "heads": 2}},
        **extra}}
    return MultimodalModel(from_dict(ModelConfig, spec, "model")).eval()


def clips(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, T, 3, S, S, generator=torch.Generator().manual_seed(seed))


def per_frame(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[N, T, 3, S, S]`` -> ``[N, T, D]``: timm's pre-logits features of every frame, run directly."""
    with torch.no_grad():
        return model.forward_head(model.forward_features(x.flatten(0, 1)), pre_logits=True).view(*x.shape[:2], -1)


# ----------------------------------------------------------------------------------------------------
# timm towers against timm run directly


@pytest.mark.parametrize("ckpt", ["vit", "vit_pth"])
def test_timm_mean_tower_is_the_checkpoint_per_frame_averaged(ckpts: dict[str, Path], ckpt: str) -> None:
    """The checkpoint's classifier head is dropped, everything else loaded (strict): the tower's weights are
    the checkpoint's, and its output the mean over frames of timm's own features of the checkpoint."""
    model = video_model({**VIT, "checkpoint": str(ckpts[ckpt])})
    reference = vit()
    reference.load_state_dict(load_file(str(ckpts["vit"])))
    tower = model.towers["video"]
    own = tower.model.state_dict()
    assert set(own) == {k for k in reference.state_dict() if not k.startswith("head.")}
    assert all(torch.equal(own[k], v) for k, v in reference.state_dict().items() if k in own)
    x = clips()
    with torch.no_grad():
        out = tower(x)
    assert out.shape == (2, reference.num_features) and tower.out_dim == reference.num_features
    torch.testing.assert_close(out, per_frame(reference, x).mean(dim=1), rtol=0, atol=1e-6)


def test_timm_transformer_tower_is_timm_features_through_its_temporal_transformer(ckpts: dict[str, Path]) -> None:
    model = video_model({**VIT, "checkpoint": str(ckpts["vit"]), "temporal": "transformer", "temporal_depth": 2,
                         "temporal_heads": 2})
    tower = model.towers["video"]
    reference = vit()
    reference.load_state_dict(load_file(str(ckpts["vit"])))
    x = clips()
    with torch.no_grad():
        feats = per_frame(reference, x)
        expected = tower.temporal_module.trunk(feats + tower.temporal_module.pos)
        out = tower(x)
        reversed_out = tower(x.flip(1))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert tower.temporal_module.pos.shape == (1, T, reference.num_features)
    assert (out - reversed_out).abs().max() > 1e-4  # learned time positions: frame order matters
    assert len(tower.blocks()) == len(reference.blocks) + 2


def test_divided_starts_as_the_image_model_then_trains(ckpts: dict[str, Path]) -> None:
    """Divided space-time attention: one time-attention block before each of the ViT's blocks, starting as
    the identity (so the untrained tower equals ``mean``, blind to frame order); a few steps on a tiny batch
    lower the loss and make the features depend on frame order, which no per-frame mean can."""
    torch.manual_seed(0)
    model = video_model({**VIT, "checkpoint": str(ckpts["vit"]), "temporal": "divided"})
    tower = model.towers["video"]
    reference = vit()
    reference.load_state_dict(load_file(str(ckpts["vit"])))
    x = clips(4)
    with torch.no_grad():
        torch.testing.assert_close(tower(x), per_frame(reference, x).mean(dim=1), rtol=0, atol=1e-6)
        torch.testing.assert_close(tower(x.flip(1)), tower(x), rtol=0, atol=1e-6)
    assert len(tower.blocks()) == len(reference.blocks) == 2
    # The ViT's blocks, as loaded, each behind a time-attention block.
    space = {k.replace(".space.", "."): v for k, v in tower.model.state_dict().items() if ".time" not in k}
    assert all(torch.equal(v, space[k]) for k, v in reference.state_dict().items() if not k.startswith("head."))

    target = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    probe = torch.nn.Linear(tower.out_dim, 8)
    tower.train()
    opt = torch.optim.AdamW([*tower.parameters(), *probe.parameters()], lr=1e-3)
    losses = []
    for _ in range(6):
        loss = F.mse_loss(probe(tower(x)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and losses == sorted(losses, reverse=True), losses
    tower.eval()
    with torch.no_grad():
        assert (tower(x.flip(1)) - tower(x)).abs().max() > 1e-4
        assert tower(x).shape == (4, reference.num_features)


def test_grad_checkpointing_changes_no_gradient(ckpts: dict[str, Path]) -> None:
    for spec in ({**VIT, "checkpoint": str(ckpts["vit"]), "temporal": "divided"},
                 {**VIT, "checkpoint": str(ckpts["vit"]), "temporal": "transformer"},
                 {"type": "hf", "path": str(ckpts["videomae"])}):
        torch.manual_seed(0)
        model = video_model(spec).train()
        tower = model.towers["video"]
        grads = []
        for enable in (False, True):
            tower.set_grad_checkpointing(enable)
            tower.zero_grad()
            tower(clips()).square().sum().backward()
            grads.append({k: p.grad.clone() for k, p in tower.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(tower.parameters()))
        for k in grads[0]:
            torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6)


def test_timm_audio_tower_loads_rgb_weights_as_timm_does(ckpts: dict[str, Path]) -> None:
    """A 3-channel 32x32 ViT checkpoint on a 1-channel [32 mels x 96 frames] log-mel: the RGB patch filters
    summed, the position table resampled to the spectrogram's grid, the head dropped: the same model timm's
    own pretrained loader makes of that state dict (handed over in memory: nothing is fetched)."""
    model = video_model({**VIT, "checkpoint": str(ckpts["vit"])},
                        audio={"type": "timm", "model": "test_vit", "checkpoint": str(ckpts["vit"]), "kwargs": SMALL})
    audio = model.processors["audio"]
    shape = (audio.cfg.n_mels, audio.n_frames)
    state = load_file(str(ckpts["vit"]))
    reference = timm.create_model("test_vit", pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state)},
                                  num_classes=0, in_chans=1, img_size=shape, **SMALL).eval()
    tower = model.towers["audio"]
    rgb = state["patch_embed.proj.weight"]
    torch.testing.assert_close(tower.model.patch_embed.proj.weight, rgb.sum(1, keepdim=True))
    assert tower.model.pos_embed.shape == reference.pos_embed.shape != state["pos_embed"].shape
    x = torch.randn(3, 1, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(tower(x), reference(x), rtol=0, atol=1e-5)


def test_timm_audio_cnn_takes_any_spectrogram_and_stays_put_when_locked(ckpts: dict[str, Path]) -> None:
    """A CNN (batch norm) on the log-mel: the 3-channel stem summed to one; locked, a training-mode forward
    leaves its running statistics as they are."""
    model = video_model({**VIT, "checkpoint": str(ckpts["vit"])},
                        audio={"type": "timm", "model": "test_resnet", "checkpoint": str(ckpts["resnet"])})
    state = load_file(str(ckpts["resnet"]))
    tower = model.towers["audio"]
    torch.testing.assert_close(tower.model.conv1[0].weight, state["conv1.0.weight"].sum(1, keepdim=True))
    before = copy.deepcopy(tower.state_dict())
    apply_tower_controls(model, {"audio": {"lock": True}})
    model.train()
    tower(torch.randn(4, 1, 32, model.processors["audio"].n_frames))
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())
    apply_tower_controls(model, {"audio": {"lock": False}})
    tower.requires_grad_(True)
    model.train()
    tower(torch.randn(4, 1, 32, model.processors["audio"].n_frames))
    assert not torch.equal(before["model.bn1.running_mean"], tower.state_dict()["model.bn1.running_mean"])


# ----------------------------------------------------------------------------------------------------
# HF video towers against transformers run directly


@pytest.mark.parametrize(("name", "pooling", "model_cls"),
                         [("videomae", "mean", VideoMAEModel), ("timesformer", "cls", TimesformerModel)])
def test_hf_video_tower_is_the_model_run_by_transformers(ckpts: dict[str, Path], name: str, pooling: str,
                                                         model_cls: type) -> None:
    model = video_model({"type": "hf", "path": str(ckpts[name]), "pooling": pooling})
    reference = model_cls.from_pretrained(str(ckpts[name])).eval()
    x = clips()
    with torch.no_grad():
        hidden = reference(pixel_values=x).last_hidden_state
        out = model.towers["video"](x)
    torch.testing.assert_close(out, hidden[:, 0] if pooling == "cls" else hidden.mean(dim=1), rtol=0, atol=1e-6)
    assert len(model.towers["video"].blocks()) == 2 and model.towers["video"].out_dim == 32


def test_synthetic_mp4s_through_decode_transform_collate_and_towers(ckpts: dict[str, Path],
                                                                   synthetic_data: Path) -> None:
    """The synthetic world's mp4s (64 px, 16 frames) through the loader: ``hf`` frames equal the image
    processor applied to the frames torchcodec decodes at the sampled indices; ``timm`` frames are resized
    to 32 px and normalised with the model's pretrained_cfg mean / std (test_vit: ImageNet's)."""
    spec = {"embed_dim": 16, "modalities": {
        "video": {"frames": T, "size": S, "tower": {"type": "hf", "path": str(ckpts["videomae"])}},
        "frames": {"kind": "video", "frames": T, "size": S, "tower": {**VIT, "checkpoint": str(ckpts["vit"])}}}}
    model = MultimodalModel(from_dict(ModelConfig, spec, "model")).eval()
    loader = build_loader(str(synthetic_data / "test-000000.tar"), model.processors, 3, train=False)
    batch = next(iter(loader))
    samples = {s["__key__"]: s for s in wds.WebDataset(str(synthetic_data / "test-000000.tar"), shardshuffle=False)}
    processor = VideoMAEImageProcessor.from_pretrained(str(ckpts["videomae"]))
    mean = torch.tensor(timm.models.get_pretrained_cfg("test_vit").mean).view(3, 1, 1)
    std = torch.tensor(timm.models.get_pretrained_cfg("test_vit").std).view(3, 1, 1)
    for i, key in enumerate(batch["keys"]):
        decoder = VideoDecoder(samples[key]["mp4"])
        frames = decoder.get_frames_at(uniform_indices(decoder.metadata.num_frames, T)).data
        expected = processor(list(frames), return_tensors="pt")["pixel_values"][0]
        assert expected.shape == (T, 3, S, S)
        torch.testing.assert_close(batch["inputs"]["video"][i], expected, rtol=0, atol=0)
        small = F.interpolate(frames.float(), size=(S, S), mode="bilinear", antialias=True).round().clamp(0, 255)
        torch.testing.assert_close(batch["inputs"]["frames"][i], (small / 255 - mean) / std, rtol=0, atol=1e-6)
    with torch.no_grad():
        emb = model.encode(batch["inputs"])
    assert {k: v.shape for k, v in emb.items()} == {"video": (3, 16), "frames": (3, 16)}


# ----------------------------------------------------------------------------------------------------
# Training and persistence


def test_training_leaves_locked_pretrained_towers_bit_identical(ckpts: dict[str, Path], synthetic_data: Path,
                                                                tmp_path: Path) -> None:
    """3 steps on the synthetic world: the divided video tower locked but its last block, the timm CNN
    audio tower locked (batch-norm statistics included): the locked weights are still the checkpoints'."""
    base = tiny_config(synthetic_data, shards=2)
    base["model"]["modalities"]["video"] = {"frames": T, "size": S, "tower": {
        **VIT, "checkpoint": str(ckpts["vit"]), "temporal": "divided"}}
    base["model"]["modalities"]["audio"]["tower"] = {"type": "timm", "model": "test_resnet",
                                                     "checkpoint": str(ckpts["resnet"])}
    base["train"].update(steps=3, checkpoint_every=0, warmup_steps=1)
    base["train"]["towers"] = {"video": {"lock": True, "unlocked_blocks": 1, "grad_checkpointing": True},
                               "audio": {"lock": True}}
    cfg = load_config(base=base)
    seed_everything(cfg.train.seed)
    initial = MultimodalModel(cfg.model, cfg.objective).state_dict()
    train(cfg, tmp_path)
    final = load_file(str(tmp_path / "final" / "model.safetensors"))
    vit_state, resnet_state = load_file(str(ckpts["vit"])), load_file(str(ckpts["resnet"]))
    resnet_state["conv1.0.weight"] = resnet_state["conv1.0.weight"].sum(1, keepdim=True)  # RGB -> 1 channel
    last = len([k for k in vit_state if k.endswith("norm1.weight")]) - 1
    moving = f"towers.video.model.blocks.{last}."  # the ViT block and its time attention
    for k, v in final.items():
        if k.startswith("towers.video.model.") and not k.startswith(moving) and ".time" not in k:
            assert torch.equal(v, vit_state[k.removeprefix("towers.video.model.").replace(".space.", ".")]), k
        if k.startswith("towers.audio.model."):
            assert torch.equal(v, resnet_state[k.removeprefix("towers.audio.model.")]), k
        if k.startswith(("towers.video.", "towers.audio.")) and not k.startswith(moving):
            assert torch.equal(v, initial[k]), k
    assert all(not torch.equal(final[k], initial[k]) for k in final
               if k.startswith(moving))
    assert all(not torch.equal(final[k], initial[k]) for k in final if k.startswith("heads."))


def test_saved_model_loads_without_its_checkpoints(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """save_pretrained -> from_pretrained with the checkpoint files and HF directory gone: the safetensors
    hold every weight, the timm architecture comes from the config, the HF config and image processor
    are copied beside (no HF weights)."""
    moved = tmp_path / "ckpts"
    shutil.copytree(ckpts["vit"].parent, moved)
    model = video_model({**VIT, "checkpoint": str(moved / "vit.safetensors"), "temporal": "divided"},
                        audio={"type": "timm", "model": "test_vit", "checkpoint": str(moved / "vit.safetensors"),
                               "kwargs": SMALL},
                        clip={"kind": "video", "frames": T, "size": S,
                              "tower": {"type": "hf", "path": str(moved / "videomae")}})
    with torch.no_grad():  # the saved weights differ from the checkpoints'
        for p in model.towers.parameters():
            p.add_(0.01)
    out = model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(moved)
    assert sorted(f.name for f in (out / "clip_videomae").iterdir()) == ["config.json", "preprocessor_config.json"]
    assert {"clip_videomae/config.json", "clip_videomae/preprocessor_config.json"} <= set(model_files(out))
    loaded = MultimodalModel.from_pretrained(out).eval()
    a = torch.randn(2, 1, 32, model.processors["audio"].n_frames)
    inputs = {"video": clips(), "clip": clips(seed=1), "audio": a}
    with torch.no_grad():
        expected, got = model.encode(inputs), loaded.encode(inputs)
    for k in inputs:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
    assert isinstance(loaded.towers["video"], TimmVideoTower)
    # The loaded model's processor is the copy: the transform is unchanged.
    frames = torch.randint(0, 256, (T, 3, 40, 56), dtype=torch.uint8)
    torch.testing.assert_close(loaded.processors["clip"].transform(frames, train=False),
                               model.processors["clip"].transform(frames, train=False), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# Bad input: one line each


def error_of(video: dict[str, Any], frames: int = T, size: int = S) -> str:
    with pytest.raises(ConfigError) as e:
        spec = {"frames": frames, "size": size, "tower": video}
        build_tower(build_processor("video", spec))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(("video", "pattern"), [
    ({**VIT, "checkpoint": "/nonexistent/vit.safetensors"},
     r"^model.modalities.video.tower.checkpoint: file not found: /nonexistent/vit.safetensors"),
    ({"type": "timm", "model": "vit_tiny_patch16_2244"},
     r"^model.modalities.video.tower.model: unknown timm model 'vit_tiny_patch16_2244' \(did you mean: "
     r"vit_tiny_patch16_224"),
    ({"type": "foo"},
     # (test modules may register video tower types of their own after the built-in ones)
     r"^model.modalities.video.tower.type: 'foo' is not allowed \(allowed: 'tubelet', 'timm', 'hf'(, '\w+')*\)$"),
    ({**VIT, "temporal": "lstm"},
     r"^model.modalities.video.tower.temporal: 'lstm' is not allowed \(allowed: 'mean', 'transformer', 'divided'\)"),
    ({"type": "timm", "model": "test_resnet", "temporal": "divided"},
     r"^model.modalities.video.tower.temporal: divided needs a timm VisionTransformer .* test_resnet is a ResNet"),
    ({"type": "timm"}, r"^model.modalities.video.tower.model: required field is missing"),
    ({**VIT, "kwargs": {"num_classes": 3}}, r"^model.modalities.video.tower.kwargs.num_classes: set by mmcl"),
    ({**VIT, "kwargs": {**SMALL, "depthh": 3}},
     r"^model.modalities.video.tower.kwargs: timm cannot build test_vit with \{'depth': 2, 'dynamic_img_size': "
     r"False, 'depthh': 3\}: .*unexpected keyword argument 'depthh'"),
    ({"type": "hf", "path": "/nonexistent/videomae"},
     r"^model.modalities.video.tower.path: directory not found: /nonexistent/videomae"),
], ids=["missing-checkpoint", "unknown-model", "unknown-type", "unknown-temporal", "divided-on-a-cnn", "no-model",
        "reserved-kwarg", "bad-kwarg", "missing-hf-dir"])
def test_bad_tower_configs(video: dict[str, Any], pattern: str) -> None:
    message = error_of(video)
    assert re.search(pattern, message), message


def test_checkpoints_and_inputs_that_do_not_fit(ckpts: dict[str, Path], tmp_path: Path) -> None:
    vit3, narrow = str(ckpts["vit_depth3"]), str(ckpts["vit_narrow"])
    message = error_of({**VIT, "checkpoint": vit3})
    assert re.search(rf"^model.modalities.video.tower.checkpoint: checkpoint {re.escape(vit3)} does not fit "
                     r"VisionTransformer: "
                     r"\d+ unexpected keys \(blocks.2.attn.proj.bias, .* more\) \(set strict: false", message)
    loaded = build_tower(build_processor("video", {"frames": T, "size": S,
                                                   "tower": {**VIT, "checkpoint": vit3, "strict": False}}))
    state = load_file(vit3)
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    assert re.search(r"^model.modalities.video.tower.checkpoint: checkpoint .*vit_narrow.safetensors does not fit "
                     r"VisionTransformer: \d+ shape mismatches \(blocks.0.attn.proj.bias \(32,\) vs \(64,\)",
                     error_of({**VIT, "checkpoint": narrow, "strict": False}))
    assert re.search(r"^model.modalities.video.size: 48 \(48x48 px frames\) does not fit timm model test_vit built for "
                     r"img_size 32 \(Input height \(48\) doesn't match model \(32\)",
                     error_of({**VIT, "checkpoint": str(ckpts["vit"])}, size=48))
    with pytest.raises(ConfigError, match=r"^model.modalities.audio: a \[32 x 101\] log-mel \(n_mels x frames; "
                       r"frames = seconds \* sample_rate / hop \+ 1\) does not fit timm model test_vit \(Input width "
                       r"\(101\) should be divisible by patch size \(16\)\.\)$"):
        build_tower(build_processor("audio", {"n_mels": 32, "seconds": 1.0,
                                              "tower": {"type": "timm", "model": "test_vit"}}))
    videomae = re.escape(str(ckpts["videomae"]))
    assert re.search(rf"^model.modalities.video.frames: 8 does not fit {videomae} \(its model takes num_frames 4\)$",
                     error_of({"type": "hf", "path": str(ckpts["videomae"])}, frames=8))
    assert re.search(rf"^model.modalities.video.size: 64 does not fit {videomae} \(its image processor makes "
                     r"3x32x32 frames: set size: 32\)$", error_of({"type": "hf", "path": str(ckpts["videomae"])}, size=64))
    assert re.search(r"^model.modalities.video.tower.pooling: 'cls' needs a model with a CLS token, VideoMAEModel "
                     r"has none \(allowed here: 'mean'\)$",
                     error_of({"type": "hf", "path": str(ckpts["videomae"]), "pooling": "cls"}))
    bare = tmp_path / "videomae_without_processor"
    shutil.copytree(ckpts["videomae"], bare, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    assert re.search(rf"^model.modalities.video.tower.path: cannot load {re.escape(str(bare))} with "
                     r"AutoImageProcessor: Can't load image processor", error_of({"type": "hf", "path": str(bare)}))
