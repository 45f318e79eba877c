"""The evaluation report: rows of report.json (schema in design/method.md), a markdown table,
a CSV, a compatibility heatmap and the partial-backfill curves."""
from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path

from xbt_ray.eval import methods
from xbt_ray.eval.retrieval import DIRECTIONS, compatible, rsum, update_gain

REFERENCE_METHODS = methods.REFERENCES


def make_row(method, query, gallery, needs_old_encoder, recalls, old_old=None,
             new_new=None) -> dict:
    """One report row; `recalls` is a cell {"i2t": {...}, "t2i": {...}}.

    Non-reference rows get `compatible` when old_old is given and `update_gain` when both
    old_old and new_new are; every row gets `rsum`.
    """
    row = {"method": method, "query": query, "gallery": gallery,
           "needs_old_encoder": bool(needs_old_encoder),
           **{d: {m: float(v) for m, v in recalls[d].items()} for d in DIRECTIONS}}
    if method not in REFERENCE_METHODS and old_old is not None:
        row["compatible"] = compatible(recalls, old_old)
        if new_new is not None:
            row["update_gain"] = update_gain(recalls, old_old, new_new)
    row["rsum"] = rsum(recalls)
    return row


def build_report(dataset, protocol, n_images, n_captions, rows) -> dict:
    """The report.json document."""
    return {"dataset": dataset, "protocol": protocol, "n_images": int(n_images),
            "n_captions": int(n_captions), "rows": list(rows)}


def cells_passed(row) -> int | None:
    """How many cells pass the strict criterion (None for old->old / new->new)."""
    if "compatible" not in row:
        return None
    return sum(ok for d in DIRECTIONS for ok in row["compatible"][d].values())


def _recall(row, d, m) -> str:
    text = f"{row[d][m]:.1f}"
    if "compatible" in row:
        text += " ✓" if row["compatible"][d][m] else " ✗"
    return text


def _gain(row, d, m) -> str:
    value = row.get("update_gain", {}).get(d, {}).get(m)
    return "-" if value is None else f"{value:.2f}"


