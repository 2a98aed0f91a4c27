"""The continual gate's evidence of a field gain (edge_tl.workstation.continual, continual.gain_score): the
per-picture log-loss under each model's temperature (edge_tl.workstation.calibrate.per_image_nll), the paired
interval of its mean difference, and the rule."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax
from scipy.stats import wilcoxon

from edge_tl.workstation.calibrate import nll, per_image_nll
from edge_tl.workstation.continual import field_gain
from edge_tl.workstation.stats import paired_mean


def test_per_image_nll_is_the_negative_log_softmax_of_the_true_class_at_the_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=8.0, size=(50, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=50)
    for t in (0.5, 1.0, 2.7):
        expect = -log_softmax(logits.astype(np.float64) / t, axis=1)[np.arange(50), y]
        np.testing.assert_allclose(per_image_nll(logits, y, t), expect, rtol=1e-12)
        assert nll(logits, y, t) == pytest.approx(expect.mean(), rel=1e-12)
    # large logits do not overflow (the max is subtracted first)
    assert np.isfinite(per_image_nll(np.array([[1e4, -1e4]], dtype=np.float32), np.array([1]), 1.0)).all()


def test_paired_mean_interval_and_wilcoxon():
    rng = np.random.default_rng(1)
    b = rng.exponential(size=30)
    a = b + 0.5 + rng.normal(scale=0.1, size=30)
    r = paired_mean(a, b, seed=3)
    d = a - b
    assert r.n == 30 and r.diff == pytest.approx(d.mean())
    assert r.ci[0] < r.diff < r.ci[1] and r.ci[0] > 0.4 and r.ci[1] < 0.6
    assert r.wilcoxon_p == pytest.approx(wilcoxon(d).pvalue)
    assert paired_mean(a, b, seed=3) == r  # seeded: the same scores give the same interval
    same = paired_mean(b, b)
    assert same.diff == 0 and same.ci == (0.0, 0.0) and same.wilcoxon_p == 1.0
    with pytest.raises(ValueError, match="finite"):
        paired_mean(np.array([1.0, np.inf]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="equal"):
        paired_mean(np.ones(3), np.ones(4))


def _adapt(top1: float, top1_ci: tuple[float, float], ll: float, ll_ci: tuple[float, float],
           vw: float = 0.0, vw_ci: tuple[float, float] = (-1.0, 1.0)) -> dict:
    return {"diff_points": top1, "diff_ci_points": list(top1_ci), "log_loss_gain": ll, "log_loss_gain_ci": list(ll_ci),
            "views": 20, "views_diff_points": vw, "views_diff_ci_points": list(vw_ci)}


@pytest.mark.parametrize(("adapt", "expect"), [
    # top-1 alone proves it, whatever the rule
    (_adapt(+20.0, (+5.0, +35.0), 0.3, (0.1, 0.5)), {"top1": True, "log-loss": True, "views": True}),
    # too few pictures for top-1; the log-loss interval is above 0
    (_adapt(+6.7, (0.0, +20.0), 0.25, (0.08, 0.44)), {"top1": False, "log-loss": True, "views": False}),
    # surer on the same answers: a log-loss gain; the augmented copies show a top-1 gain too
    (_adapt(0.0, (-6.7, +6.7), 0.2, (0.05, 0.35), 4.0, (1.0, 7.5)), {"top1": False, "log-loss": True, "views": True}),
    # more confident but fewer right: no gain under any rule
    (_adapt(-6.7, (-20.0, 0.0), 0.3, (0.1, 0.5), 3.0, (0.5, 6.0)), {"top1": False, "log-loss": False, "views": False}),
    # no interval above 0
    (_adapt(+6.7, (0.0, +20.0), 0.1, (-0.05, 0.25), 2.0, (-1.0, 5.0)),
     {"top1": False, "log-loss": False, "views": False}),
])
def test_gain_rule(adapt, expect):
    for score, ships in expect.items():
        ok, words = field_gain(adapt, score)
        assert ok is ships, score
        assert words.startswith("top-1") or (ok and not adapt["diff_ci_points"][0] > 0)
        assert ("log-loss gain" in words) is (score == "log-loss" and not adapt["diff_ci_points"][0] > 0)
        assert ("augmented copies" in words) is (score == "views" and not adapt["diff_ci_points"][0] > 0)
