"""`xbt`: the command line. Each subcommand is `--config FILE` plus `key=value` overrides."""
from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

from xbt_ray import console
from xbt_ray.config import ConfigError, load_config

# package data (pyproject.toml), so `--smoke` works from an installed wheel and the image too
SMOKE_CONFIG = resources.files("xbt_ray") / "configs" / "tiny.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xbt", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="Ray, Ray Data, DeepSpeed and torch output on the console too "
                             "(always kept in runs/<run>/logs/)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    for name, help_text in (("run", "the whole chain: world/models, embed, stage 1, stage 2, "
                                    "evaluate"),
                            ("world", "build the demo world's shards (cached by recipe)"),
                            ("embed", "embed caption corpus and eval split (old and new)"),
                            ("stage1", "embed (reused) + fit the projector on text"),
                            ("stage2", "stage 1 (reused) + LoRA stage 2 + export the encoder")):
        p = command(name, help=help_text)
        p.add_argument("--config", help="YAML config (default: built-in demo defaults)")
        p.add_argument("--run-name", help="name of the run (output dir, MLflow run)")
        p.add_argument("--embeddings", help="bring your own embeddings: a manifest (YAML) of "
                                            "exports per role; no shards, no encoder "
                                            "(sets data.embeddings)")
        p.add_argument("--smoke", action="store_true",
                       help="a minutes-long check of the whole path on the tiny world and "
                            "models (xbt_ray/configs/tiny.yaml) instead of --config")
        p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p = command("report", help="the evaluation suite from embeddings alone: report "
                                      "table, CSV, heatmap and backfill curves, logged to MLflow")
    p.add_argument("--embeddings", help="a manifest (YAML) of embedding exports per role: "
                                        "evaluate them (and the run's finished stages) with "
                                        "no encoder")
    p.add_argument("--inputs",
                   help="eval_inputs.json (written by `xbt run`) or a directory laid out as "
                        "eval/{old,new}_{images,captions}/, queries/<name>/{images,captions}/, "
                        "support/...")
    p.add_argument("--out", help="output directory (default: runs/<run-name>)")
    p.add_argument("--config", help="YAML config (eval.*, tracking.*)")
    p.add_argument("--run-name", help="name of the MLflow run and default output dir")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p = command("eval-data", help="convert Flickr30k/COCO (Karpathy JSON), NoCaps or a "
                                         "manifest into an evaluation split (data.eval)")
    p.add_argument("--format", required=True, choices=["karpathy", "nocaps", "manifest"])
    p.add_argument("--annotations", required=True, help="annotation JSON or manifest file")
    p.add_argument("--images", help="image root directory")
    p.add_argument("--protocol", required=True, help="large-scale | standard | all (manifest)")
    p.add_argument("--out", required=True, help="split directory to write")
    p.add_argument("--dataset", help="dataset name (default: from the annotation file)")
    p = command("encode", help="embed images or texts into the OLD space with an "
                                      "exported query encoder")
    p.add_argument("--encoder", required=True, help="query_encoder.safetensors from stage 2")
    p.add_argument("--modality", required=True, choices=["image", "text"])
    p.add_argument("--input", required=True, help="shard dir or glob (parquet or tar)")
    p.add_argument("--out", required=True, help="cache root the embeddings are written under")
    p.add_argument("--config", help="YAML config (embed.* settings, ray_address)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p = command("sweep", help="Ray Tune sweep (ASHA) of stage 1 + psi-only stage 2 on "
                                     "the embedding cache; leaderboard and best config")
    p.add_argument("--config", help="YAML config (default: built-in demo defaults)")
    p.add_argument("--space", required=True, help="search space YAML, e.g. tune/space.yaml")
    p.add_argument("--num-samples", type=int, help="samples of the space (default: "
                                                    "sweep.num_samples)")
    p.add_argument("--run-name", help="name of the sweep (output dir, MLflow parent run)")
    p.add_argument("--embeddings", help="a manifest (YAML) of embedding exports per role "
                                        "(sets data.embeddings): no shards, no encoder")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p = command("compare", help="the compatibility tables of MLflow runs side by side")
    p.add_argument("runs", nargs="+", help="MLflow run names or ids")
    p.add_argument("--experiment", help="experiment to look run names up in (default: all)")
    p.add_argument("--spread", action="store_true",
                   help="one line per method: each cell's median (min-max) over the runs "
                        "(runs that differ only in their seed)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's "
                                          "tracking.tracking_uri, else sqlite mlflow.db here)")
    p.add_argument("--config", help="YAML config (its tracking.* section)")
    p.set_defaults(overrides=[])
    return parser


