"""The Pareto report's bookkeeping (edge_tl.workstation.pareto): a saved point reads back the same, and a
latency-targeted model is compared with the MACs-targeted one only when both measured at equal latency."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_tl.workstation.pareto import EQUAL_LATENCY, ParetoPoint, margins, with_intervals


def _point(method: str, level: str, correct: list[int], ms: float) -> ParetoPoint:
    return ParetoPoint(method, level, 0, "x", np.asarray(correct, dtype=bool), macs=100, onnx=Path("/m.onnx"),
                       latency_ms=ms, target_ms=ms if method == "latency" else None)


def test_points_survive_the_json_round_trip():
    p = with_intervals([_point("latency", "b", [1, 0, 1, 1], 0.2)])[0]
    q = ParetoPoint.from_dict(json.loads(json.dumps(p.as_dict())))
    assert q.top1 == p.top1 == 0.75 and q.ci == pytest.approx(p.ci) and q.onnx == p.onnx
    np.testing.assert_array_equal(q.correct, p.correct)


def test_margins_flag_pairs_that_are_not_at_equal_latency():
    right = [1] * 30 + [0] * 10
    pts = [_point("macs", "a", right, 0.20), _point("latency", "a", [1] * 32 + [0] * 8, 0.20 * (1 + EQUAL_LATENCY / 2)),
           _point("macs", "c", right, 0.10), _point("latency", "c", right, 0.20)]
    m = {r["level"]: r for r in margins(pts)}
    assert m["a"]["equal_latency"] and m["a"]["diff_points"] == pytest.approx(5.0)
    assert not m["c"]["equal_latency"] and m["c"]["diff_points"] == 0.0  # twice as slow: not a fair comparison


def test_pooled_margin_sums_the_pairs_at_equal_latency_only():
    """Pooled over the images of every pair at equal latency (the paired statistics of one pair, on all of them),
    and the per-pair margins' mean with its t interval; a pair twice as slow is left out of both."""
    from scipy import stats

    from edge_tl.workstation.pareto import pooled_margin
    from edge_tl.workstation.stats import paired

    macs_a, lat_a = [1] * 30 + [0] * 10, [1] * 33 + [0] * 7  # +7.5 points
    macs_b, lat_b = [1] * 35 + [0] * 5, [1] * 34 + [0] * 6  # -2.5 points
    macs_c, lat_c = [1] * 20 + [0] * 20, [1] * 40  # +50 points, but not at equal latency
    pts = [_point("macs", "a", macs_a, 0.2), _point("latency", "a", lat_a, 0.2),
           _point("macs", "b", macs_b, 0.1), _point("latency", "b", lat_b, 0.1),
           _point("macs", "c", macs_c, 0.1), _point("latency", "c", lat_c, 0.2)]
    got = pooled_margin(pts)
    assert got["pairs"] == 2 and got["images"] == 80
    want = paired(np.array(lat_a + lat_b, dtype=bool), np.array(macs_a + macs_b, dtype=bool))
    assert got["pooled_points"] == pytest.approx(2.5) == pytest.approx(want.diff_points)
    assert got["pooled_ci_points"] == pytest.approx(want.ci_points) and got["pooled_mcnemar_p"] == want.mcnemar_p
    assert got["mean_points"] == pytest.approx(2.5)
    lo, hi = stats.t.interval(0.95, 1, loc=2.5, scale=stats.sem([7.5, -2.5]))
    assert got["mean_ci_points"] == pytest.approx((lo, hi))
    assert pooled_margin(pts[4:]) is None  # no pair at equal latency: nothing to pool
