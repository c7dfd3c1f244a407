"""CLIP-family checkpoints as towers (``tower: {type: clip, path: ...}``, :mod:`mmcl.modalities.clip_family`).

Tiny random-weight CLIP, SigLIP and CLAP models built with transformers' own config classes and written with
``save_pretrained`` (with a tokenizer, an image processor or a feature extractor) are real checkpoints. Every
tower is checked against transformers' own ``get_image_features`` / ``get_text_features`` /
``get_audio_features`` / ``logits_per_image`` on the same inputs, then the controls (lock, bf16 training),
the self-contained save, and the one-line errors.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torchcodec.decoders import VideoDecoder
from transformers import (
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    Siglip2Config,
    Siglip2ImageProcessor,
    Siglip2Model,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)
from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

from mmcl.cli import main as mmcl_main
from mmcl.config import ConfigError, GramConfig, ModelConfig, SiglipConfig as MmclSiglipConfig, from_dict
from mmcl.model import MultimodalModel
from mmcl.modalities import build_processor, build_tower
from mmcl.modalities.pretrained import build_session

SIZE = 32
WORDS = "a red green blue circle square moves left right photo of dog cat the big".split()
CAPTIONS = ["a red circle", "the big blue square moves left", "photo of a cat", "dog"]
TOL = 1e-5


def clip_tokenizer(max_len: int = 16) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with a tiny vocabulary (no merges: words are spelled)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=40, bos_token_id=0, eos_token_id=1, pad_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
              patch_size=8)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip_family")
    tok = clip_tokenizer(max_len=40)
    text = {**TEXT, "vocab_size": len(tok)}
    torch.manual_seed(0)
    models = {
        "clip": (CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=24,
                                      logit_scale_init_value=2.5)),
                 CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})),
        "siglip": (SiglipModel(SiglipConfig(text_config={**text, "projection_size": 32}, vision_config=VISION)),
                   SiglipImageProcessor(size={"height": SIZE, "width": SIZE})),
        "siglip2": (Siglip2Model(Siglip2Config(
            text_config={**text, "projection_size": 32},
            vision_config={k: v for k, v in VISION.items() if k != "image_size"} | {"num_patches": 16})),
            Siglip2ImageProcessor(patch_size=8, max_num_patches=16)),
        "clap": (ClapModel(ClapConfig(
            text_config={**text, "projection_dim": 24},
            audio_config=dict(spec_size=64, window_size=4, num_mel_bins=32, patch_size=4, patch_stride=4,
                              depths=[1, 1], num_attention_heads=[2, 2], patch_embeds_hidden_size=16,
                              hidden_size=32, projection_dim=24, enable_fusion=False),
            projection_dim=24)),
            ClapFeatureExtractor(feature_size=32, sampling_rate=16000, hop_length=160, max_length_s=1,
                                 fft_window_size=400, frequency_max=8000, truncation="rand_trunc")),
    }
    # The synthetic world's 64 px frames, unresized (for the eval suite against a hand computation).
    models["clip64"] = (CLIPModel(CLIPConfig(text_config=text, vision_config={**VISION, "image_size": 64,
                                                                             "patch_size": 16},
                                             projection_dim=24)),
                        CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}))
    out = {}
    for name, (model, processor) in models.items():
        if name == "siglip":  # random scale and bias: give them checkpoint-like values to find again
            with torch.no_grad():
                model.logit_scale.fill_(2.0)
                model.logit_bias.fill_(-3.0)
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        if name != "siglip2":  # AutoTokenizer reads a SigLIP2 directory's tokenizer as Gemma's: tests name CLIP's
            tok.save_pretrained(root / name)
        out[name] = root / name
    full = CLIPModel.from_pretrained(out["clip"])
    full.config.vision_config.projection_dim = full.config.projection_dim
    vision = CLIPVisionModelWithProjection(full.config.vision_config)
    vision.load_state_dict({k: v for k, v in full.state_dict().items()
                            if k.startswith(("vision_model.", "visual_projection."))})
    vision.save_pretrained(root / "clip_vision")
    models["clip"][1].save_pretrained(root / "clip_vision")
    out["clip_vision"] = root / "clip_vision"
    return out


def video_spec(path: Path, frames: int = 1, **tower: Any) -> dict[str, Any]:
    return {"frames": frames, "size": SIZE, "tower": {"type": "clip", "path": str(path), **tower}}


def text_spec(path: Path, **extra: Any) -> dict[str, Any]:
    return {"max_len": 16, "tower": {"type": "clip", "path": str(path)}, **extra}


def audio_spec(path: Path) -> dict[str, Any]:
    return {"seconds": 1.0, "sample_rate": 16000, "tower": {"type": "clip", "path": str(path)}}


def clip_model(dirs: dict[str, Path], family: str = "clip", frames: int = 1, objective: Any = None,
               **model: Any) -> MultimodalModel:
    cfg = from_dict(ModelConfig, {"embed_dim": 24 if family != "siglip" else 32, "head": "identity",
                                  "logit_scale_init": "checkpoint",
                                  "modalities": {"video": video_spec(dirs[family], frames),
                                                 "text": text_spec(dirs[family])}, **model}, "model")
    return MultimodalModel(cfg, objective)


def frames(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


FAMILY_CLASS = {"clip": CLIPModel, "siglip": SiglipModel, "siglip2": Siglip2Model, "clap": ClapModel}
IMAGE_PROCESSOR = {"clip": CLIPImageProcessor, "clip_vision": CLIPImageProcessor, "siglip": SiglipImageProcessor,
                   "siglip2": Siglip2ImageProcessor}


@pytest.mark.parametrize("family", ["clip", "siglip", "siglip2", "clip_vision"])
def test_video_tower_per_frame_is_get_image_features(dirs: dict[str, Path], family: str) -> None:
    video = build_processor("video", video_spec(dirs[family], frames=3))
    tower = build_tower(video).eval()
    clip = torch.stack([video.transform(f, train=False) for f in frames(3)[:, None]]).view(1, 3, 3, SIZE, SIZE)
    pixels = clip[0]
    with torch.no_grad():
        ours = tower.frame_features(pixels)
        if family == "clip_vision":
            ref = CLIPVisionModelWithProjection.from_pretrained(dirs[family]).eval()(pixel_values=pixels).image_embeds
        elif family == "siglip2":  # NaFlex input: the processor's own patch layout, a 4 x 4 grid, no padding
            patches = torch.stack([convert_image_to_patches(f, 8) for f in pixels])
            ref = Siglip2Model.from_pretrained(dirs[family]).eval().get_image_features(
                pixel_values=patches, pixel_attention_mask=torch.ones(3, 16, dtype=torch.long),
                spatial_shapes=torch.tensor([[4, 4]] * 3)).pooler_output
        else:
            ref = FAMILY_CLASS[family].from_pretrained(dirs[family]).eval().get_image_features(
                pixel_values=pixels).pooler_output
        assert close(ours, ref) <= TOL
        assert close(tower(clip)[0], ref.mean(0)) <= TOL  # temporal: mean of the frames' embeddings
    # The frames are normalised with the directory's image processor mean / std.
    proc = IMAGE_PROCESSOR[family].from_pretrained(dirs[family])
    mean, std = torch.tensor(proc.image_mean).view(3, 1, 1), torch.tensor(proc.image_std).view(3, 1, 1)
    assert close(pixels[0], (frames(3)[0].float() / 255 - mean) / std) <= 1e-6


@pytest.mark.parametrize("family", ["clip", "siglip", "siglip2", "clap"])
def test_text_tower_is_get_text_features(dirs: dict[str, Path], family: str) -> None:
    text = build_processor("text", text_spec(dirs[family], **({"tokenizer": str(dirs["clip"])}
                                                              if family == "siglip2" else {})))
    tower = build_tower(text).eval()
    batch = torch.stack([text.transform(text.tokenize(c), train=False) for c in CAPTIONS])
    ref_model = FAMILY_CLASS[family].from_pretrained(dirs[family])
    tok = CLIPTokenizer.from_pretrained(dirs["clip"])
    enc = tok(CAPTIONS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(batch[:, 0], enc["input_ids"]) and torch.equal(batch[:, 1], enc["attention_mask"])
    kwargs = {} if family.startswith("siglip") else {"attention_mask": enc["attention_mask"]}  # SigLIP: no mask
    with torch.no_grad():
        ours = tower(batch)
        ref = ref_model.eval().get_text_features(input_ids=enc["input_ids"], **kwargs).pooler_output
    if family == "clap":  # CLAP's get_text_features returns the L2-normalised projection
        ours = F.normalize(ours, dim=-1)
    assert close(ours, ref) <= TOL


def test_clap_audio_tower_is_get_audio_features(dirs: dict[str, Path]) -> None:
    audio = build_processor("audio", audio_spec(dirs["clap"]))
    tower = build_tower(audio).eval()
    rng = np.random.default_rng(0)
    waves = [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) * 0.1 for n in (16000, 9000)]
    batch = torch.stack([audio.transform(audio.input.features(w), train=False) for w in waves])
    fe = ClapFeatureExtractor.from_pretrained(dirs["clap"])
    ref_in = fe([w.numpy() for w in waves], sampling_rate=16000, return_tensors="pt")
    assert close(batch, ref_in["input_features"]) == 0.0
    with torch.no_grad():
        ours = F.normalize(tower(batch), dim=-1)
        ref = ClapModel.from_pretrained(dirs["clap"]).eval().get_audio_features(**ref_in).pooler_output
    assert close(ours, ref) <= TOL
    # CLAP's audio model has no activation_checkpointing_enable; its stages are checkpointed all the same.
    tower.set_grad_checkpointing(True)
    assert len(tower.blocks()) == 2 and all(stage.gradient_checkpointing for stage in tower.blocks())
    tower.train()  # checkpointing acts in training mode
    tower(batch).sum().backward()
    assert all(p.grad is not None for p in tower.parameters())


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_untrained_model_reproduces_the_checkpoints_logits(dirs: dict[str, Path], family: str) -> None:
    """Identity heads and the checkpoint's logit scale (SigLIP: and bias): the model built from the config
    alone scores single-frame clips against captions as the source model does."""
    objective = MmclSiglipConfig() if family == "siglip" else None
    model = clip_model(dirs, family, objective=objective).eval()
    video, text = model.processors["video"], model.processors["text"]
    clips = torch.stack([video.transform(f[None], train=False) for f in frames(3, seed=1)])
    ids = torch.stack([text.transform(text.tokenize(c), train=False) for c in CAPTIONS])
    ref_model = (CLIPModel if family == "clip" else SiglipModel).from_pretrained(dirs[family]).eval()
    kwargs = {} if family == "siglip" else {"attention_mask": ids[:, 1]}
    with torch.no_grad():
        emb = model.encode({"video": clips, "text": ids})
        ours = model.objective.score({"video": emb["video"]}, {"text": emb["text"]})
        scale = model.objective.logit_scale.exp()
        logits = scale * emb["video"] @ emb["text"].T
        if family == "siglip":
            logits = logits + model.objective.logit_bias
        ref = ref_model(pixel_values=clips[:, 0], input_ids=ids[:, 0], **kwargs).logits_per_image
    assert close(logits, ref) <= TOL
    assert torch.equal(ours.argmax(1), ref.argmax(1))
    assert model.objective.logit_scale.item() == pytest.approx(ref_model.logit_scale.item())
    if family == "siglip":
        assert model.objective.logit_bias.item() == pytest.approx(-3.0)


def test_one_directory_feeding_two_towers_is_read_once(dirs: dict[str, Path], monkeypatch) -> None:
    import mmcl.modalities.clip_family as cf

    calls = []
    real = cf.load_hf_model
    monkeypatch.setattr(cf, "load_hf_model", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    model = clip_model(dirs)
    assert calls == [dirs["clip"]]
    names = list(model.state_dict())
    assert any(n.startswith("towers.video.encoder.") for n in names)
    assert any(n.startswith("towers.text.encoder.") for n in names)
    with build_session():  # two text towers of one directory: the second gets its own copy
        a, b = (build_tower(build_processor("text", text_spec(dirs["clip"]))) for _ in range(2))
    assert all(p is not q for p, q in zip(a.parameters(), b.parameters()))


COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan"]


def test_mmcl_eval_of_a_train_config_is_zero_shot_before_training(dirs: dict[str, Path], synthetic_data: Path,
                                                                   tmp_path: Path) -> None:
    """``mmcl eval --model config:FILE``: the model the config builds, before any step, evaluated; its
    zero-shot accuracy equals the source CLIP run by transformers on the same frames and prompts."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"batch_size": 16, "tasks": [
        {"name": "video->colour", "type": "zeroshot_classification", "query": ["video"], "label": "colour",
         "classnames": COLOURS, "templates": ["a {} shape"]}]}))
    test = str(synthetic_data / "test-{000000..000001}.tar")
    config = tmp_path / "clip_init.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"embed_dim": 24, "head": "identity", "logit_scale_init": "checkpoint",
                  "modalities": {"video": {**video_spec(dirs["clip64"]), "size": 64},
                                 "text": text_spec(dirs["clip64"])}},
        "eval": {"suite": str(suite)}}))
    out = tmp_path / "eval"
    assert mmcl_main(["eval", "--model", f"config:{config}", "--set", f"data.test={test}", "--out", str(out),
                      "--no-progress"]) == 0
    got = json.loads((out / "results.json").read_text())["zeroshot_classification"]["video->colour"]

    # By hand: the middle frame of each clip, CLIP's processor (no resize: 64 px already), CLIPModel.
    ref = CLIPModel.from_pretrained(dirs["clip64"]).eval()
    proc = CLIPImageProcessor.from_pretrained(dirs["clip64"], do_resize=False, do_center_crop=False)
    tok = CLIPTokenizer.from_pretrained(dirs["clip64"])
    images, labels = [], []
    for i in range(2):
        with tarfile.open(synthetic_data / f"test-00000{i}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name in sorted(n for n in members if n.endswith(".mp4")):
            dec = VideoDecoder(members[name])
            images.append(dec.get_frame_at(dec.metadata.num_frames // 2).data)
            labels.append(COLOURS.index(json.loads(members[name[:-3] + "json"])["labels"]["colour"]))
    enc = tok([f"a {c} shape" for c in COLOURS], padding="max_length", truncation=True, max_length=16,
              return_tensors="pt")
    with torch.no_grad():
        img = F.normalize(ref.get_image_features(**proc(images, return_tensors="pt")).pooler_output, dim=-1)
        txt = F.normalize(ref.get_text_features(**enc).pooler_output, dim=-1)
    pred = (ref.logit_scale.exp() * img @ txt.T).argmax(1)
    truth = torch.tensor(labels)
    assert got["n"] == len(labels) == 32
    assert got["acc1"] == pytest.approx((pred == truth).float().mean().item())
    recalls = [(pred[truth == c] == c).float().mean().item() for c in range(6) if (truth == c).any()]
    assert got["mean_per_class_recall"] == pytest.approx(sum(recalls) / len(recalls))


def inputs_of(model: MultimodalModel, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    video, text = model.processors["video"], model.processors["text"]
    t = video.cfg.frames
    clips = torch.stack([video.transform(frames(t, seed=seed + i), train=False) for i in range(n)])
    ids = torch.stack([text.transform(text.tokenize(CAPTIONS[i % len(CAPTIONS)]), train=False) for i in range(n)])
    return {"video": clips, "text": ids}


@pytest.mark.parametrize("temporal", ["transformer", "divided"])
def test_controls_lock_unlock_lr_checkpointing_under_bf16(dirs: dict[str, Path], temporal: str) -> None:
    """Text locked (LiT), the vision tower locked but its last block, its own lr and gradient checkpointing:
    two AdamW steps under CPU bf16 autocast move exactly the unlocked parts; the untrained divided tower is
    the mean of the frames' embeddings (its time attention starts as the identity)."""
    from mmcl.config import load_config
    from mmcl.train.optim import apply_tower_controls, build_optimizer

    model = clip_model(dirs, frames=2, modalities={"video": video_spec(dirs["clip"], 2, temporal=temporal),
                                                   "text": text_spec(dirs["clip"])})
    x = inputs_of(model)
    if temporal == "divided":
        plain = clip_model(dirs, frames=2).eval()
        with torch.no_grad():
            assert close(model.eval().towers["video"](x["video"]), plain.towers["video"](x["video"])) <= TOL
    cfg = load_config(base={"train": {"lr": 1e-3, "towers": {
        "text": {"lock": True},
        "video": {"lock": True, "unlocked_blocks": 1, "lr": 1e-2, "grad_checkpointing": True}}}})
    lrs = apply_tower_controls(model, cfg.train.towers)
    assert lrs == {"towers.video": 1e-2}
    assert all(layer.space.gradient_checkpointing if temporal == "divided" else layer.gradient_checkpointing
               for layer in model.towers["video"].encoder.encoder.layers)
    opt = build_optimizer(model, cfg, lrs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.objective(model(x))
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    blocks = model.towers["video"].blocks()
    last = {f"towers.video.{n}" for n, p in model.towers["video"].named_parameters()
            if any(p is q for q in blocks[-1].parameters())}
    first_vision = {k for k in after if k.startswith("towers.video.encoder.") and k not in last}
    for k in after:
        if k.startswith("towers.text.") or k in first_vision:
            assert torch.equal(after[k], before[k]), k
    assert last and all(not torch.equal(after[k], before[k]) for k in last)
    assert not torch.equal(after["heads.text.weight"], before["heads.text.weight"])
    if temporal == "transformer":
        assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("towers.video.temporal_module."))


def test_save_pretrained_round_trip_without_the_source_directories(dirs: dict[str, Path], tmp_path: Path) -> None:
    """Video and text of one CLIP, audio from CLAP: the saved directory holds every weight in safetensors and
    copies the configs, tokenizers, image processor and feature extractor (no source weights); it loads
    with the sources gone and gives the same embeddings."""
    src = tmp_path / "src"
    shutil.copytree(dirs["clip"], src / "clip")
    shutil.copytree(dirs["clap"], src / "clap")
    cfg = from_dict(ModelConfig, {"embed_dim": 24, "head": "identity", "heads": {"audio": "linear"},
                                  "logit_scale_init": "checkpoint", "modalities": {
                                      "video": video_spec(src / "clip", 2, temporal="divided"),
                                      "text": text_spec(src / "clip"), "audio": audio_spec(src / "clap")}}, "model")
    model = MultimodalModel(cfg).eval()
    x = inputs_of(model, n=2)
    audio = model.processors["audio"]
    x["audio"] = torch.stack([audio.transform(audio.input.features(torch.randn(12000) * 0.1), train=False)
                              for _ in range(2)])
    with torch.no_grad():
        ref = model.encode(x)
    # Processors travel to loader workers pickled (tokenizers and extractors are read again there).
    restored = pickle.loads(pickle.dumps(model.processors))
    assert torch.equal(restored["text"].transform(restored["text"].tokenize(CAPTIONS[1]), train=False), x["text"][1])
    saved = model.save_pretrained(tmp_path / "saved")
    shutil.rmtree(src)
    names = sorted(p.name for p in saved.rglob("*") if p.is_file())
    assert not [n for n in names if n.endswith((".bin", ".pt")) or (n.endswith(".safetensors") and
                                                                    n != "model.safetensors")]
    assert "preprocessor_config.json" in names and "tokenizer.json" in names
    loaded = MultimodalModel.from_pretrained(saved).eval()
    with torch.no_grad():
        got = loaded.encode(x)
    for m in ref:
        assert torch.equal(got[m], ref[m]), m
    assert loaded.objective.logit_scale.item() == pytest.approx(2.5)


def error_of(spec: dict[str, Any], modality: str = "video") -> str:
    with pytest.raises(ConfigError) as e:
        build_tower(build_processor(modality, spec))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_inputs_are_one_line_each(dirs: dict[str, Path], tmp_path: Path) -> None:
    # A directory that is not a CLIP-family model for the requested type.
    msg = error_of(video_spec(dirs["clap"]))
    assert "is a 'clap' model, not a CLIP-family model with a tower for video" in msg and "clip_vision_model" in msg
    bert = tmp_path / "bert"
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(bert)
    assert "is a 'bert' model, not a CLIP-family model with a tower for text" in error_of(text_spec(bert), "text")
    assert "(allowed model types: clap, clap_audio_model)" in error_of(audio_spec(dirs["clip"]), "audio")
    # A vision config whose image size does not fit video.size.
    msg = error_of({**video_spec(dirs["clip"]), "size": 48})
    assert msg.startswith("model.modalities.video.size: 48 does not fit") and "image_size 32" in msg
    # A tokenizer whose max length is below text.max_len.
    short = tmp_path / "short_tok"
    clip_tokenizer(max_len=8).save_pretrained(short)
    msg = error_of(text_spec(dirs["clip"], tokenizer=str(short)), "text")
    assert "max_len: 16 exceeds the tokenizer's model_max_length 8" in msg
    # Identity heads need the tower's width; the checkpoint's logit scale needs two towers of one checkpoint.
    with pytest.raises(ConfigError, match=r"^model.head: identity needs the video tower's width 24 to equal "
                                          r"model.embed_dim 16"):
        clip_model(dirs, embed_dim=16)
    with pytest.raises(ConfigError, match=r"^model.logit_scale_init: 'checkpoint' needs identity-headed towers"):
        clip_model(dirs, heads={"text": "linear"})
    with pytest.raises(ConfigError, match=r"^model.logit_scale_init: 'checkpoint' needs an objective with a logit "
                                          r"scale \(clip, siglip, symile\), not 'gram'$"):
        clip_model(dirs, objective=GramConfig())
    with pytest.raises(ConfigError, match=r"^model.heads.audio: no such modality \(allowed: video, text\)$"):
        clip_model(dirs, heads={"audio": "linear"})


# ----------------------------------------------------------------------------------------------------
# open_clip checkpoints


def to_open_clip(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel`` state dict in open_clip's (OpenAI's) layout, as open_clip saves it."""
    out = {"logit_scale": state["logit_scale"]}
    for side, src, dst in (("vision", "vision_model.", "visual."), ("text", "text_model.", "")):
        for i in range(layers):
            a, b = f"{src}encoder.layers.{i}.", f"{dst}transformer.resblocks.{i}."
            for p in ("weight", "bias"):
                out[f"{b}attn.in_proj_{p}"] = torch.cat([state[f"{a}self_attn.{n}_proj.{p}"] for n in "qkv"])
                for x, y in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    out[f"{b}{y}.{p}"] = state[f"{a}{x}.{p}"]
    out["visual.class_embedding"] = state["vision_model.embeddings.class_embedding"]
    out["visual.conv1.weight"] = state["vision_model.embeddings.patch_embedding.weight"]
    out["visual.positional_embedding"] = state["vision_model.embeddings.position_embedding.weight"]
    for p in ("weight", "bias"):
        out[f"visual.ln_pre.{p}"] = state[f"vision_model.pre_layrnorm.{p}"]
        out[f"visual.ln_post.{p}"] = state[f"vision_model.post_layernorm.{p}"]
        out[f"ln_final.{p}"] = state[f"text_model.final_layer_norm.{p}"]
    out["visual.proj"] = state["visual_projection.weight"].T
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["text_projection"] = state["text_projection.weight"].T
    return out


@pytest.fixture(scope="module")
def open_clip_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A transformers CLIP directory with CLIP's token order (end-of-text the highest id) and the same weights
    as an open_clip state dict + model config JSON (OpenAI normalisation, QuickGELU)."""
    root = tmp_path_factory.mktemp("open_clip")
    vocab: dict[str, int] = {}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=40)
    n = len(vocab)
    torch.manual_seed(1)
    model = CLIPModel(CLIPConfig(text_config={**TEXT, "vocab_size": n, "bos_token_id": n - 2, "eos_token_id": n - 1,
                                              "pad_token_id": n - 1},
                                 vision_config=VISION, projection_dim=24, logit_scale_init_value=2.5))
    model.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    tok.save_pretrained(root / "tokenizer")
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(
        root / "hf")
    torch.save(to_open_clip(model.state_dict(), 2), root / "open_clip.pt")
    (root / "config.json").write_text(json.dumps({
        "embed_dim": 24, "quick_gelu": True,
        "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8,
                       "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 40, "vocab_size": n, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0}}))
    return {"hf": root / "hf", "ckpt": root / "open_clip.pt", "config": root / "config.json",
            "tokenizer": root / "tokenizer"}


def open_clip_model(pair: dict[str, Path], **video: Any) -> MultimodalModel:
    oc = {"type": "clip", "open_clip": str(pair["ckpt"]), "open_clip_config": str(pair["config"])}
    cfg = from_dict(ModelConfig, {"embed_dim": 24, "head": "identity", "logit_scale_init": "checkpoint", "modalities": {
        "video": {"frames": 2, "size": SIZE, "tower": {**oc, **video}},
        "text": {"max_len": 16, "tokenizer": str(pair["tokenizer"]), "tower": oc}}}, "model")
    return MultimodalModel(cfg).eval()


def test_open_clip_state_dict_and_transformers_directory_give_the_same_embeddings(
        open_clip_pair: dict[str, Path], tmp_path: Path) -> None:
    ours = open_clip_model(open_clip_pair)
    hf = MultimodalModel(from_dict(ModelConfig, {"embed_dim": 24, "head": "identity", "modalities": {
        "video": video_spec(open_clip_pair["hf"], 2), "text": text_spec(open_clip_pair["hf"])}}, "model")).eval()
    x = inputs_of(hf)
    assert torch.equal(inputs_of(ours)["video"], x["video"]) and torch.equal(inputs_of(ours)["text"], x["text"])
    with torch.no_grad():
        a, b = ours.encode(x), hf.encode(x)
        assert close(ours.towers["video"].frame_features(x["video"][0]),
                     hf.towers["video"].frame_features(x["video"][0])) <= TOL
    for m in ("video", "text"):
        assert close(a[m], b[m]) <= TOL, m
    assert ours.objective.logit_scale.item() == pytest.approx(2.5)
    # Divided space-time attention in the timm ViT starts as the identity; the controls reach its blocks.
    divided = open_clip_model(open_clip_pair, temporal="divided")
    with torch.no_grad():
        assert close(divided.encode({"video": x["video"]})["video"], a["video"]) <= TOL
    blocks = divided.towers["video"].blocks()
    assert len(blocks) == 2 and all(hasattr(blk, "time") for blk in blocks)
    divided.towers["video"].set_grad_checkpointing(True)
    assert divided.towers["video"].encoder.grad_checkpointing
    # Saved and loaded without the checkpoint: the config JSON and the tokenizer are copied.
    saved = ours.save_pretrained(tmp_path / "saved")
    moved = tmp_path / "moved"
    shutil.move(str(open_clip_pair["ckpt"]), moved)
    try:
        loaded = MultimodalModel.from_pretrained(saved).eval()
        with torch.no_grad():
            assert all(torch.equal(loaded.encode(x)[m], a[m]) for m in a)
    finally:
        shutil.move(str(moved), open_clip_pair["ckpt"])


def test_open_clip_mismatch_lists_missing_and_unexpected_keys(open_clip_pair: dict[str, Path], tmp_path: Path) -> None:
    state = torch.load(open_clip_pair["ckpt"], weights_only=True)
    state.pop("visual.ln_post.weight")
    state.pop("transformer.resblocks.1.ln_2.bias")
    state["visual.extra.weight"] = torch.zeros(1)
    state["transformer.resblocks.2.ln_1.weight"] = torch.zeros(32)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    oc = {"type": "clip", "open_clip": str(bad), "open_clip_config": str(open_clip_pair["config"])}
    msg = error_of({"frames": 1, "size": SIZE, "tower": oc})
    assert msg.startswith("model.modalities.video.tower.open_clip: checkpoint") and "\n" not in msg
    assert "1 missing keys (norm.weight)" in msg and "1 unexpected keys (visual.extra.weight)" in msg
    msg = error_of({"max_len": 16, "tokenizer": str(open_clip_pair["tokenizer"]), "tower": oc}, "text")
    assert "1 missing keys (encoder.encoder.layers.1.layer_norm2.bias)" in msg
    assert "1 unexpected keys (transformer.resblocks.2.ln_1.weight)" in msg


@pytest.mark.parametrize("recipe", ["clip_init", "clip_init_gram"])
def test_recipes_build_with_their_checkpoints_set_on_the_command_line(dirs: dict[str, Path], recipe: str) -> None:
    """configs/train/clip_init*.yaml with the paths (and this test's tiny sizes) as --set overrides: video and
    text from one CLIP in its joint space, audio from CLAP behind a linear head, text locked."""
    from mmcl.config import load_config
    from mmcl.model import untrained_model
    from mmcl.train.optim import apply_tower_controls

    m = "model.modalities"
    cfg = load_config(recipe, [f"{m}.video.tower.path={dirs['clip']}", f"{m}.text.tower.path={dirs['clip']}",
                               f"{m}.audio.tower.path={dirs['clap']}", "model.embed_dim=24", f"{m}.video.size={SIZE}",
                               f"{m}.video.frames=2", f"{m}.text.max_len=16", f"{m}.audio.sample_rate=16000",
                               f"{m}.audio.seconds=1.0"])
    model = untrained_model(cfg)
    apply_tower_controls(model, cfg.train.towers)
    assert not any(p.requires_grad for p in model.towers["text"].parameters())
    assert torch.equal(model.heads["video"].weight, torch.eye(24))
    assert not torch.equal(model.heads["audio"].weight, torch.eye(24))
    if recipe == "clip_init":
        assert model.objective.logit_scale.item() == pytest.approx(2.5)
    else:
        assert cfg.objective.name == "gram"


def test_temporal_heads_must_divide_the_width(dirs: dict[str, Path]) -> None:
    msg = error_of(video_spec(dirs["clip"], 2, temporal="transformer", temporal_heads=5))
    assert msg == "model.modalities.video.tower.temporal_heads: 5 does not divide the embedding width 24"


def test_mmcl_train_from_clip_and_clap_keeps_the_locked_text_tower(dirs: dict[str, Path], synthetic_data: Path,
                                                                    tmp_path: Path) -> None:
    """Three steps of the trainer on the synthetic world's mp4 / flac / txt shards (one loader worker): video and
    text from one CLIP, audio from CLAP, text locked, anchor text. The locked text
    tower is still the checkpoint's, bit for bit; the video tower and the heads moved."""
    from safetensors.torch import load_file

    from mmcl.config import load_config
    from mmcl.train.loop import train

    cfg = load_config(base={
        "model": {"embed_dim": 24, "head": "identity", "heads": {"audio": "linear"}, "logit_scale_init": "checkpoint",
                  "modalities": {"video": {**video_spec(dirs["clip64"], 2), "size": 64},
                                 "text": text_spec(dirs["clip64"]), "audio": audio_spec(dirs["clap"])}},
        "objective": {"name": "clip", "mode": "anchor", "anchor": "text"},
        "data": {"train": str(synthetic_data / "train-{000000..000001}.tar"), "batch_size": 8, "workers": 1,
                 "shuffle_buffer": 0},
        "train": {"steps": 3, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "progress": False, "threads": 1,
                  "towers": {"text": {"lock": True}, "video": {"lr": 1e-4}}}})
    train(cfg, tmp_path / "run")
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    source = CLIPModel.from_pretrained(dirs["clip64"]).state_dict()
    text_keys = [k for k in final if k.startswith("towers.text.")]
    assert text_keys
    for k in text_keys:
        name = k.removeprefix("towers.text.").replace("encoder.", "text_model.", 1).replace("projection.",
                                                                                           "text_projection.", 1)
        assert torch.equal(final[k], source[name]), k
    vision = [k for k in final if k.startswith("towers.video.encoder.") and k.endswith("weight")]
    assert any(not torch.equal(final[k], source[k.replace("towers.video.encoder.", "vision_model.", 1)])
               for k in vision)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][-1] == 3


def test_mmcl_eval_errors_are_one_line(tmp_path: Path, capsys) -> None:
    for args, expected in [(["--model", "config:missing.yaml"], "config file not found: missing.yaml"),
                           (["--model", str(tmp_path), "--set", "train.lr=1"], "--set: only with a train config"),
                           (["--model", str(tmp_path)], "--suite: required")]:
        assert mmcl_main(["eval", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mmcl eval: error:") and expected in err and "\n" not in err, err