def encode(args, config) -> None:
    from xbt_ray.data import shards
    from xbt_ray.data.embed import embed_shards
    from xbt_ray.models.query_encoder import as_model_config
    from xbt_ray.pipeline import init_ray

    model = as_model_config(args.encoder)
    init_ray(config)
    result = embed_shards(shards.list_shards(args.input), args.modality, model, args.out,
                          config.embed)
    print(f"{result.directory}\n{result.counts}")


def report(args, config) -> None:
    """Evaluate from embeddings, write the report files, log them to MLflow, print the table."""
    from pathlib import Path

    import mlflow

    from xbt_ray import tracking
    from xbt_ray.eval.report import console_summary, write_report
    from xbt_ray.eval.suite import evaluate, load_inputs

    inputs = load_inputs(args.inputs)
    out_dir = Path(args.out) if args.out else config.run_dir
    with tracking.start_run(config):
        result = evaluate(inputs, config.eval, config.seed)
        paths = write_report(result, out_dir)
        tracking.log_report(result)
        for path in paths.values():
            mlflow.log_artifact(str(path))
    print(console_summary(result, paths))


def eval_data(args) -> None:
    from xbt_ray.data.eval_sets import prepare_eval_split

    manifest = prepare_eval_split(args.format, args.annotations, args.images, args.protocol,
                                  args.out, dataset=args.dataset)
    print(f"{args.out}: {manifest['dataset']} ({manifest['protocol']}), "
          f"{manifest['images']} images, {manifest['captions']} captions, "
          f"skipped {manifest['skipped']}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console.setup(args.verbose)
    try:
        if args.command == "eval-data":
            eval_data(args)
            return 0
        run_name = getattr(args, "run_name", None)
        config_path = args.config
        if getattr(args, "smoke", False):
            if args.config:
                raise ConfigError("--smoke replaces --config: pass one of them")
            config_path, run_name = SMOKE_CONFIG, run_name or "smoke"
        overrides = list(args.overrides) + ([f"run_name={run_name}"] if run_name else [])
        if getattr(args, "embeddings", None):
            overrides.append(f"data.embeddings={Path(args.embeddings).absolute()}")
        config = load_config(config_path, overrides)
        if args.command not in ("compare", "encode"):
            log_dir = console.log_to(Path(args.out) if getattr(args, "out", None)
                                     else config.run_dir)
            logging.getLogger(__name__).info(
                "xbt %s: logs in %s (training progress: tail -f %s)", args.command, log_dir,
                log_dir / "train.log")
        if args.command in ("run", "embed", "stage1", "stage2"):
            from xbt_ray.pipeline import run_pipeline

            run_pipeline(config, until="evaluate" if args.command == "run" else args.command)
        elif args.command == "encode":
            encode(args, config)
        elif args.command == "report" and args.embeddings:
            from xbt_ray.pipeline import run_pipeline

            run_pipeline(config, until="evaluate", train=False)
        elif args.command == "report":
            if not args.inputs:
                raise ConfigError("xbt report needs --inputs or --embeddings")
            report(args, config)
        elif args.command == "sweep":
            from xbt_ray.sweep import run_sweep

            run_sweep(config, args.space, args.num_samples)
        elif args.command == "compare":
            from xbt_ray import tracking
            from xbt_ray.compare import compare_runs, format_comparison, format_spread

            tables = compare_runs(args.runs, args.tracking_uri or tracking.tracking_uri(config),
                                  args.experiment)
            print(format_spread(tables) if args.spread else format_comparison(tables))
        elif args.command == "world":
            from xbt_ray.pipeline import build_demo_world

            print(build_demo_world(config))
    except (ConfigError, FileNotFoundError) as err:
        print(f"xbt: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
