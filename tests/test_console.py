"""The quiet console: project lines on stderr, everything else kept under runs/<run>/logs/."""
import logging
import warnings

import pytest

from xbt_ray import console


@pytest.fixture
def restore_logging():
    """Undo what `setup`, `log_to`, `quiet_ray` and `quiet_mlflow` change: root handlers and
    level, the Ray and MLflow loggers' handlers and propagation (each library, once imported,
    has its own console handler and does not propagate), Ray's worker-output handlers."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import mlflow  # noqa: F401  (installs its console handler, as in a pipeline run)

    library_loggers = {name: (list(logging.getLogger(name).handlers),
                              logging.getLogger(name).propagate, logging.getLogger(name).level)
                       for name in list(logging.Logger.manager.loggerDict)
                       if name.split(".")[0] in ("ray", "mlflow")}
    worker_handlers = list(dispatcher.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    for name, (kept, propagate, lvl) in library_loggers.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = kept
        logger.propagate, logger.level = propagate, lvl
    dispatcher.handlers = worker_handlers
    logging.captureWarnings(False)
    if console._worker_output is not None:
        console._worker_output.all.close()
        console._worker_output.train.close()
    console._verbose, console._log_dir, console._worker_output = True, None, None


def quiet_command(tmp_path, verbose):
    """What `xbt <command>` does before its first Ray call."""
    console.setup(verbose=verbose)
    log_dir = console.log_to(tmp_path / "run")
    console.quiet_ray()
    return log_dir


def test_console_shows_project_lines_and_the_file_keeps_everything(tmp_path, capsys,
                                                                  restore_logging):
    log_dir = quiet_command(tmp_path, verbose=False)
    logging.getLogger("xbt_ray.pipeline").info("step stage1 done in 3.0 s")
    logging.getLogger("xbt_ray.data.paired").info("join details")
    logging.getLogger("xbt_ray.data.cache").warning("skipped 2 rows")
    logging.getLogger("ray.xbt_test_library").info("Execution finished")
    warnings.warn("a library's deprecation notice", FutureWarning)
    err = capsys.readouterr().err
    assert "step stage1 done" in err and "skipped 2 rows" in err
    assert "join details" not in err and "Execution finished" not in err
    assert "deprecation notice" not in err
    kept = (log_dir / "driver.log").read_text()
    for line in ("step stage1 done", "join details", "skipped 2 rows", "Execution finished",
                 "deprecation notice"):
        assert line in kept


def test_mlflow_store_lines_go_to_the_file_not_the_console(tmp_path, capfd, restore_logging):
    """MLflow prints through its own handler (set up when it is imported, on the process's
    stderr: capfd, not capsys, sees it); after `quiet_mlflow` its lines reach driver.log only."""
    log_dir = quiet_command(tmp_path, verbose=False)
    console.quiet_mlflow()
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    logging.getLogger("mlflow.tracking").error("the tracking server refused the run")
    err = capfd.readouterr().err
    assert "Creating initial MLflow database tables" not in err
    assert "the tracking server refused the run" in err
    assert "Creating initial MLflow database tables" in (log_dir / "driver.log").read_text()


def test_verbose_console_shows_everything(tmp_path, capsys, restore_logging):
    quiet_command(tmp_path, verbose=True)
    logging.getLogger("ray.xbt_test_library").info("Execution finished")
    logging.getLogger("xbt_ray.data.paired").info("join details")
    err = capsys.readouterr().err
    assert "Execution finished" in err and "join details" in err


def test_worker_output_goes_to_files_and_progress_lines_to_train_log(tmp_path):
    out = console._WorkerOutput(tmp_path)
    out({"pid": 7, "actor_name": "RayTrainWorker", "lines": [
        "[WARNING] DeepSpeed accelerator notice",
        "2026-12-01 10:00:00,000 xbt_ray.train.distributed: stage1 step 50/400 loss 1.2"]})
    out({"pid": 8, "task_name": "ReadFiles", "lines": ["Reporting training result"]})
    everything = (tmp_path / "workers.log").read_text().splitlines()
    assert everything == [
        "(RayTrainWorker pid=7) [WARNING] DeepSpeed accelerator notice",
        "(RayTrainWorker pid=7) 2026-12-01 10:00:00,000 xbt_ray.train.distributed: stage1 step "
        "50/400 loss 1.2",
        "(ReadFiles pid=8) Reporting training result"]
    assert (tmp_path / "train.log").read_text().splitlines() == [
        "2026-12-01 10:00:00,000 xbt_ray.train.distributed: stage1 step 50/400 loss 1.2"]


def test_errors_and_ray_train_warnings_still_reach_the_quiet_console(tmp_path, capsys,
                                                                    restore_logging):
    quiet_command(tmp_path, verbose=False)
    logging.getLogger("ray.tune").error("Trial task failed: Traceback ...")
    logging.getLogger("ray.train").warning("worker group start-up timed out")
    logging.getLogger("ray.xbt_test_library").warning("a Ray Data notice")
    err = capsys.readouterr().err
    assert "Trial task failed" in err and "start-up timed out" in err
    assert "Ray Data notice" not in err


def test_quiet_console_prints_only_the_worker_output_a_person_must_see():
    printed = []
    batches = [
        {"pid": 7, "actor_name": "RayTrainWorker", "lines": [
            "[WARNING] async_io requires the dev libaio .so object",
            "2026-12-01 10:00:00 INFO xbt_ray.train.distributed: stage1 step 50/400",
            "Traceback (most recent call last):", "RuntimeError: boom",
            "2026-12-01 10:00:01 WARNING xbt_ray.train.distributed: MLflow logging off"]},
        {"pid": "autoscaler", "lines": ["No available node types can fulfill the request"]},
        {"pid": 9, "actor_name": "TrainController", "lines": [
            "Requesting resources: {'CPU': 0.5} * 2", "[FailurePolicy] RETRY"]},
        {"pid": 8, "task_name": "ReadFiles", "lines": ["Reporting training result"]},
        {"pid": 10, "actor_name": "HashShuffleMap", "lines": [   # a crash, seen in a demo run
            "[mutex.cc : 452] RAW: Lock blocking 0x55e68b338dd0",
            "*** SIGABRT received at time=1796197221 on cpu 1 ***",
            "Fatal Python error: Aborted"]},
        {"pid": "gcs_server", "lines": [
            "[2026-12-02 01:34:17,780 E 29150 29150] (gcs_server) gcs_actor_scheduler.cc:538: "
            "Failed to kill actor e474, return status: Invalid: KillActor RPC failed for actor "
            "e474: RpcError: RPC error: Socket closed rpc_code: 14",
            "[2026-12-02 01:34:18,000 E 29150 29150] (gcs_server) gcs_server.cc:1: "
            "RpcError: lost the store"]},
    ]
    for batch in batches:
        console._print_alarms(printed.append, batch)
    assert [b["lines"] for b in printed] == [
        ["Traceback (most recent call last):", "RuntimeError: boom",
         "2026-12-01 10:00:01 WARNING xbt_ray.train.distributed: MLflow logging off"],
        ["No available node types can fulfill the request"],
        ["[FailurePolicy] RETRY"],
        ["*** SIGABRT received at time=1796197221 on cpu 1 ***", "Fatal Python error: Aborted"],
        ["[2026-12-02 01:34:18,000 E 29150 29150] (gcs_server) gcs_server.cc:1: "
         "RpcError: lost the store"]]
