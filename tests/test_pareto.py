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
