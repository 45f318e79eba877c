"""The evaluation report: rows of report.json (schema in design/method.md) and a markdown table."""
from __future__ import annotations

import json
from pathlib import Path

from xbt_ray.eval.retrieval import DIRECTIONS, compatible, rsum, update_gain

REFERENCE_METHODS = ("old->old", "new->new")


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


def _recall(row, d, m) -> str:
    text = f"{row[d][m]:.1f}"
    if "compatible" in row:
        text += " ✓" if row["compatible"][d][m] else " ✗"
    return text


def _gain(row, d, m) -> str:
    value = row.get("update_gain", {}).get(d, {}).get(m)
    return "-" if value is None else f"{value:.2f}"


def format_table(report) -> str:
    """Markdown table, one line per method; ✓/✗ mark the strict criterion vs old->old."""
    rows = report["rows"]
    metrics = list(rows[0]["i2t"]) if rows else ["R1", "R5", "R10"]
    first = metrics[0]
    header = (["method", "needs old enc"]
              + [f"{d.upper()} {m}" for d in DIRECTIONS for m in metrics]
              + ["RSUM", f"gain I2T {first}", f"gain T2I {first}"])
    body = [[row["method"], "yes" if row["needs_old_encoder"] else "no"]
            + [_recall(row, d, m) for d in DIRECTIONS for m in metrics]
            + [f"{row.get('rsum', rsum(row)):.1f}", _gain(row, "i2t", first),
               _gain(row, "t2i", first)]
            for row in rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    title = (f"**{report['dataset']}** ({report['protocol']}; {report['n_images']} images, "
             f"{report['n_captions']} captions)")
    return "\n".join([title, "", line(header), line(["-" * w for w in widths])]
                     + [line(r) for r in body])


def write_report(report, out_dir) -> tuple[Path, Path]:
    """Write report.json and report.md into out_dir (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(format_table(report) + "\n", encoding="utf-8")
    return json_path, md_path
