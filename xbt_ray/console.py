"""What the console shows, and where everything else goes.

By default the console (stderr) carries the project's own lines only: the commands' own loggers
at INFO (`CONSOLE_LOGGERS`: a line per step start and end with its time, where the files are),
warnings of any `xbt_ray` module, and what the commands print (the counts, the final table).
Everything else is kept, not dropped, under `runs/<run>/logs/`:

- `driver.log`: every log record of the driver process (Ray, Ray Data, MLflow, Python warnings),
  the project's own lines included;
- `workers.log`: every line the Ray workers print (Ray Train's result dumps, DeepSpeed's
  accelerator notices, raylet messages), as Ray would have streamed them to the console;
- `train.log`: the project's lines among them: rank 0's progress (step / total, loss, lr, rows/s,
  ETA) and epoch lines of every training run. `tail -f` it to watch a run.

`--verbose` brings everything back to the console as well. Worker output reaches the driver
through Ray's log streaming (`log_to_driver`); this module swaps Ray's console printer for one
that writes the files above (a Ray internal, `global_worker_stdstream_dispatcher`, checked at
start: if it is missing, Ray's own printer stays and the console is merely noisier).
"""
from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

PROJECT = "xbt_ray"
# the loggers whose INFO lines the console shows; other xbt_ray modules' INFO lines (joins,
# cache hits, per-job counts) go to driver.log only, their warnings to both
CONSOLE_LOGGERS = ("xbt_ray.cli", "xbt_ray.pipeline", "xbt_ray.sweep")
FORMAT = "%(asctime)s %(name)s: %(message)s"
_RAY_PRINTER = "ray_print_logs"   # the name Ray registers its worker-output printer under


def _within(name: str, parent: str) -> bool:
    return name == parent or name.startswith(parent + ".")


class _ProjectOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if any(_within(record.name, c) for c in CONSOLE_LOGGERS):
            return True
        return _within(record.name, PROJECT) and record.levelno >= logging.WARNING


def setup(verbose: bool = False) -> None:
    """Console logging for a command: project lines at INFO (all records with `verbose`).
    Python warnings become log records (they reach the console only with `verbose`)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in [h for h in root.handlers if getattr(h, "_xbt_console", False)]:
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    console._xbt_console = True
    if not verbose:
        console.addFilter(_ProjectOnly())
    root.addHandler(console)
    logging.captureWarnings(True)
    global _verbose
    _verbose = verbose


_verbose = True          # until setup() runs (library use, tests): nothing is hidden
_log_dir: Path | None = None
_worker_output = None


def log_to(run_dir: Path) -> Path:
    """Keep every driver log record in `run_dir/logs/driver.log` (idempotent per directory).
    Returns the logs directory."""
    global _log_dir
    log_dir = Path(run_dir).absolute() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if _log_dir != log_dir:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_xbt_file", False)]:
            root.removeHandler(handler)
            handler.close()
        file = logging.FileHandler(log_dir / "driver.log")
        file.setFormatter(logging.Formatter(FORMAT))
        file._xbt_file = True
        root.addHandler(file)
        _log_dir = log_dir
    return log_dir


def quiet_ray() -> None:
    """After `ray.init`: Ray's driver-side loggers log through the root logger (the file; the
    console only with `verbose`), and worker output goes to `workers.log` / `train.log` instead
    of the console. Does nothing in verbose mode or before `log_to`."""
    if _verbose or _log_dir is None:
        return
    for name in [n for n in logging.Logger.manager.loggerDict if n == "ray" or
                 n.startswith("ray.")]:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers
                        if isinstance(h, logging.StreamHandler)
                        and not isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)
        logger.propagate = True
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        logging.getLogger(__name__).warning("Ray's worker-output dispatcher moved: worker "
                                            "output stays on the console")
        return
    global _worker_output
    if _worker_output is None or _worker_output.log_dir != _log_dir:
        _worker_output = _WorkerOutput(_log_dir)
    dispatcher.remove_handler(_RAY_PRINTER)
    dispatcher.add_handler(_RAY_PRINTER, _worker_output)


def worker_logging() -> None:
    """In a Ray worker: the project's records (rank 0's progress) to stderr, in the format the
    driver's `train.log` picks them out by."""
    logger = logging.getLogger(PROJECT)
    if not any(getattr(h, "_xbt_worker", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._xbt_worker = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _WorkerOutput:
    """Ray worker output batches (dicts with `lines`, `pid`, `actor_name`/`task_name`) -> files."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.lock = threading.Lock()
        self.all = open(log_dir / "workers.log", "a", buffering=1)
        self.train = open(log_dir / "train.log", "a", buffering=1)

    def __call__(self, batch: dict) -> None:
        who = batch.get("actor_name") or batch.get("task_name") or ""
        prefix = f"({who} pid={batch.get('pid')}) "
        with self.lock:
            for line in batch.get("lines", []):
                self.all.write(prefix + line + "\n")
                if f" {PROJECT}." in line:
                    self.train.write(line + "\n")
