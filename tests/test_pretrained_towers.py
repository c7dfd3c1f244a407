"""Text and audio towers from local transformers directories (``tower: {type: hf, path: ...}``).

Tiny random-weight models built with transformers' own config classes and written with ``save_pretrained``
(with their tokenizer / feature extractor) are real checkpoints: each is loaded through an mmcl config, and
the modality's inputs and the tower's output are checked against the tokenizer, the feature extractor and the
model called directly. Then: a synthesised clip through decode -> transform -> collate -> tower, the
self-contained ``save_pretrained`` directory, and the one-line errors for bad configs and checkpoints.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    ASTConfig,
    ASTFeatureExtractor,
    ASTModel,
    AutoModel,
    BertConfig,
    BertForPreTraining,
    BertModel,
    BertTokenizer,
    GPT2Config,
    GPT2Model,
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from data_tools.check import validate_shards
from mmcl.config import ClipConfig, ConfigError, ModelConfig, from_dict
from mmcl.data.synthetic import encode_flac, generate_sample
from mmcl.hub import model_files
from mmcl.model import MultimodalModel
from mmcl.modalities import build_processor, build_tower
from mmcl.modalities.audio import HFAudioTower
from mmcl.train.optim import apply_tower_controls

SR = 16000
WORDS = "a an the red green blue small big circle square triangle moves left right up down slowly quickly while " \
        "low high flute organ note plays".split()
CAPTIONS = ["a red circle", "the big blue square moves left slowly while a low flute note plays",
            "green triangle moves up", "a"]


def bert_tokenizer(extra: int = 0) -> BertTokenizer:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + WORDS + [f"w{i}" for i in range(extra)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def save_bert(path: Path, vocab_size: int, **config: Any) -> Path:
    """A tiny BERT (with its pooler, as checkpoints have it) and the word-level tokenizer above."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=40, type_vocab_size=2)
    BertModel(BertConfig(**{**cfg, **config})).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    tok = bert_tokenizer()
    out = {"bert": save_bert(root / "bert", len(tok))}
    tok.save_pretrained(root / "bert")
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=40)).save_pretrained(
        root / "gpt2")
    out["gpt2"] = root / "gpt2"
    # 1 s of audio: AST with 100 frames of 32 mel bins, Whisper with 100 frames (50 positions) of 16 bins.
    whisper = dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                   encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_target_positions=16, vocab_size=64,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    # Whisper with a 2 s chunk (100 positions) whose position table is not the sinusoids a fresh model gets.
    whisper2 = WhisperModel(WhisperConfig(**whisper, max_source_positions=100))
    with torch.no_grad():
        whisper2.encoder.embed_positions.weight.normal_()
    models = {
        "ast": (ASTModel(ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   num_mel_bins=32, max_length=100, frequency_stride=10, time_stride=10)),
                ASTFeatureExtractor(num_mel_bins=32, max_length=100)),
        "whisper": (WhisperModel(WhisperConfig(**whisper, max_source_positions=50)),
                    WhisperFeatureExtractor(feature_size=16, chunk_length=1)),
        "whisper2": (whisper2, WhisperFeatureExtractor(feature_size=16, chunk_length=2)),
        # wav2vec2 "large" style: layer-norm feature encoder, the extractor returns an attention mask.
        "wav2vec2": (Wav2Vec2Model(Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
            conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
            feat_extract_norm="layer", do_stable_layer_norm=True)),
            Wav2Vec2FeatureExtractor(return_attention_mask=True)),
        # HuBERT "base" style: group-norm feature encoder, no mask (zero padding).
        "hubert": (HubertModel(HubertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
            conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)),
            Wav2Vec2FeatureExtractor(return_attention_mask=False)),
    }
    for name, (model, extractor) in models.items():
        model.save_pretrained(root / name)
        extractor.save_pretrained(root / name)
        out[name] = root / name
    return out


def text_spec(path: Path, **tower: Any) -> dict[str, Any]:
    return {"max_len": 24, "tower": {"type": "hf", "path": str(path), **tower}}


def audio_spec(path: Path, **tower: Any) -> dict[str, Any]:
    return {"seconds": 1.0, "tower": {"type": "hf", "path": str(path), **tower}}