def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    """Lines of a markdown table, columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in body]


def compatibility_table(report) -> str:
    """Markdown: the title, the compatibility table (✓/✗ = strict criterion vs old->old) and the
    note on rows left out: what the console shows of a report."""
    rows = report["rows"]
    metrics = list(rows[0]["i2t"]) if rows else ["R1", "R5", "R10"]
    first = metrics[0]
    header = (["method", "needs old enc"]
              + [f"{d.upper()} {m}" for d in DIRECTIONS for m in metrics]
              + ["RSUM", f"gain I2T {first}", f"gain T2I {first}", "cells ✓"])
    body = [[row["method"], "yes" if row["needs_old_encoder"] else "no"]
            + [_recall(row, d, m) for d in DIRECTIONS for m in metrics]
            + [f"{row.get('rsum', rsum(row)):.1f}", _gain(row, "i2t", first),
               _gain(row, "t2i", first),
               "-" if cells_passed(row) is None else f"{cells_passed(row)}/{2 * len(metrics)}"]
            for row in rows]
    title = (f"**{report['dataset']}** ({report['protocol']}; {report['n_images']} images, "
             f"{report['n_captions']} captions)")
    out = [title, ""] + markdown_table(header, body)
    note = data_note(report.get("data") or {})
    if note:
        out += ["", note]
    return "\n".join(out)


def format_table(report) -> str:
    """Markdown, the whole report (report.md): `compatibility_table`, then flips and baseline
    fits, partial backfill, costs, precision, and published numbers where they apply."""
    rows = report["rows"]
    out = [compatibility_table(report)]
    flipped = [r for r in rows if "flips" in r]
    if flipped:
        out += ["", "Flip rates at R@1 against old->old (PFR: newly right, NFR: newly wrong, "
                "% of queries), and how each baseline was fitted:", ""]
        out += markdown_table(["method", "I2T PFR", "I2T NFR", "T2I PFR", "T2I NFR", "fit"],
                         [[r["method"]] + [f"{r['flips'][d][k]:.1f}" for d in DIRECTIONS
                                           for k in ("PFR", "NFR")]
                          + [", ".join(f"{k}={v}" for k, v in r.get("fit", {}).items()
                                       if not isinstance(v, dict)) or "-"]
                          for r in flipped])
    if report.get("backfill"):
        out += ["", "Partial backfill: R@1 AUC over the re-embedded gallery fraction. In the old "
                "space: the method's embeddings of gallery items (random order / most-changed "
                "first). To new: the migration to the new model, re-embedded items searched "
                "with the native new query, the rest with the method's query, merged by "
                "calibrated score (random order; ends at new->new):", ""]
        body = []
        for method, bf in report["backfill"].items():
            to_new = bf.get("migration")
            body.append([method] + [f"{bf['auc'][d][o]:.1f}" for d in DIRECTIONS
                                    for o in ("random", "distance")]
                        + [f"{bf['r1'][d]['random'][-1]:.1f}" for d in DIRECTIONS]
                        + [f"{to_new['auc'][d]:.1f}" if d in (to_new or {}).get("auc", {})
                           else "-" for d in DIRECTIONS])
        out += markdown_table(["method", "I2T AUC random", "I2T AUC distance", "T2I AUC random",
                               "T2I AUC distance", "I2T R1 at 100%", "T2I R1 at 100%",
                               "I2T AUC to new", "T2I AUC to new"], body)
    costed = [r for r in rows if "cost" in r]
    if costed:
        out += ["", "Cost: old-model forward passes each method needed (training and support "
                "items only; the gallery is never re-embedded):", ""]
        out += markdown_table(["method", "old forward passes", "needs old enc at query time"],
                         [[r["method"], f"{r['cost']['old_forward_passes']:,}",
                           "yes" if r["needs_old_encoder"] else "no"] for r in costed])
        if "full_backfill" in report:
            fb = report["full_backfill"]
            out += ["", f"A full backfill of this evaluation gallery instead re-embeds "
                        f"{fb['items']:,} items with the new model ({fb['images']:,} images + "
                        f"{fb['captions']:,} captions)."]
    if report.get("precision"):
        out += precision_lines(report["precision"])
    published = published_rows(report["dataset"], report["protocol"])
    if published:
        out += ["", f"Published R@1 on {report['dataset']} ({report['protocol']}, "
                    f"old = CLIP ViT-B/32; from design/method.md):", ""]
        out += markdown_table(["method", "new model", "I2T R1", "T2I R1", "needs old enc",
                               "source"],
                         [[p["method"], p["new_model"] or "-", p["i2t_R1"], p["t2i_R1"],
                           p["needs_old_encoder"], p["source"]] for p in published])
    return "\n".join(out)


def precision_section(run: dict, check: dict, run_precision: str, check_precision: str) -> dict:
    """The report's `precision` section: each cell of the report `run` (encoders at
    `run_precision`) beside the same cell of `check`, the same evaluation with the split and the
    query encoders embedded at `check_precision`. Per cell (method -> direction -> metric) the
    two recalls, keyed by precision, and `difference` = lower precision minus fp32, in recall
    points; `max_abs_difference` per metric over every method and direction. Methods missing
    from either report are left out."""
    low = check_precision if run_precision == "fp32" else run_precision
    check_rows = {row["method"]: row for row in check["rows"]}
    cells, worst = {}, {}
    for row in run["rows"]:
        other = check_rows.get(row["method"])
        if other is None:
            continue
        cells[row["method"]] = {}
        for d in DIRECTIONS:
            cells[row["method"]][d] = {}
            for m, value in row[d].items():
                values = {run_precision: float(value), check_precision: float(other[d][m])}
                difference = values[low] - values["fp32"]
                cells[row["method"]][d][m] = values | {"difference": difference}
                worst[m] = max(worst.get(m, 0.0), abs(difference))
    return {"run": run_precision, "check": check_precision, "cells": cells,
            "max_abs_difference": worst}


def precision_lines(section: dict) -> list[str]:
    """Markdown for the `precision` section: a line with the largest change at the first K and
    at any K, then each cell's difference (lower precision minus fp32, recall points)."""
    low = section["check"] if section["run"] == "fp32" else section["run"]
    cells, worst = section["cells"], section["max_abs_difference"]
    if not cells:
        return []
    metrics = list(next(iter(cells.values()))["i2t"])
    lines = ["", f"Precision: every cell again with the evaluation split (and each exported query "
             f"encoder) embedded at {section['check']} instead of {section['run']}; the "
             f"baselines keep the maps they fitted on the {section['run']} support set. Largest "
             f"|{low} - fp32|: {worst[metrics[0]]:.2f} {metrics[0]} points "
             f"({max(worst.values()):.2f} at any K). Differences, {low} - fp32, in recall "
             "points:", ""]
    return lines + markdown_table(
        ["method"] + [f"{d.upper()} {m}" for d in DIRECTIONS for m in metrics],
        [[method] + [f"{by_d[d][m]['difference']:+.2f}" for d in DIRECTIONS for m in metrics]
         for method, by_d in cells.items()])


