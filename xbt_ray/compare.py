"""`xbt compare`: the compatibility tables of several MLflow runs (pipeline runs, sweep trials),
lined up side by side (`compare_runs`, `format_comparison`), or summarised over runs that differ
only in their seed as the median and range of every cell (`spread`, `format_spread`; `xbt compare
--spread`), which is how the README's demo table is made."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xbt_ray.config import ConfigError
from xbt_ray.eval.report import markdown_table


def find_run(client, ref: str, experiment: str | None = None):
    """An MLflow run by id, or the latest run of that name (in `experiment`, else anywhere)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(ref)
    except MlflowException:
        pass
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ConfigError(f"no MLflow experiment named '{experiment}'")
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    quoted = ref.replace("'", "\\'")
    runs = client.search_runs(ids, f"attributes.run_name = '{quoted}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ConfigError(f"no MLflow run with id or name '{ref}'"
                          + (f" in experiment '{experiment}'" if experiment else ""))
    return runs[0]


def _rows_from_metrics(metrics: dict) -> list[dict]:
    """Report rows rebuilt from a run's logged metrics (tracking.log_report's names)."""
    import re

    pattern = re.compile(r"^(?P<method>.+)\.(?P<d>i2t|t2i)\.(?P<m>R\d+)$")
    rows: dict[str, dict] = {}
    for name, value in metrics.items():
        match = pattern.match(name)
        if not match or "." in match["method"]:  # e.g. xbt_to_old.gain.i2t.R1
            continue
        row = rows.setdefault(match["method"], {"method": match["method"].replace("_to_", "->"),
                                                 "i2t": {}, "t2i": {}})
        row[match["d"]][match["m"]] = value
    out = []
    for key, row in rows.items():
        row["rsum"] = metrics.get(f"{key}.rsum")
        cells = metrics.get(f"{key}.cells_passed")
        row["cells_passed"] = None if cells is None else int(cells)
        row["gain_r1"] = {d: metrics.get(f"{key}.gain.{d}.R1") for d in ("i2t", "t2i")}
        out.append(row)
    return out


def _rows_from_report(report: dict) -> list[dict]:
    from xbt_ray.eval.report import cells_passed

    rows = []
    for row in report["rows"]:
        gain = row.get("update_gain") or {}
        rows.append({"method": row["method"], "i2t": row["i2t"], "t2i": row["t2i"],
                     "rsum": row.get("rsum"), "cells_passed": cells_passed(row),
                     "gain_r1": {d: gain.get(d, {}).get("R1") for d in ("i2t", "t2i")}})
    return rows


def _report_artifact(run_id: str, tracking_uri: str) -> dict:
    import os

    import mlflow

    key, before = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get(
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[key] = "false"  # no progress bar on stderr for one small file
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="report.json",
                                                   tracking_uri=tracking_uri)
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
    return json.loads(Path(path).read_text())


def compare_runs(refs: list[str], tracking_uri: str, experiment: str | None = None) -> list[dict]:
    """[{run, run_id, source, rows}] per run: its report.json artifact when it has one, else its
    logged metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    tables = []
    for ref in refs:
        run = find_run(client, ref, experiment)
        run_id = run.info.run_id
        names = {a.path for a in client.list_artifacts(run_id)}
        if "report.json" in names:
            rows, source = _rows_from_report(_report_artifact(run_id, tracking_uri)), "report.json"
        else:
            rows, source = _rows_from_metrics(run.data.metrics), "metrics"
        if not rows:
            raise ConfigError(f"MLflow run '{ref}' ({run_id}) has no compatibility table")
        tables.append({"run": run.info.run_name or run_id, "run_id": run_id, "source": source,
                       "rows": rows})
    return tables


def format_comparison(tables: list[dict]) -> str:
    """Markdown: per method, one line per run (in the order given): R@1/5/10 both directions,
    RSUM, cells passing the strict criterion, and the primary metric (mean R@1 gain)."""
    methods: list[str] = []
    for table in tables:
        methods += [r["method"] for r in table["rows"] if r["method"] not in methods]
    metrics = ["R1", "R5", "R10"]
    header = (["method", "run"] + [f"{d.upper()} {m}" for d in ("i2t", "t2i") for m in metrics]
              + ["RSUM", "cells ✓", "gain R1"])

    def num(v, digits=1):
        return "-" if v is None else f"{v:.{digits}f}"

    body = []
    for method in methods:
        for table in tables:
            row = next((r for r in table["rows"] if r["method"] == method), None)
            if row is None:
                continue
            body.append([method, table["run"]]
                        + [num(row[d].get(m)) for d in ("i2t", "t2i") for m in metrics]
                        + [num(row["rsum"]),
                           "-" if row["cells_passed"] is None
                           else f"{row['cells_passed']}/{len(row['i2t']) + len(row['t2i'])}",
                           num(_primary(row), 3)])
    return "\n".join(markdown_table(header, body))


def _primary(row: dict) -> float | None:
    """The sweep's primary metric: the mean R@1 update gain over both directions."""
    gains = list(row["gain_r1"].values())
    return None if None in gains else float(np.mean(gains))


def spread(tables: list[dict]) -> list[dict]:
    """Per method present in every run (in the first run's order): each cell's median, min and
    max over the runs, {"method", "cells": {name: (median, min, max) | None}}. Cells: "I2T R1"
    ... "T2I R10" (recall in %), "RSUM", "gain I2T R1" / "gain T2I R1" (update gain at R@1) and
    "cells ✓" (cells passing the strict criterion); None where a run lacks the value.
    Raises ConfigError for fewer than two runs (no spread to show)."""
    if len(tables) < 2:
        raise ConfigError("a spread needs at least two runs")
    by_run = [{r["method"]: r for r in t["rows"]} for t in tables]
    out = []
    for method in [r["method"] for r in tables[0]["rows"]]:
        rows = [runs.get(method) for runs in by_run]
        if any(r is None for r in rows):
            continue
        cells = {}
        for name, value in _cells(rows[0]).items():
            values = [_cells(r)[name] for r in rows]
            cells[name] = (None if None in values else
                           (float(np.median(values)), float(min(values)), float(max(values))))
        out.append({"method": method, "cells": cells})
    return out


def _cells(row: dict) -> dict:
    recalls = {f"{d.upper()} {m}": row[d].get(m) for d in ("i2t", "t2i") for m in row[d]}
    gain = row["gain_r1"]
    return {**recalls, "RSUM": row["rsum"], "gain I2T R1": gain.get("i2t"),
            "gain T2I R1": gain.get("t2i"), "cells ✓": row["cells_passed"]}


def format_spread(tables: list[dict]) -> str:
    """Markdown: `spread(tables)` as "median (min–max)" per cell (recalls and RSUM with one
    decimal, gains with two), under a line naming the runs."""
    summary = spread(tables)
    names = list(summary[0]["cells"]) if summary else []

    def cell(name, value):
        if value is None:
            return "-"
        digits = 2 if name.startswith("gain") else 0 if name == "cells ✓" else 1
        median, low, high = (f"{v:.{digits}f}" for v in value)
        return median if low == high else f"{median} ({low}–{high})"

    body = [[s["method"]] + [cell(n, s["cells"][n]) for n in names] for s in summary]
    runs = ", ".join(t["run"] for t in tables)
    return "\n".join([f"median (min–max) over {len(tables)} runs: {runs}", ""]
                     + markdown_table(["method"] + names, body))
