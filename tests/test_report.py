"""report.json rows, round-trip, and the markdown table."""
import json

import pytest

from xbt_ray.eval.report import build_report, format_table, make_row, write_report

OLD = {"i2t": {"R1": 40.0, "R5": 70.0, "R10": 80.0}, "t2i": {"R1": 20.0, "R5": 45.0, "R10": 55.0}}
NEW = {"i2t": {"R1": 50.0, "R5": 70.0, "R10": 90.0}, "t2i": {"R1": 30.0, "R5": 55.0, "R10": 60.0}}
XBT = {"i2t": {"R1": 45.0, "R5": 72.5, "R10": 85.0}, "t2i": {"R1": 20.0, "R5": 50.0, "R10": 57.0}}


def _report():
    rows = [
        make_row("old->old", "old", "old", True, OLD, OLD, NEW),
        make_row("new->new", "new", "new", False, NEW, OLD, NEW),
        make_row("xbt->old", "xbt", "old", False, XBT, OLD, NEW),
    ]
    return build_report("demo-heldout", "1k test", 1000, 5000, rows)


def test_make_row_fields():
    row = make_row("xbt->old", "xbt", "old", False, XBT, OLD, NEW)
    assert row["method"] == "xbt->old" and row["query"] == "xbt" and row["gallery"] == "old"
    assert row["needs_old_encoder"] is False
    assert row["i2t"] == XBT["i2t"] and row["t2i"] == XBT["t2i"]
    assert row["compatible"]["i2t"] == {"R1": True, "R5": True, "R10": True}
    assert row["compatible"]["t2i"] == {"R1": False, "R5": True, "R10": True}
    assert row["update_gain"]["i2t"]["R1"] == pytest.approx(0.5)
    assert row["update_gain"]["i2t"]["R5"] is None  # new == old at R5
    assert row["rsum"] == pytest.approx(45 + 72.5 + 85 + 20 + 50 + 57)


def test_make_row_reference_cells_and_missing_refs():
    old_row = make_row("old->old", "old", "old", True, OLD, OLD, NEW)
    assert "compatible" not in old_row and "update_gain" not in old_row
    assert "rsum" in old_row
    only_old = make_row("procrustes-text->old", "procrustes-text", "old", False, XBT, OLD)
    assert "compatible" in only_old and "update_gain" not in only_old
    bare = make_row("xbt->old", "xbt", "old", False, XBT)
    assert "compatible" not in bare and "update_gain" not in bare


def test_report_json_round_trip(tmp_path):
    report = _report()
    assert report["dataset"] == "demo-heldout" and report["protocol"] == "1k test"
    assert report["n_images"] == 1000 and report["n_captions"] == 5000
    json_path, md_path = write_report(report, tmp_path / "out")
    assert json_path.name == "report.json" and md_path.name == "report.md"
    assert json.loads(json_path.read_text()) == report
    assert md_path.read_text(encoding="utf-8").strip() == format_table(report).strip()


def test_markdown_table_marks():
    table = format_table(_report())
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 3  # header, separator, one line per method
    assert "RSUM" in lines[0] and "I2T R1" in lines[0] and "T2I R10" in lines[0]
    old_line, new_line, xbt_line = lines[2:]
    assert "✓" not in old_line and "✗" not in old_line
    assert "✓" not in new_line and "✗" not in new_line
    assert "45.0 ✓" in xbt_line and "72.5 ✓" in xbt_line
    assert "20.0 ✗" in xbt_line
    assert xbt_line.count("✓") == 5 and xbt_line.count("✗") == 1
    assert "0.50" in xbt_line  # I2T R1 update gain
    assert len({len(line) for line in lines}) == 1  # columns padded to a common width
