"""`ray job submit -- python jobs/sweep.py --config configs/demo.yaml --space tune/space.yaml
[--num-samples N] [key=value ...]`

A Ray Tune sweep as one Ray job: the embedding step (caches reused), then the trials; prints the
leaderboard and writes the best config (runs/<run_name>/best.yaml).
"""
import sys

from xbt_ray.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
