"""`ray job submit -- python jobs/stage2.py --config configs/demo.yaml [key=value ...]`

Step 'stage2' (and the steps before it, reused when finished) as one Ray job.
"""
import sys

from xbt_ray.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["stage2", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