def data_note(data: dict) -> str:
    """One line on evaluation rows left out (split rows without a partner, unsearchable
    vectors skipped on read), or "" when none were."""
    parts = [f"{n} {what.replace('_', ' ')}" for what, n in (data.get("dropped") or {}).items()
             if n]
    for role, counts in (data.get("read") or {}).items():
        for reason, n in (counts.get("skipped") or {}).items():
            if n:
                parts.append(f"{n} {role} rows skipped ({reason.replace('_', ' ')})")
    return ("Left out of the evaluation: " + "; ".join(parts) + " (counts: report.json "
            "`data`).") if parts else ""


def published_rows(dataset: str, protocol: str) -> list[dict]:
    """Published numbers (shipped as data) for a dataset and protocol; [] if none."""
    text = resources.files("xbt_ray.eval").joinpath("published.csv").read_text(encoding="utf-8")
    return [r for r in csv.DictReader(io.StringIO(text))
            if r["dataset"] == dataset.lower() and r["protocol"] == protocol]


def to_csv(report) -> str:
    """One line per method: recalls, RSUM, criterion, gains, flips, old-encoder need."""
    rows = report["rows"]
    metrics = list(rows[0]["i2t"])
    fields = (["method", "needs_old_encoder"] + [f"{d}_{m}" for d in DIRECTIONS for m in metrics]
              + ["rsum", "cells_passed"]
              + [f"gain_{d}_{m}" for d in DIRECTIONS for m in metrics]
              + [f"{k}_{d}" for d in DIRECTIONS for k in ("PFR", "NFR")])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        line = {"method": row["method"], "needs_old_encoder": row["needs_old_encoder"],
                "rsum": round(row["rsum"], 4), "cells_passed": cells_passed(row)}
        for d in DIRECTIONS:
            for m in metrics:
                line[f"{d}_{m}"] = round(row[d][m], 4)
                gain = row.get("update_gain", {}).get(d, {}).get(m)
                line[f"gain_{d}_{m}"] = None if gain is None else round(gain, 4)
            for k in ("PFR", "NFR"):
                line[f"{k}_{d}"] = row["flips"][d][k] if "flips" in row else None
        writer.writerow(line)
    return buf.getvalue()


def console_summary(report, paths: dict[str, Path]) -> str:
    """What a command prints once a report is written: `compatibility_table`, where the rest of
    the report is (flip rates, fits, backfill, cost, precision: report.md) and the files."""
    rows = report["rows"]
    sections = (("flip rates and fits", any("flips" in r for r in rows)),
                ("partial backfill", bool(report.get("backfill"))),
                ("cost", any("cost" in r for r in rows)),
                ("precision", bool(report.get("precision"))))
    rest = [name for name, present in sections if present]
    lines = [compatibility_table(report), ""]
    if rest:
        lines.append(f"{', '.join(rest)}: {paths['md']}")
    lines.append("report: " + "\n        ".join(str(p) for p in paths.values()))
    return "\n".join(lines)


def write_report(report, out_dir) -> dict[str, Path]:
    """Write report.json, report.md, report.csv, compatibility.png and (with backfill curves)
    backfill.png into out_dir (created if needed). Returns {kind: path}."""
    from xbt_ray.eval import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "csv": out / "report.csv",
             "heatmap": out / "compatibility.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(format_table(report) + "\n", encoding="utf-8")
    paths["csv"].write_text(to_csv(report), encoding="utf-8")
    plots.compatibility_heatmap(report, paths["heatmap"])
    if report.get("backfill"):
        paths["backfill"] = out / "backfill.png"
        plots.backfill_curves(report, paths["backfill"])
    return paths