def reference_pool(hidden: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """Pooling written out per sample: the first token, the mean of the first ``length`` tokens, or the last."""
    rows = []
    for h, n in zip(hidden, lengths.tolist()):
        rows.append({"cls": h[0], "mean": h[:n].mean(0), "last": h[n - 1]}[how])
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------
# Text


@pytest.mark.parametrize("model, pooling", [("bert", "mean"), ("bert", "cls"), ("bert", "last"), ("gpt2", "last")])
def test_text_tower_equals_transformers(dirs: dict[str, Path], model: str, pooling: str) -> None:
    """The collate carries the tokenizer's ids, attention mask and token type ids (right-padded to max_len);
    the tower's output is the model's hidden states pooled as configured. The GPT-2 model takes its
    tokenizer from another directory (``tokenizer:``)."""
    spec = text_spec(dirs[model], pooling=pooling)
    if model == "gpt2":
        spec["tokenizer"] = str(dirs["bert"])
    text = pickle.loads(pickle.dumps(build_processor("text", spec)))  # as a loader worker gets it
    assert text.tokenizer._tok is None
    x = text.collate([text.transform(text.decode({"txt": c.encode()}), train=False) for c in CAPTIONS])
    tok = BertTokenizer.from_pretrained(str(dirs["bert"]))
    enc = tok(CAPTIONS, padding="max_length", max_length=24, return_tensors="pt")
    assert text.tokenizer.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert torch.equal(x, torch.stack([enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]], dim=1))

    tower = build_tower(text).eval()
    reference = AutoModel.from_pretrained(str(dirs[model])).eval()
    short = tok(CAPTIONS, padding=True, return_tensors="pt")  # padding only to the longest: same states
    with torch.no_grad():
        got = tower(x)
        hidden = reference(**short).last_hidden_state
    want = reference_pool(hidden, short["attention_mask"].sum(1), pooling)
    assert got.shape == (len(CAPTIONS), 32) and tower.out_dim == 32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_text_tower_blocks_lock_and_grad_checkpointing(dirs: dict[str, Path]) -> None:
    """The tower's blocks are the model's layers: locking all but the last leaves only it trainable, and
    gradient checkpointing gives the same output and gradients."""
    torch.manual_seed(0)
    model = MultimodalModel(from_dict(ModelConfig, {"embed_dim": 8, "modalities": {
        "text": text_spec(dirs["bert"]), "audio": audio_spec(dirs["hubert"])}}, "model"))
    tower = model.towers["text"]
    assert tower.blocks() == list(tower.model.encoder.layer)
    assert model.towers["audio"].blocks() == list(model.towers["audio"].model.encoder.layers)
    assert tower.model.pooler is None  # unused by the pooling: it would get no gradient
    apply_tower_controls(model, {"text": {"lock": True, "unlocked_blocks": 1}})
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in tower.named_parameters() if n.startswith("model.encoder.layer.1.")}

    text = model.processors["text"]
    x = text.collate([text.transform(text.tokenize(c), train=False) for c in CAPTIONS])
    tower.train()

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(1)  # the same dropout masks
        tower.zero_grad()
        out = tower(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in tower.parameters() if p.requires_grad]

    plain = run()
    tower.set_grad_checkpointing(True)
    assert all(layer.gradient_checkpointing for layer in tower.blocks())
    ckpt = run()
    torch.testing.assert_close(ckpt[0], plain[0])
    for a, b in zip(ckpt[1], plain[1], strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------------
# Audio


def clips() -> list[np.ndarray]:
    """Two clips within the 1 s window: one full, one short (padded by the extractor)."""
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(SR)).astype(np.float32),
            (0.1 * rng.standard_normal(int(0.6 * SR))).astype(np.float32)]


