"""`xbt compare --spread`: median and range of every cell over runs that differ in their seed
(hand-computed)."""
import pytest

from xbt_ray.compare import format_spread, spread
from xbt_ray.config import ConfigError


def _row(method, i2t_r1, t2i_r1, rsum, cells, gains=None):
    return {"method": method, "i2t": {"R1": i2t_r1, "R5": 50.0}, "t2i": {"R1": t2i_r1, "R5": 40.0},
            "rsum": rsum, "cells_passed": cells,
            "gain_r1": dict(zip(("i2t", "t2i"), gains)) if gains else {}}


def _table(run, xbt, extra=()):
    return {"run": run, "rows": [_row("old->old", 10.0, 8.0, 100.0, None)] + [xbt] + list(extra)}


def test_median_and_range_of_each_cell_over_three_seeds():
    tables = [_table("s0", _row("xbt->old", 20.0, 9.0, 140.0, 4, (0.25, 0.02))),
              _table("s1", _row("xbt->old", 14.0, 12.0, 150.0, 3, (0.10, 0.10)),
                     [_row("only-in-s1", 1.0, 1.0, 1.0, 0)]),
              _table("s2", _row("xbt->old", 17.0, 8.0, 120.0, 4, (0.15, -0.01)))]
    summary = {s["method"]: s["cells"] for s in spread(tables)}
    assert list(summary) == ["old->old", "xbt->old"]   # a method missing in a run: left out
    xbt = summary["xbt->old"]
    assert xbt["I2T R1"] == (17.0, 14.0, 20.0)
    assert xbt["T2I R1"] == (9.0, 8.0, 12.0)
    assert xbt["I2T R5"] == (50.0, 50.0, 50.0)
    assert xbt["RSUM"] == (140.0, 120.0, 150.0)
    assert xbt["cells ✓"] == (4.0, 3.0, 4.0)
    assert xbt["gain I2T R1"] == pytest.approx((0.15, 0.10, 0.25))
    assert summary["old->old"]["gain T2I R1"] is None and summary["old->old"]["cells ✓"] is None

    text = format_spread(tables).splitlines()
    assert text[0] == "median (min–max) over 3 runs: s0, s1, s2"
    xbt_line = next(line for line in text if line.startswith("| xbt->old"))
    cells = [c.strip() for c in xbt_line.strip("|").split("|")]
    assert cells[:3] == ["xbt->old", "17.0 (14.0–20.0)", "50.0"]   # equal values: no range
    assert cells[-3:] == ["0.15 (0.10–0.25)", "0.02 (-0.01–0.10)", "4 (3–4)"]


def test_one_run_has_no_spread():
    with pytest.raises(ConfigError, match="at least two runs"):
        spread([_table("s0", _row("xbt->old", 20.0, 9.0, 140.0, 4))])
