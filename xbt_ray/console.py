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

What still reaches the console by default, because a person must see it: any ERROR record (Ray
Tune's failed-trial tracebacks included), warnings of Ray Train and Ray Tune, and the worker
output Ray needs to be seen: autoscaler events (e.g. a placement group no node can fit), the
Train controller's lines on failures (retries after a worker failure, start-up timeouts for
lack of resources) and worker lines that carry a traceback, an error or a crash signal, or a
warning of the project's own. Raylet error pushes (a worker killed for memory), Ray's own C++
error lines and the exception a failed run raises are printed by Ray and Python as always.

`--verbose` brings everything back to the console as well (the files are written either way).
Worker output reaches the driver through Ray's log streaming (`log_to_driver`); this module adds
a writer of the files above to Ray's dispatcher of worker output and, unless verbose, puts a
filter in front of Ray's own console printer (a Ray internal, `global_worker_stdstream_dispatcher`
and `print_to_stdstream`, checked at start: if they move, Ray's printer stays as it is and the
console is merely noisier).
"""
from __future__ import annotations

import functools
import logging
import re
import sys
import threading
from pathlib import Path

PROJECT = "xbt_ray"
# the loggers whose INFO lines the console shows; other xbt_ray modules' INFO lines (joins,
# cache hits, per-job counts) go to driver.log only, their warnings to both
CONSOLE_LOGGERS = ("xbt_ray.cli", "xbt_ray.pipeline", "xbt_ray.sweep")
# Ray libraries whose warnings a person must see (trial failures, resource shortfalls)
RAY_WARNINGS = ("ray.train", "ray.tune")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_RAY_PRINTER = "ray_print_logs"   # the name Ray registers its worker-output printer under
_FILES = "xbt_worker_output_files"
# worker lines shown on the console even when quiet: tracebacks, errors, the project's own
# warnings (library warnings such as DeepSpeed's start-up notices stay in workers.log)
# the Train controller's lines about failures and resources (not its routine start-up lines)
_CONTROLLER_ALARM = re.compile(r"FailurePolicy|[Rr]etr(y|ies|ying)|timed out|[Ii]nsufficient"
                               r"|not enough|[Ff]ailed")
_ALARM = re.compile(r"Traceback|\bERROR\b|Error:|Exception:|Killed|OutOfMemory"
                    r"|\*\*\* SIG[A-Z]+ received|Fatal Python error"   # a worker process crashed
                    r"|\bWARNING " + PROJECT + r"\.")
# error lines that are not: the GCS failing to kill an actor that had already exited (Ray Data's
# shuffle aggregators at the end of a join or group-by: "KillActor RPC failed ... Socket closed")
_BENIGN = re.compile(r"Failed to kill actor .*Socket closed")


def _within(name: str, parent: str) -> bool:
    return name == parent or name.startswith(parent + ".")


class _ProjectOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if any(_within(record.name, c) for c in CONSOLE_LOGGERS):
            return True
        if record.levelno >= logging.WARNING:
            return any(_within(record.name, p) for p in (PROJECT, *RAY_WARNINGS))
        return False


def setup(verbose: bool = False) -> None:
    """Console logging for a command: project lines at INFO (all records with `verbose`).
    Python warnings become log records (they reach the console only with `verbose`)."""
    global _verbose
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
    _verbose = verbose


_verbose = True          # until setup() runs (library use, tests): nothing is hidden
_log_dir: Path | None = None
_worker_output = None


def log_to(run_dir: Path) -> Path:
    """Keep every driver log record at INFO and above in `run_dir/logs/driver.log`
    (idempotent per directory). Returns the logs directory."""
    global _log_dir
    log_dir = Path(run_dir).absolute() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if _log_dir != log_dir:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_xbt_file", False)]:
            root.removeHandler(handler)
            handler.close()
        file = logging.FileHandler(log_dir / "driver.log", encoding="utf-8")
        file.setLevel(logging.INFO)
        file.setFormatter(logging.Formatter(FORMAT))
        file._xbt_file = True
        root.addHandler(file)
        _log_dir = log_dir
    return log_dir


def _through_root(library: str) -> None:
    """Make `library`'s loggers log through the root logger's handlers: a library that installs
    its own console handler (Ray, MLflow) would otherwise print past the console's filter."""
    for name in [n for n in logging.Logger.manager.loggerDict if _within(n, library)]:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers
                        if isinstance(h, logging.StreamHandler)
                        and not isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)
        logger.propagate = True


def quiet_mlflow() -> None:
    """After `import mlflow`: its loggers (e.g. the store's "Creating initial MLflow database
    tables" lines) go to driver.log, and to the console only as errors (or with `verbose`).
    Does nothing before `log_to`."""
    if _log_dir is not None:
        _through_root("mlflow")


def quiet_ray() -> None:
    """Around `ray.init`: Ray's driver-side loggers (Ray Data's included, imported here so its
    own console handler is in place to be removed) log through the root logger at INFO, and
    worker output is written to `workers.log` / `train.log`; unless verbose, only the worker
    output a person must see (module doc) still reaches the console. Does nothing before
    `log_to`."""
    if _log_dir is None:
        return
    import ray.data  # noqa: F401  (configures the "ray.data" logger on import)

    _through_root("ray")
    logging.getLogger("ray.data").setLevel(logging.INFO)
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray._private.worker import print_to_stdstream
    except ImportError:
        logging.getLogger(__name__).warning("Ray's worker-output dispatcher moved: worker "
                                            "output stays on the console, not in %s", _log_dir)
        return
    global _worker_output
    if _worker_output is None or _worker_output.log_dir != _log_dir:
        _worker_output = _WorkerOutput(_log_dir)
    dispatcher.remove_handler(_FILES)
    dispatcher.add_handler(_FILES, _worker_output)
    if not _verbose and any(name == _RAY_PRINTER for name, _ in dispatcher.handlers):
        dispatcher.remove_handler(_RAY_PRINTER)
        dispatcher.add_handler(_RAY_PRINTER, functools.partial(
            _print_alarms, functools.partial(print_to_stdstream, ignore_prefix=False)))


def _print_alarms(printer, batch: dict) -> None:
    """Ray's console printer, for the worker output a person must see (module doc) only."""
    if batch.get("pid") == "autoscaler":
        printer(batch)
        return
    controller = str(batch.get("actor_name") or "").startswith("TrainController")
    lines = [line for line in batch.get("lines", []) if not _BENIGN.search(line) and (
             _ALARM.search(line) or (controller and _CONTROLLER_ALARM.search(line)))]
    if lines:
        printer(dict(batch, lines=lines))


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
    """Ray worker output batches (dicts with `lines`, `pid`, `actor_name`/`task_name`) -> files.
    Never raises: an exception here would end Ray's log-streaming thread."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.lock = threading.Lock()
        self.all = open(log_dir / "workers.log", "a", buffering=1, encoding="utf-8",
                        errors="replace")
        self.train = open(log_dir / "train.log", "a", buffering=1, encoding="utf-8",
                          errors="replace")

    def __call__(self, batch: dict) -> None:
        try:
            who = batch.get("actor_name") or batch.get("task_name") or ""
            prefix = f"({who} pid={batch.get('pid')}) "
            with self.lock:
                for line in batch.get("lines", []):
                    self.all.write(prefix + line + "\n")
                    if f" {PROJECT}." in line:
                        self.train.write(line + "\n")
        except Exception as err:  # disk full, a closed file: say so on the console, go on
            print(f"xbt: worker output not written to {self.log_dir}: {err}", file=sys.stderr)
