"""``mmcl train | eval | push | shards | tokenizer | doctor | models | demo``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from mmcl.config import CONFIG_DIR, ConfigError, ModelConfig, apply_overrides, from_dict, named_model, parse_override
from mmcl.errors import HubError, MmclError

#: The suite ``mmcl train --eval-data`` runs when the config names none: retrieval, which needs no labels.
DEFAULT_EVAL_SUITE = "retrieval"


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a config")
    p.add_argument("--config", required=True, help="YAML file, or a name under configs/train (e.g. demo)")
    p.add_argument("--out", required=True, help="run directory (log.jsonl, checkpoints/, final/, eval/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", help="'latest' or a checkpoint directory")
    p.add_argument("--data", help="training shards (sets data.train): a brace range, a quoted glob, a directory "
                                  "of shards or a text file listing them")
    p.add_argument("--eval-data", help="held-out shards (sets data.test); a config without an eval suite then "
                                       f"ends with the retrieval suite ({DEFAULT_EVAL_SUITE}) on them")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="run an eval suite on a model",
                       description="Run every task of a suite (zero-shot classification, retrieval, linear probe) "
                                   "and write results.json, one JSON per task, summary.md and PNG plots to --out. "
                                   "Encoded datasets are cached under OUT/cache, so a re-run with other prompts "
                                   "does not encode the data again.")
    p.add_argument("--suite", help="suite YAML, a name under configs/eval (e.g. synthetic), a benchmark (esc50, "
                                   "urbansound8k, audioset, vggsound, ucf101, kinetics400, audiocaps, clotho, "
                                   "msrvtt) or 'standard'; default with a train config as --model: its eval.suite")
    p.add_argument("--model", required=True, help="a save_pretrained directory, a run's checkpoints/step_N "
                                                   "directory, a Hub repo id (from the local HF cache when offline), "
                                                   "or a train config (config:FILE, or a .yaml file): the model it "
                                                   "builds before any step (zero-shot before training)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with a train config as --model: override its fields, as mmcl train --set (repeatable)")
    p.add_argument("--out", required=True, help="output directory (results.json, one JSON per task, summary.md, "
                                                 "plots, cache/)")
    p.add_argument("--data", action="append", default=[],
                   help="held-out shards for tasks whose data is 'test'; for a benchmark, the folder of its copy "
                        "in the released layout; for --suite standard, NAME=PATH (repeatable)")
    p.add_argument("--protocol", action="append", default=[],
                   help="a benchmark's protocol (e.g. fold1 for esc50; NAME=PROTOCOL with --suite standard)")
    p.add_argument("--cache", help="where a benchmark's shards and embeddings are cached (default: beside the copy, "
                                   "COPY.mmcl-cache)")
    p.add_argument("--batch-size", type=int, default=64, help="benchmark encoding batch size (default: 64)")
    p.add_argument("--workers", type=int, default=0, help="loader processes (default: 0)")
    p.add_argument("--build-workers", type=int, help="processes building a benchmark's shards (default: --workers, "
                                                    "at least 1)")
    p.add_argument("--no-cache", dest="cache_embeddings", action="store_false", help="encode again even when cached")
    p.add_argument("--clip-seconds", type=float, help="the time window read of each clip, centred (0: whole clips); "
                                                      "default for a benchmark: the window the model was trained "
                                                      "with, else its audio's seconds, else whole clips")
    p.add_argument("--eval-clips", type=int, help="K evenly spaced windows per clip, their embeddings averaged")
    p.add_argument("--input-cache-gb", type=float, default=8.0,
                   help="a benchmark's decoded inputs are kept beside its shards up to this size, reused by every "
                        "model with the same processing (default: 8; 0: off)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _add_push(sub) -> None:
    p = sub.add_parser("push", help="publish a saved model to the Hugging Face Hub",
                       description="Create the repo (kept if it exists) and upload the model directory's files "
                                   "(config.json, model.safetensors, tokenizer and processor files, README.md "
                                   "model card) in one commit. The token comes from HF_TOKEN or `hf auth login`.")
    p.add_argument("--model", required=True, help="a save_pretrained directory (e.g. a run's final/)")
    p.add_argument("--repo-id", required=True, help="user/name or org/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--eval", dest="eval_dir", help="eval output directory whose results go into the model card "
                                                   "(default for a run's final/: the run's eval/)")
    p.add_argument("--train-config", help="training config YAML shown in the model card (default for a run's "
                                          "final/: the run's config.yaml)")
    p.add_argument("--message", default="Upload mmcl model", help="commit message")


def _add_shards(sub) -> None:
    p = sub.add_parser("shards", help="make and check WebDataset shards")
    ss = p.add_subparsers(dest="shards_cmd", required=True, metavar="{synth,build,inspect,validate}")
    s = ss.add_parser("synth", help="write the procedural synthetic world as shards")
    s.add_argument("--out", required=True)
    s.add_argument("--train", type=int, required=True, help="training clips")
    s.add_argument("--test", type=int, required=True, help="held-out clips")
    s.add_argument("--world", choices=["simple", "joint", "xor"], default="simple")
    s.add_argument("--xor-p", type=float, default=1.0, help="xor world: probability that c = a XOR b (else c = a)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--per-shard", type=int, default=500)
    _add_shards_build(ss)
    i = ss.add_parser("inspect", help="counts, durations, modality presence and a few samples of shards "
                                      "(exit 1 when a shard cannot be read to its end)")
    i.add_argument("shards", help="brace-expanded shard spec, e.g. data/shard-{000000..000009}.tar")
    i.add_argument("--samples", type=int, default=3, help="samples to show (default: 3)")
    i.add_argument("--json", action="store_true", help="print the full result as JSON")
    v = ss.add_parser("validate", help="read every sample as the training loader does; exit 1 if any is bad")
    v.add_argument("shards", help="brace-expanded shard spec")
    v.add_argument("--model", default="tiny", help="model config whose modalities decode (name or YAML; default: tiny)")
    v.add_argument("--tokenizer", help="sentencepiece model for the text modality (default: tokenizer.model "
                                       "beside the shards, else a throwaway one)")
    v.add_argument("--workers", type=int, default=0, help="processes, one shard each at a time (default: 0)")
    v.add_argument("--on-missing", choices=["skip", "mask"], default="skip",
                   help="a sample lacking a modality is bad (skip, as data.on_missing: skip) or good while it has "
                        "one (mask) (default: skip)")
    v.add_argument("--json", action="store_true", help="print the full result as JSON")


def _byte_size(text: str) -> int:
    """argparse type of ``--shard-size`` (``512M``, ``1G``, bytes)."""
    from data_tools.build import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_shards_build(ss) -> None:
    b = ss.add_parser("build", help="turn a media folder or a CSV/JSONL manifest into shards",
                      description="Normalise media (any container/codec ffmpeg reads, images, captions) into "
                                  "mp4/flac/txt/json WebDataset shards with sizes.json and a JSON report "
                                  "listing every rejected input with its reason.")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="CSV/TSV/JSONL with columns video, audio, image, text, label, license, "
                                        "start, end, captions, key (others are kept as metadata)")
    src.add_argument("--folder", help="folder tree of media with sidecar .txt captions and .json metadata")
    b.add_argument("--out", required=True, help="output folder, or pipe:COMMAND with {name} (needs --state)")
    b.add_argument("--workers", type=int, default=2, help="encoding processes (default: 2)")
    b.add_argument("--root", help="folder that relative manifest paths start from (default: the manifest's)")
    b.add_argument("--prefix", default="shard", help="shard names PREFIX-000000.tar (default: shard)")
    b.add_argument("--shard-size", type=_byte_size, default="1G", help="target shard size (default: 1G)")
    b.add_argument("--shard-samples", type=int, default=0, help="most samples per shard (default: no limit)")
    b.add_argument("--fps", type=float, default=8.0, help="frame rate of re-encoded video (default: 8)")
    b.add_argument("--size", type=int, default=256, help="shorter side of re-encoded video, even (default: 256)")
    b.add_argument("--window", type=float, default=10.0,
                   help="cut longer media into equal windows of at most this many seconds; 0: never (default: 10)")
    b.add_argument("--image-seconds", type=float, default=2.0, help="length of the still video of an image "
                                                                    "without audio (default: 2)")
    b.add_argument("--passthrough", action="store_true", help="copy H.264/HEVC/AV1/VP9/MPEG-4 video of uncut "
                                                              "files instead of re-encoding")
    b.add_argument("--max-caption-chars", type=int, default=2000, help="longer captions are rejected (default: 2000)")
    b.add_argument("--crf", type=int, default=23, help="libx264 quality (default: 23)")
    b.add_argument("--preset", default="veryfast", help="libx264 preset (default: veryfast)")
    b.add_argument("--max-loss", type=float, default=0.05,
                   help="media whose decoder logs errors (as after seeking into open-GOP H.264) is kept, with a "
                        "warning in the report, unless more than this fraction of a window's video frames or "
                        "audio samples is lost (default: 0.05)")
    strictness = b.add_mutually_exclusive_group()
    strictness.add_argument("--lenient", action="store_true", help="keep whatever decodes, however much is lost "
                                                                   "(errors listed as warnings)")
    strictness.add_argument("--strict", action="store_true", help="reject media on any decoder error line")
    b.add_argument("--background", default="white", help="colour pictures with an alpha channel are laid over "
                                                        "(a name or #RRGGBB; default: white)")
    b.add_argument("--timeout", type=float, default=600.0, help="seconds per ffmpeg call (default: 600)")
    b.add_argument("--state", help="local folder of the progress file (default: --out; required with pipe:)")
    b.add_argument("--overwrite", action="store_true", help="replace an earlier build with this prefix")
    b.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer on the captions of shards",
                       description="Stream the txt captions of the shards into sentencepiece and write the model "
                                   "(<pad> = 0, <unk> = 1, as the text modality reads it). Point "
                                   "model.modalities.text.tokenizer at the file.")
    p.add_argument("--shards", required=True, help="shard spec: brace range, quoted glob, directory or list file")
    p.add_argument("--out", required=True, help="model file to write, e.g. data/mine/tokenizer.model")
    p.add_argument("--vocab-size", type=int, default=8000, help="most pieces (a small corpus yields fewer; "
                                                                "default: 8000)")
    p.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram", help="default: unigram")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="check this machine (and a config) before a long run",
                       description="Versions of torch / CUDA / torchcodec / FFmpeg / PyAV / soundfile / DeepSpeed, "
                                   "whether each decoder decodes a clip made on the spot, DeepSpeed's buildable ops, "
                                   "the devices; with --config, whether its model files exist and its shards "
                                   "resolve. Exit 1 with one line per problem.")
    p.add_argument("--config", help="training YAML, or a name under configs/train (e.g. own_data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, as mmcl train --set (repeatable)")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="synthesise data, train, evaluate: the embedded default")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="a few-minute smoke run (1000 clips, 80 steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of configs/train/demo.yaml")


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the named model configs with their parameters per tower",
                       description="Build every named model config (configs/models) on the meta device and print "
                                   "its parameters per tower. A config that does not build is one line on stderr "
                                   "and the exit status is 1.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE",
                   help="override a field in every named config that has the field's parent, e.g. --set "
                        "model.modalities.text.tokenizer=data/mine/tokenizer.model (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcl", description="audio-visual-text contrastive pretraining")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # The deepspeed launcher passes --local_rank=N before the sub-command (the rank is also in LOCAL_RANK).
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_push(sub)
    _add_shards(sub)
    _add_tokenizer(sub)
    _add_doctor(sub)
    _add_demo(sub)
    _add_models(sub)
    return parser


def train_overrides(config: str, data: str | None, eval_data: str | None, overrides: list[str]) -> list[str]:
    """``--data`` / ``--eval-data`` as overrides of data.train / data.test, placed before the user's ``--set``
    (which win); ``--eval-data`` with a config naming no eval suite also picks :data:`DEFAULT_EVAL_SUITE`."""
    from mmcl.config import load_config

    shortcuts = [f"data.train={json.dumps(data)}"] if data else []
    if eval_data:
        shortcuts.append(f"data.test={json.dumps(eval_data)}")
        if not load_config(config).eval.suite:
            shortcuts.append(f"eval.suite={DEFAULT_EVAL_SUITE}")
    return shortcuts + list(overrides)


def cmd_train(args) -> int:
    from mmcl.config import load_config
    from mmcl.doctor import suite_reads_test
    from mmcl.train.loop import train

    cfg = load_config(args.config, train_overrides(args.config, args.data, args.eval_data, args.overrides))
    if suite_reads_test(cfg) and not cfg.data.test:
        raise ConfigError(f"eval.suite: {cfg.eval.suite} evaluates data.test, which is empty (give --eval-data SPEC, "
                          f"or --set eval.suite='')")
    summary = train(cfg, args.out, resume=args.resume)
    _print_results(summary)
    return 0


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    """``NAME=VALUE`` arguments as a dict (one line naming the flag for any other form)."""
    out = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{flag} {v!r}: with --suite standard give NAME=VALUE (e.g. {flag} esc50=...)")
        if name in out:
            raise ConfigError(f"{flag}: {name} is given twice")
        out[name] = value
    return out


def _eval_model(args, suite_required: bool = False):
    """The model ``--model`` names -> (model, the train config it was built from, or None). A train config
    (``config:FILE`` or a ``.yaml``) builds the model it would train, before any step; ``--set`` overrides it.
    ``suite_required``: no ``--suite`` was given, which only a train config (its ``eval.suite``) makes up for."""
    from mmcl.config import load_config
    from mmcl.model import load_model, train_config_spec, untrained_model

    spec = train_config_spec(args.model)
    if spec is None:
        if args.overrides:
            raise ConfigError("--set: only with a train config as --model (config:FILE)")
        if suite_required:
            raise ConfigError("--suite: required (a suite YAML, a name under configs/eval, or a benchmark)")
        return load_model(args.model), None
    cfg = load_config(spec, args.overrides)
    return untrained_model(cfg), cfg


def cmd_benchmark(args) -> int:
    """``mmcl eval --suite <benchmark>|standard``: the community benchmarks from local copies."""
    from mmcl.eval.benchmarks import get_benchmark, run_benchmark, run_standard
    from mmcl.eval.benchmarks.runner import read_copy

    if args.input_cache_gb < 0:
        raise ConfigError(f"--input-cache-gb: must be >= 0 (0: off), got {args.input_cache_gb:g}")
    options = dict(cache_dir=args.cache, model_name=args.model, workers=args.workers, batch_size=args.batch_size,
                   cache_embeddings=args.cache_embeddings, progress=args.progress, clip_seconds=args.clip_seconds,
                   eval_clips=args.eval_clips, input_cache_gb=args.input_cache_gb, build_workers=args.build_workers)
    if args.suite == "standard":
        data, protocols = _pairs(args.data, "--data"), _pairs(args.protocol, "--protocol")
        manifests = {name: read_copy(get_benchmark(name), path, protocols.get(name)) for name, path in data.items()}
        runs = run_standard(_eval_model(args)[0], data, args.out, protocols=protocols, manifests=manifests,
                            **options)
        print((Path(args.out) / "summary.md").read_text().rstrip())
        print(f"\n{len(runs)} benchmarks; reports in {args.out}")
        return 0
    bench = get_benchmark(args.suite)
    if len(args.data) != 1 or len(args.protocol) > 1:
        raise ConfigError(f"--data: {args.suite} needs exactly one --data PATH, its copy ({bench.layout})"
                          if len(args.data) != 1 else "--protocol: give it once")
    manifest = read_copy(bench, args.data[0], args.protocol[0] if args.protocol else None)  # before the model loads
    results = run_benchmark(_eval_model(args)[0], args.suite, args.data[0], args.out, manifest=manifest, **options)
    _print_results(results)
    info = results["benchmark"]
    print(f"\n{bench.title}, protocol {info['protocol']}: {info['n']} clips listed, {info['missing']} missing, "
          f"{info['rejected']} unreadable; reports in {args.out}")
    return 0


def cmd_eval(args) -> int:
    from mmcl.eval.benchmarks import benchmark_names
    from mmcl.eval.benchmarks.runner import benchmark_window
    from mmcl.eval.suite import load_suite, run_suite

    if args.suite and not Path(args.suite).is_file() and args.suite in (*benchmark_names(), "standard"):
        return cmd_benchmark(args)
    if len(args.data) > 1 or args.protocol:
        raise ConfigError("--data: a suite file takes one --data SHARDS, and no --protocol (those are for benchmarks)")
    model, cfg = _eval_model(args, suite_required=not args.suite)
    suite_name, data = args.suite, args.data[0] if args.data else ""
    if cfg is not None:
        suite_name, data = suite_name or cfg.eval.suite, data or cfg.data.test
        if not suite_name:
            raise ConfigError(f"eval.suite: {args.model} names no eval suite (give --suite FILE)")
    suite = load_suite(suite_name)
    if args.clip_seconds is not None or args.eval_clips is not None:  # overrides the suite's own window
        seconds = args.clip_seconds if args.clip_seconds is not None else suite.clip.seconds if suite.clip else None
        suite.clip = benchmark_window(model, seconds, args.eval_clips)[0]
    results = run_suite(model, suite, data, workers=args.workers, out_dir=args.out, model_name=args.model,
                        cache=args.cache_embeddings, progress=args.progress)
    _print_results(results)
    print(f"\nreports in {args.out}")
    return 0


def cmd_push(args) -> int:
    import yaml
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    from mmcl.hub import push_to_hub, read_eval_dir

    model_dir = Path(args.model)
    run_dir = model_dir.parent if model_dir.name == "final" else None
    eval_dir = args.eval_dir or (str(run_dir / "eval") if run_dir and (run_dir / "eval").is_dir() else None)
    train_config = args.train_config or (str(run_dir / "config.yaml") if run_dir and (run_dir / "config.yaml").is_file()
                                         else None)
    records = read_eval_dir(eval_dir) if eval_dir else None
    config = yaml.safe_load(Path(train_config).read_text()) if train_config else None
    try:
        url = push_to_hub(model_dir, args.repo_id, private=args.private, records=records, train_config=config,
                          commit_message=args.message)
    except (HTTPError, ConnectionError) as e:  # HTTPError: the transport's (refused, timed out) and the Hub's answers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if isinstance(e, HfHubHTTPError) else f"cannot reach {constants.ENDPOINT}: "
        raise HubError(f"{args.repo_id}: {where}{first}") from None
    print(f"pushed {model_dir} to {args.repo_id}: {url}")
    return 0


def cmd_shards(args) -> int:
    if args.shards_cmd == "synth":
        from mmcl.data.synthetic import synth

        t = time.time()
        summary = synth(args.out, train=args.train, test=args.test, world=args.world, seed=args.seed,
                        workers=args.workers, per_shard=args.per_shard, xor_p=args.xor_p)
        print(json.dumps(summary, indent=2, default=str))
        print(f"wrote {args.train + args.test} clips in {time.time() - t:.1f} s to {args.out}")
    elif args.shards_cmd == "build":
        return _shards_build(args)
    elif args.shards_cmd == "inspect":
        from data_tools.check import format_inspection, inspect_shards

        info = inspect_shards(args.shards, n_samples=args.samples)
        print(json.dumps(info, indent=1) if args.json else format_inspection(info))
        return 1 if info["problems"] else 0
    elif args.shards_cmd == "validate":
        from data_tools.check import format_validation, validate_shards

        result = validate_shards(args.shards, model=args.model, tokenizer=args.tokenizer, workers=args.workers,
                                 on_missing=args.on_missing)
        print(json.dumps(result, indent=1) if args.json else format_validation(result))
        return 1 if result["bad"] else 0
    return 0


def _shards_build(args) -> int:
    from data_tools.build import ShardOptions, build_shards, load_inputs
    from data_tools.media import EncodeOptions

    exclude = [args.out] if not args.out.startswith("pipe:") else []
    items = load_inputs(manifest=args.manifest, folder=args.folder, root=args.root,
                        exclude=exclude + ([args.state] if args.state else []))
    options = EncodeOptions(fps=args.fps, size=args.size, window=args.window, image_seconds=args.image_seconds,
                            passthrough=args.passthrough, max_caption_chars=args.max_caption_chars, crf=args.crf,
                            preset=args.preset, lenient=args.lenient, timeout=args.timeout, max_loss=args.max_loss,
                            strict=args.strict, background=args.background)
    shard = ShardOptions(prefix=args.prefix, shard_size=args.shard_size, shard_samples=args.shard_samples)
    report = build_shards(items, args.out, workers=args.workers, options=options, shard=shard, state=args.state,
                          overwrite=args.overwrite, progress=args.progress)
    run = report["run"]
    print(f"{report['inputs']} inputs: {report['accepted']} accepted ({report['warned']} with decoder warnings), "
          f"{report['rejected']} rejected {report['by_reason'] or ''}".rstrip())
    print(f"{report['samples']} samples in {len(report['shards'])} shard(s): {report['location']}")
    print(f"this run: {run['inputs']} inputs, {run['samples']} samples in {run['seconds']:.1f} s "
          f"({run['samples_per_s'] or 0:.2f} clips/s, {run['workers']} worker(s), "
          f"{run['resumed_shards']} finished shard record(s) reused)")
    return 0


def cmd_tokenizer(args) -> int:
    from data_tools.tokenizer import format_summary, tokenizer_from_shards

    summary = tokenizer_from_shards(args.shards, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
                                    progress=args.progress)
    print(format_summary(summary))
    return 0


def cmd_doctor(args) -> int:
    from mmcl.doctor import format_checks, run_doctor

    if args.overrides and not args.config:
        raise ConfigError("--set: needs --config")
    checks = run_doctor(args.config, args.overrides)
    print(format_checks(checks))
    problems = [c.problem for c in checks if c.problem]
    for problem in problems:
        print(f"mmcl doctor: {problem}", file=sys.stderr)
    return 1 if problems else 0


def named_model_specs(overrides: list[str]) -> dict[str, dict]:
    """``{name: model block}`` of every named config (configs/models), each ``model.KEY=VALUE`` override
    applied to the configs that have the key's parent (``model.modalities.text.tokenizer=F`` reaches the
    configs with a text modality, ``model.embed_dim=64`` all of them)."""
    specs = {f.stem: named_model(f.stem) for f in sorted((CONFIG_DIR / "models").glob("*.yaml"))}
    for text in overrides:
        keys, _ = parse_override(text)
        if keys[0] != "model" or len(keys) < 2:
            raise ConfigError(f"override {text!r}: mmcl models takes model fields (model.KEY=VALUE)")
        reached = []
        for name, spec in specs.items():
            node: Any = spec
            for key in keys[1:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict):
                specs[name] = apply_overrides(spec, [text[len("model."):]])
                reached.append(name)
        if not reached:
            raise ConfigError(f"override {text!r}: no named config has {'.'.join(keys[:-1])}")
    return specs


def cmd_models(args) -> int:
    """Each named model config with its parameters per tower (built on the meta device: no memory, instant).
    A config that does not build (e.g. a tokenizer file under data/ not written yet) is one line on stderr,
    and the exit status is then 1."""
    from mmcl.model import MultimodalModel

    specs = named_model_specs(args.overrides)
    print("named model configs (configs/models), parameters per tower (towers: the modalities', or with a shared "
          "trunk their tokenisers and trunk)")
    failed = 0
    for name, spec in specs.items():
        try:
            model = MultimodalModel(from_dict(ModelConfig, spec, "model"), device="meta")
        except Exception as e:  # whatever stops a config from building is reported on its line
            reason = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            print(f"mmcl models: {name}: does not build: {reason}", file=sys.stderr)
            failed += 1
            continue
        counts = model.parameter_counts()
        parts = "  ".join(f"{part} {n:,}" for part, n in counts.items() if part not in ("objective", "total"))
        print(f"{name:<12} {counts['total'] / 1e6:8.2f}M  embed_dim {model.model_cfg.embed_dim:<4}  {parts}")
    return 1 if failed else 0


def cmd_demo(args) -> int:
    from mmcl.demo import run_demo

    results = run_demo(Path(args.out), quick=args.quick, overrides=args.overrides)
    _print_results(results)
    return 0


def _print_results(results: dict) -> None:
    from mmcl.eval.suite import results_table

    table = results_table(results)
    if table:
        print(table)
    if "train" in results:
        t = results["train"]
        print(f"\ntrained {t['steps']} steps, {t['samples']} samples in {t['seconds']:.0f} s "
              f"({t['samples_per_s']:.1f} samples/s); skipped: {results.get('data', {}).get('skipped', {})}")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "push": cmd_push, "shards": cmd_shards, "models": cmd_models,
            "demo": cmd_demo, "tokenizer": cmd_tokenizer, "doctor": cmd_doctor}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.cmd](args)
    except (MmclError, FileNotFoundError) as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"mmcl {args.cmd}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
