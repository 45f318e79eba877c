"""`ray job submit -- python jobs/evaluate.py --inputs runs/<run>/eval_inputs.json [key=value ...]`

The evaluation suite from embeddings alone (no encoder): compatibility table with baselines,
flip rates, partial-backfill curves; report files and MLflow. Same arguments as `xbt report`.
"""
import sys

from xbt_ray.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
