"""report.json rows, round-trip, and the markdown table."""
import json

import pytest

from xbt_ray.eval.report import (
    build_report,
    cells_passed,
    console_summary,
    format_table,
    make_row,
    published_rows,
    to_csv,
    write_report,
)

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
    paths = write_report(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == report
    assert paths["md"].read_text(encoding="utf-8").strip() == format_table(report).strip()
    assert "backfill" not in paths  # no curves in this report
    png = paths["heatmap"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


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
    assert "5/6" in xbt_line  # cells passing the strict criterion


def _full_report():
    report = _report()
    report["rows"][2]["flips"] = {"i2t": {"PFR": 12.5, "NFR": 2.0}, "t2i": {"PFR": 3.0, "NFR": 1.0}}
    report["rows"][2]["cost"] = {"old_forward_passes": 20000}
    slerp = make_row("slerp->old", "slerp", "old", True, XBT, OLD, NEW)
    slerp["flips"] = {"i2t": {"PFR": 1.0, "NFR": 0.5}, "t2i": {"PFR": 0.0, "NFR": 0.0}}
    slerp["fit"] = {"support": "both", "alpha": 0.3}
    report["rows"].append(slerp)
    report["full_backfill"] = {"items": 6000, "images": 1000, "captions": 5000}
    report["backfill"] = {"xbt->old": {
        "fractions": [0.0, 0.5, 1.0],
        "r1": {d: {"random": [40.0, 45.0, 48.0], "distance": [40.0, 47.0, 48.0]}
               for d in ("i2t", "t2i")},
        "auc": {d: {"random": 44.5, "distance": 45.5} for d in ("i2t", "t2i")},
        "migration": {"fractions": [0.0, 0.5, 1.0], "r1": {d: [40.0, 52.0, 60.0]
                                                           for d in ("i2t", "t2i")},
                      "auc": {d: 51.0 for d in ("i2t", "t2i")}}}}
    return report


def test_markdown_sections_flips_fits_backfill_costs():
    table = format_table(_full_report())
    flips = [line.split("|")[1:-1] for line in table.splitlines()
             if line.startswith("| xbt->old") and "12.5" in line]
    assert [c.strip() for c in flips[0]] == ["xbt->old", "12.5", "2.0", "3.0", "1.0", "-"]
    assert "support=both, alpha=0.3" in table
    backfill = [line.split("|")[1:-1] for line in table.splitlines()
                if line.startswith("| xbt->old") and "44.5" in line]
    assert [c.strip() for c in backfill[0]] == ["xbt->old", "44.5", "45.5", "44.5", "45.5",
                                                 "48.0", "48.0", "51.0", "51.0"]
    # a direction without a migration curve (its scores could not be calibrated) shows "-"
    report = _full_report()
    migration = report["backfill"]["xbt->old"]["migration"]
    del migration["r1"]["t2i"], migration["auc"]["t2i"]
    migration["skipped"] = {"t2i": "cannot calibrate scores"}
    row = [line.split("|")[1:-1] for line in format_table(report).splitlines()
           if line.startswith("| xbt->old") and "44.5" in line][0]
    assert [c.strip() for c in row[-2:]] == ["51.0", "-"]
    assert "20,000" in table and "6,000 items" in table
    assert "Published" not in table  # demo data: no published numbers apply


def test_console_shows_the_table_and_points_at_report_md_for_the_rest(tmp_path):
    report = _full_report()
    paths = write_report(report, tmp_path)
    shown = console_summary(report, paths)
    assert "| xbt->old" in shown and "72.5 ✓" in shown
    assert "12.5" not in shown and "44.5" not in shown and "20,000" not in shown
    assert f"flip rates and fits, partial backfill, cost: {paths['md']}" in shown
    assert shown.endswith("\n        ".join(str(p) for p in paths.values()))
    # report.md keeps every section the console leaves out
    assert "12.5" in paths["md"].read_text(encoding="utf-8")


def test_the_data_counts_list_only_joins_with_unmatched_rows():
    from xbt_ray.pipeline import data_summary

    full = {"joined": 500, "unmatched_left": 0, "unmatched_right": 0}
    data = {"new_text": {"rows_in": 10, "rows_embedded": 8, "deduplicated": 0,
                         "skipped": {"empty_caption": 2}},
            "joins": {"old_images~new_images": full},
            "stage2_anchored": {"joins": {"texts->images": {"joined": 90, "unmatched_left": 7,
                                                            "unmatched_right": 0}}}}
    lines = data_summary(data).splitlines()
    assert lines[1].split() == ["new_text", "10", "=", "8", "+", "0", "+", "2",
                                "{'empty_caption':", "2}"]
    assert lines[2] == ("joins: 1 of 2 matched every row; the others: joined "
                        "(unmatched left / right)")
    assert lines[3].split() == ["stage2_anchored:", "texts->images", "90", "(7", "/", "0)"]
    assert len(lines) == 4


def test_csv_one_line_per_method():
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(to_csv(_full_report()))))
    assert [r["method"] for r in rows] == ["old->old", "new->new", "xbt->old", "slerp->old"]
    assert float(rows[2]["i2t_R5"]) == 72.5 and rows[2]["cells_passed"] == "5"
    assert rows[0]["cells_passed"] == "" and rows[0]["PFR_i2t"] == ""
    assert float(rows[2]["PFR_i2t"]) == 12.5 and float(rows[2]["gain_i2t_R1"]) == 0.5
    assert rows[3]["needs_old_encoder"] == "True"


def test_backfill_plot_written(tmp_path):
    paths = write_report(_full_report(), tmp_path)
    assert paths["backfill"].read_bytes()[:4] == b"\x89PNG"


def test_published_reference_numbers_ship_as_data():
    rows = published_rows("Flickr30k", "large-scale")
    xbt_l14 = [r for r in rows if r["method"] == "xbt->old" and r["new_model"] == "ViT-L-14"]
    assert xbt_l14[0]["i2t_R1"] == "42.47" and xbt_l14[0]["t2i_R1"] == "22.38"
    assert {r["dataset"] for r in published_rows("coco", "large-scale")} == {"coco"}
    assert published_rows("coco", "standard") == []
    report = _report()
    report["dataset"], report["protocol"] = "nocaps", "large-scale"
    assert "| xbt->old" in format_table(report) and "75.02" in format_table(report)


def test_cells_passed():
    assert cells_passed(make_row("xbt->old", "xbt", "old", False, XBT, OLD, NEW)) == 5
    assert cells_passed(make_row("old->old", "old", "old", True, OLD, OLD, NEW)) is None


def test_data_section_notes_left_out_rows_and_fit_joins_stay_out_of_the_table():
    from xbt_ray.eval.report import data_note

    report = _report()
    assert data_note({}) == "" and "Left out" not in format_table(report)
    report["data"] = {"joins": {}, "dropped": {"images_without_caption": 1,
                                               "captions_without_image": 0},
                      "read": {"new_images": {"rows_in": 6, "rows_used": 4,
                                              "skipped": {"zero_vector": 2}}}}
    report["rows"][2]["flips"] = {d: {"PFR": 1.0, "NFR": 0.0} for d in ("i2t", "t2i")}
    report["rows"][2]["fit"] = {"support": "both", "joins": {"a->b": {"joined": 3}}}
    table = format_table(report)
    assert ("Left out of the evaluation: 1 images without caption; 2 new_images rows skipped "
            "(zero vector)") in table
    assert "support=both" in table and "joins=" not in table
