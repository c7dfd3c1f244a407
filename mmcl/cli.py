"""``mmcl train | eval | shards | models | demo``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from mmcl.config import CONFIG_DIR, ConfigError


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a config")
    p.add_argument("--config", required=True, help="YAML file, or a name under configs/train (e.g. demo)")
    p.add_argument("--out", required=True, help="run directory (log.jsonl, checkpoints/, final/, eval/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", help="'latest' or a checkpoint directory")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="run an eval suite on a model")
    p.add_argument("--suite", required=True, help="suite YAML, or a name under configs/eval")
    p.add_argument("--model", required=True, help="a save_pretrained directory or a run's checkpoint directory")
    p.add_argument("--out", required=True, help="output directory (results.json, one JSON per task, summary.md)")
    p.add_argument("--data", default="", help="held-out shards for tasks whose data is 'test'")
    p.add_argument("--workers", type=int, default=0)


def _add_shards(sub) -> None:
    p = sub.add_parser("shards", help="make and check WebDataset shards")
    ss = p.add_subparsers(dest="shards_cmd", required=True, metavar="{synth}")
    s = ss.add_parser("synth", help="write the procedural synthetic world as shards")
    s.add_argument("--out", required=True)
    s.add_argument("--train", type=int, required=True, help="training clips")
    s.add_argument("--test", type=int, required=True, help="held-out clips")
    s.add_argument("--world", choices=["simple", "joint"], default="simple")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--per-shard", type=int, default=500)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="synthesise data, train, evaluate: the embedded default")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run (small data, few steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of configs/train/demo.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcl", description="audio-visual-text contrastive pretraining")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_shards(sub)
    _add_demo(sub)
    sub.add_parser("models", help="list the named model configs")
    return parser


def cmd_train(args) -> int:
    from mmcl.config import load_config
    from mmcl.train.loop import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, args.out, resume=args.resume)
    _print_results(summary)
    return 0


def load_model_for_eval(path: str):
    """A save_pretrained directory, or a training checkpoint directory (config from the run)."""
    from mmcl.model import MultimodalModel

    p = Path(path)
    if (p / "config.json").is_file():
        return MultimodalModel.from_pretrained(p)
    if (p / "state.pt").is_file():
        from mmcl.config import Config, from_dict
        from mmcl.train.checkpoint import load_checkpoint

        weights, state = load_checkpoint(p)
        cfg = from_dict(Config, state["config"])
        model = MultimodalModel(cfg.model, cfg.objective)
        model.load_state_dict(weights)
        return model
    raise ConfigError(f"--model {path}: not a model directory (config.json) nor a checkpoint (state.pt)")


def cmd_eval(args) -> int:
    from mmcl.eval.suite import load_suite, run_suite

    suite = load_suite(args.suite)
    model = load_model_for_eval(args.model)
    results = run_suite(model, suite, args.data, workers=args.workers, out_dir=args.out, model_name=args.model)
    _print_results(results)
    return 0


def cmd_shards(args) -> int:
    if args.shards_cmd == "synth":
        from mmcl.data.synthetic import synth

        t = time.time()
        summary = synth(args.out, train=args.train, test=args.test, world=args.world, seed=args.seed,
                        workers=args.workers, per_shard=args.per_shard)
        print(json.dumps(summary, indent=2, default=str))
        print(f"wrote {args.train + args.test} clips in {time.time() - t:.1f} s to {args.out}")
    return 0


def cmd_models(args) -> int:
    import yaml

    for f in sorted((CONFIG_DIR / "models").glob("*.yaml")):
        spec = yaml.safe_load(f.read_text())
        towers = ", ".join(f"{n}: {m.get('kind', n)}" for n, m in spec.get("modalities", {}).items())
        print(f"{f.stem:<10} embed_dim={spec.get('embed_dim')}  {towers}")
    return 0


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


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "shards": cmd_shards, "models": cmd_models, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.cmd](args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"mmcl {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
