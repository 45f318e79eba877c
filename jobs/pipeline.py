"""`ray job submit -- python jobs/pipeline.py --config configs/demo.yaml [key=value ...]`

The whole chain (embed -> stage 1 -> evaluate) as one Ray job; finished steps are reused.
"""
import sys

from xbt_ray.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