def extractor_inputs(name: str, path: Path, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The feature extractor called directly on a batch: waveform extractors padded to the 1 s window."""
    extractor = {"ast": ASTFeatureExtractor, "whisper": WhisperFeatureExtractor}.get(name, Wav2Vec2FeatureExtractor)
    fe = extractor.from_pretrained(str(path))
    pad = {"padding": "max_length", "max_length": SR, "truncation": True} if name in ("wav2vec2", "hubert") else {}
    return dict(fe(waves, sampling_rate=SR, return_tensors="pt", **pad))


def real_frames(name: str, config: Any, lengths: list[int], hop: int = 160) -> torch.Tensor:
    """Encoder frames that cover ``lengths`` samples of real audio, by hand: Whisper's mel frames (one per
    ``hop`` started) halved by its stride-2 convolution, rounded up; wav2vec2 / HuBERT's samples through each
    convolution (``(n - kernel) // stride + 1``)."""
    frames = torch.tensor(lengths)
    if name.startswith("whisper"):
        return -(-(-(-frames // hop)) // 2)
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        frames = (frames - kernel) // stride + 1
    return frames


def direct_embeddings(name: str, path: Path, inputs: dict[str, torch.Tensor], lengths: list[int],
                      pooling: str = "mean", encoder: Any = None) -> torch.Tensor:
    """The transformers model run directly (``encoder``: this one instead of the directory's), pooled by
    hand: over all AST tokens, or over the output frames of real audio (:func:`real_frames`). The model gets
    the extractor's attention mask where wav2vec2's makes one (Whisper's and HuBERT's get none)."""
    model = AutoModel.from_pretrained(str(path)).eval()
    if encoder is None:
        encoder = model.get_encoder() if name.startswith("whisper") else model
    model_inputs = {k: v for k, v in inputs.items() if k != "attention_mask" or name == "wav2vec2"}
    with torch.no_grad():
        hidden = encoder(**model_inputs).last_hidden_state
    frames = torch.full((len(lengths),), hidden.shape[1]) if name == "ast" else \
        real_frames(name, model.config, lengths)
    return reference_pool(hidden, frames, pooling)


@pytest.mark.parametrize("name", ["ast", "whisper", "wav2vec2", "hubert"])
def test_audio_tower_equals_transformers(dirs: dict[str, Path], name: str) -> None:
    """transform + collate produce exactly the feature extractor's batch with the mask of real audio; the
    tower's output is the model's (the encoder's, for Whisper) ``last_hidden_state`` averaged over the
    positions that cover the real audio of each clip (a full one and a padded 0.6 s one), counted by hand."""
    audio = build_processor("audio", audio_spec(dirs[name]))
    waves = clips()
    x = audio.collate([audio.transform(torch.from_numpy(w), train=False) for w in waves])
    inputs = extractor_inputs(name, dirs[name], waves)
    if name == "whisper":
        mask = WhisperFeatureExtractor.from_pretrained(str(dirs[name]))(
            waves, sampling_rate=SR, return_tensors="pt", return_attention_mask=True)["attention_mask"]
        assert mask.sum(1).tolist() == [100, 60]
        assert torch.equal(x, torch.cat([inputs["input_features"], mask[:, None].float()], dim=1))
    elif name in ("wav2vec2", "hubert"):
        real = torch.stack([torch.arange(SR) < len(w) for w in waves]).float()
        assert torch.equal(x, torch.stack([inputs["input_values"], real], dim=1))
        if name == "wav2vec2":
            assert torch.equal(inputs["attention_mask"].float(), real)
    else:
        assert torch.equal(x, inputs["input_values"])

    tower = build_tower(audio).eval()
    assert isinstance(tower, HFAudioTower) and len(tower.blocks()) == 2
    with torch.no_grad():
        got = tower(x)
    want = direct_embeddings(name, dirs[name], inputs, [len(w) for w in waves])
    assert got.shape == (2, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_whisper_fits_the_window(dirs: dict[str, Path], tmp_path: Path) -> None:
    """A 1 s window on a Whisper checkpoint with a 2 s chunk: by default (``chunk: window``) the encoder keeps
    the checkpoint's first 50 of 100 positions exactly and runs on 100 mel frames (50 positions); it equals
    transformers' own encoder loaded with ``max_source_positions: 50`` and the checkpoint's first positions,
    pooled over the real audio; and a save_pretrained round trip keeps it. ``chunk: full`` is the 2 s chunk."""
    path = dirs["whisper2"]
    table = load_file(str(path / "model.safetensors"))["encoder.embed_positions.weight"]
    assert table.shape == (100, 32)
    torch.manual_seed(0)
    model = MultimodalModel(from_dict(ModelConfig, {"embed_dim": 8, "modalities": {
        "audio": audio_spec(path), "full": {"kind": "audio", **audio_spec(path, chunk="full")}}}, "model"),
        ClipConfig()).eval()
    audio, tower = model.processors["audio"], model.towers["audio"]
    assert torch.equal(tower.model.embed_positions.weight, table[:50])
    waves = clips()
    x = audio.collate([audio.transform(torch.from_numpy(w), train=False) for w in waves])
    assert x.shape == (2, 17, 100) and x[:, -1].sum(1).tolist() == [100, 60]
    with torch.no_grad():
        hidden = tower.model(input_features=x[:, :-1]).last_hidden_state
        got = tower(x)
    assert hidden.shape == (2, 50, 32)

    fe = WhisperFeatureExtractor.from_pretrained(str(path))
    inputs = dict(fe(waves, sampling_rate=SR, return_tensors="pt", max_length=SR))
    assert torch.equal(x[:, :-1], inputs["input_features"])
    reference = WhisperModel.from_pretrained(str(path), max_source_positions=50, ignore_mismatched_sizes=True)
    encoder = reference.get_encoder().eval()
    with torch.no_grad():
        encoder.embed_positions.weight.copy_(table[:50])
    want = direct_embeddings("whisper2", path, inputs, [len(w) for w in waves], encoder=encoder)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    full, full_tower = model.processors["full"], model.towers["full"]
    xf = full.collate([full.transform(torch.from_numpy(w), train=False) for w in waves])
    assert xf.shape == (2, 17, 200) and xf[:, -1].sum(1).tolist() == [100, 60]
    assert torch.equal(full_tower.model.embed_positions.weight, table)
    with torch.no_grad():
        got_full = full_tower(xf)
    inputs = dict(fe(waves, sampling_rate=SR, return_tensors="pt"))
    want_full = direct_embeddings("whisper2", path, inputs, [len(w) for w in waves])
    torch.testing.assert_close(got_full, want_full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got_full, got, atol=1e-3)  # the 2 s encoder attends over the padding too

    with torch.no_grad():
        before = model.encode({"audio": x, "full": xf})
    loaded = MultimodalModel.from_pretrained(model.save_pretrained(tmp_path / "saved")).eval()
    for name, batch in (("audio", x), ("full", xf)):
        processor = loaded.processors[name]
        assert torch.equal(processor.collate([processor.transform(torch.from_numpy(w), train=False) for w in waves]),
                           batch)
    with torch.no_grad():
        after = loaded.encode({"audio": x, "full": xf})
    assert all(torch.equal(after[m], before[m]) for m in before)


def test_ast_cls_pooling(dirs: dict[str, Path]) -> None:
    audio = build_processor("audio", audio_spec(dirs["ast"], pooling="cls"))
    waves = clips()
    x = audio.collate([audio.transform(torch.from_numpy(w), train=False) for w in waves])
    with torch.no_grad():
        got = build_tower(audio).eval()(x)
    want = direct_embeddings("ast", dirs["ast"], extractor_inputs("ast", dirs["ast"], waves), [SR] * 2, "cls")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["ast", "wav2vec2", "hubert"])
def test_synthesised_clip_through_the_pipeline(dirs: dict[str, Path], name: str) -> None:
    """A synthetic world clip (2 s, FLAC in a sample dict) through decode -> transform -> collate -> tower
    equals the extractor and model on the centred 1 s window of the original float audio (FLAC keeps 16
    bits)."""
    # As a loader worker gets it: pickled without the feature extractor, which it reads again lazily.
    audio = pickle.loads(pickle.dumps(build_processor("audio", audio_spec(dirs[name]))))
    assert audio.input._fe is None
    wave = generate_sample(3)["audio"]
    decoded = audio.decode({"flac": encode_flac(wave, SR)})
    assert decoded.shape == (2 * SR,)
    assert float((decoded - torch.from_numpy(wave)).abs().max()) <= 1 / 2 ** 15
    x = audio.collate([audio.transform(decoded, train=False)])
    window = wave[SR // 2: SR // 2 + SR]
    with torch.no_grad():
        got = build_tower(audio).eval()(x)
    want = direct_embeddings(name, dirs[name], extractor_inputs(name, dirs[name], [window]), [SR])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    # Training draws a random window: another part of the clip, still the extractor's format.
    torch.manual_seed(0)
    assert audio.transform(decoded, train=True).shape == x.shape[1:]


def test_shards_validate_with_transformers_towers(dirs: dict[str, Path], synthetic_data: Path,
                                                 tmp_path: Path) -> None:
    """``mmcl shards validate --model`` decodes with the model's own tokenizer and feature extractor."""
    model = tmp_path / "model.yaml"
    model.write_text(json.dumps({"modalities": {"text": text_spec(dirs["bert"]), "audio": audio_spec(dirs["ast"])}}))
    result = validate_shards(str(synthetic_data / "test-{000000..000001}.tar"), model=str(model))
    assert result["bad"] == [] and result["good"] == result["samples"] == 32


# ----------------------------------------------------------------------------------------------------
# Persistence


def test_save_pretrained_is_self_contained(dirs: dict[str, Path], tmp_path: Path) -> None:
    """The saved directory holds the towers' configs, tokenizer and feature extractor (not their weights:
    model.safetensors has them); with the original directories gone it loads and encodes the same."""
    text_dir, audio_dir = tmp_path / "minibert", tmp_path / "w2v"
    shutil.copytree(dirs["bert"], text_dir)
    shutil.copytree(dirs["wav2vec2"], audio_dir)
    torch.manual_seed(0)
    model = MultimodalModel(from_dict(ModelConfig, {"embed_dim": 8, "modalities": {
        "text": text_spec(text_dir), "audio": audio_spec(audio_dir)}}, "model"), ClipConfig()).eval()
    text, audio = model.processors["text"], model.processors["audio"]
    batch = {"text": text.collate([text.transform(text.tokenize(c), train=False) for c in CAPTIONS[:2]]),
             "audio": audio.collate([audio.transform(torch.from_numpy(w), train=False) for w in clips()])}
    with torch.no_grad():
        before = model.encode(batch)

    out = model.save_pretrained(tmp_path / "saved")
    towers = {m: json.loads((out / "config.json").read_text())["model"]["modalities"][m]["tower"]
              for m in ("text", "audio")}
    assert towers["text"]["path"] == "text_hf" and towers["audio"]["path"] == "audio_hf"
    # The config is saved as given (no rewrite): from_pretrained builds the towers architecture-only itself.
    assert "init" not in towers["text"] and "init" not in towers["audio"]
    files = model_files(out)
    assert {"text_hf/config.json", "text_hf/tokenizer.json", "audio_hf/config.json",
            "audio_hf/preprocessor_config.json"} <= set(files)
    assert not [f for f in files if f != "model.safetensors" and f.endswith((".safetensors", ".bin", ".pt"))]
    assert [p.name for p in out.rglob("*.safetensors")] == ["model.safetensors"]

    shutil.rmtree(text_dir)
    audio_dir.rename(tmp_path / "moved")
    loaded = MultimodalModel.from_pretrained(out).eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    text, audio = loaded.processors["text"], loaded.processors["audio"]
    again = {"text": text.collate([text.transform(text.tokenize(c), train=False) for c in CAPTIONS[:2]]),
             "audio": audio.collate([audio.transform(torch.from_numpy(w), train=False) for w in clips()])}
    assert all(torch.equal(again[m], batch[m]) for m in batch)
    with torch.no_grad():
        after = loaded.encode(again)
    assert all(torch.equal(after[m], before[m]) for m in before)


# ----------------------------------------------------------------------------------------------------
# Bad input: one line each, naming the field and what does not fit


def build(modalities: dict[str, Any]) -> MultimodalModel:
    return MultimodalModel(from_dict(ModelConfig, {"embed_dim": 8, "modalities": modalities}, "model"))


def edited(src: Path, dst: Path, **config: Any) -> Path:
    """A copy of ``src`` whose config.json says something else than its weights."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def one_line_error(modalities: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        build(modalities)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_paths(dirs: dict[str, Path], tmp_path: Path) -> None:
    audio = audio_spec(dirs["hubert"])
    assert one_line_error({"text": text_spec(tmp_path / "nope"), "audio": audio}) == (
        f"model.modalities.text.tower.path: directory not found: {tmp_path / 'nope'} "
        f"(pretrained weights are read from local paths only)")
    message = one_line_error({"text": {**text_spec(dirs["bert"]), "tokenizer": str(tmp_path / "tok")},
                              "audio": audio})
    assert message.startswith(f"model.modalities.text.tokenizer: directory not found: {tmp_path / 'tok'}")
    message = one_line_error({"text": text_spec(dirs["bert"]), "audio": audio_spec(tmp_path / "a")})
    assert message.startswith(f"model.modalities.audio.tower.path: directory not found: {tmp_path / 'a'}")
    assert one_line_error({"text": {"max_len": 8, "tower": {"type": "hf"}}, "audio": audio}) == (
        "model.modalities.text.tower.path: required with type 'hf' (a local transformers model directory)")


def test_checkpoint_keys_that_do_not_fit(dirs: dict[str, Path], tmp_path: Path) -> None:
    """A config with a layer more than the weights: missing keys; a layer less: unexpected keys. Refused
    (listed) unless strict: false. A task head beside the encoder's weights is not a mismatch."""
    audio = audio_spec(dirs["hubert"])
    deeper = edited(dirs["bert"], tmp_path / "deeper", num_hidden_layers=3)
    message = one_line_error({"text": text_spec(deeper), "audio": audio})
    assert message.startswith(f"model.modalities.text.tower.path: checkpoint {deeper} does not fit BertModel: "
                              f"16 missing keys (encoder.layer.2.attention.output.LayerNorm.bias, ")
    assert message.endswith("... and 11 more) (set strict: false to load anyway)")
    shallower = edited(dirs["bert"], tmp_path / "shallower", num_hidden_layers=1)
    message = one_line_error({"text": text_spec(shallower), "audio": audio})
    assert "16 unexpected keys (encoder.layer.1.attention.output.LayerNorm.bias, " in message

    model = build({"text": text_spec(deeper, strict=False), "audio": audio})
    reference = BertModel.from_pretrained(str(dirs["bert"]))
    assert torch.equal(model.towers["text"].model.encoder.layer[1].output.dense.weight,
                       reference.encoder.layer[1].output.dense.weight)

    # A checkpoint with a task head (BERT pre-training's cls.*) loads as its encoder, strictly: the head's keys
    # name no module of the encoder.
    torch.manual_seed(0)
    pretraining = BertForPreTraining(BertConfig.from_pretrained(str(dirs["bert"])))
    pretraining.save_pretrained(tmp_path / "pretraining")
    tower = build({"text": text_spec(tmp_path / "pretraining"), "audio": audio}).towers["text"]
    weights = {k: v for k, v in pretraining.bert.state_dict().items() if not k.startswith("pooler.")}
    assert weights.keys() == tower.model.state_dict().keys()
    assert all(torch.equal(v, tower.model.state_dict()[k]) for k, v in weights.items())

    audio_deeper = edited(dirs["whisper"], tmp_path / "whisper3", encoder_layers=3)
    message = one_line_error({"text": text_spec(dirs["bert"]), "audio": audio_spec(audio_deeper)})
    assert message.startswith(f"model.modalities.audio.tower.path: checkpoint {audio_deeper} does not fit "
                              f"WhisperModel: ") and "missing keys (encoder.layers.2." in message


def test_tokenizer_and_positions_that_do_not_fit(dirs: dict[str, Path], tmp_path: Path) -> None:
    audio = audio_spec(dirs["hubert"])
    big = tmp_path / "bigtok"
    bert_tokenizer(extra=10).save_pretrained(big)
    n = len(bert_tokenizer())
    assert one_line_error({"text": {**text_spec(dirs["bert"]), "tokenizer": str(big)}, "audio": audio}) == (
        f"model.modalities.text.tokenizer: tokenizer {big} has {n + 10} tokens but the model {dirs['bert']} "
        f"has vocab_size {n}")
    assert one_line_error({"text": {**text_spec(dirs["bert"]), "max_len": 64}, "audio": audio}) == (
        f"model.modalities.text.max_len: 64 exceeds the model's max_position_embeddings 40 ({dirs['bert']})")


def test_unknown_tower_types_and_options(dirs: dict[str, Path]) -> None:
    text, audio = text_spec(dirs["bert"]), audio_spec(dirs["hubert"])
    assert one_line_error({"text": {"tower": {"type": "gpt"}}, "audio": audio}) == (
        "model.modalities.text.tower.type: 'gpt' is not allowed (allowed: 'bert', 'hf', 'clip')")
    assert one_line_error({"text": text, "audio": {"tower": {"type": "hubert"}}}) == (
        "model.modalities.audio.tower.type: 'hubert' is not allowed (allowed: 'vit', 'hf', 'timm', 'clip')")
    assert one_line_error({"text": text, "audio": audio_spec(dirs["whisper"], pooling="cls")}) == (
        "model.modalities.audio.tower.pooling: 'cls' needs a model with a CLS token "
        "(audio-spectrogram-transformer); whisper has none (allowed: 'mean')")
    assert one_line_error({"text": text, "audio": {**audio, "sample_rate": 22050}}) == (
        f"model.modalities.audio.sample_rate: 22050 differs from the feature extractor's sampling_rate 16000 "
        f"({dirs['hubert']})")
    assert one_line_error({"text": text, "audio": {"tower": {"pooling": "cls"}}}) == (
        "model.modalities.audio.tower.pooling: 'cls' is not available with type 'vit' (allowed: 'mean')")
