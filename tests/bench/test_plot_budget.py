"""benchmarks/plot_budget.py: the trend of a ratio against the batch size (the batch-regime verdict)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "plot_budget.py"


@pytest.fixture(scope="module")
def plot_budget():
    spec = importlib.util.spec_from_file_location("plot_budget", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trend_recovers_a_known_power_law_and_its_crossing(plot_budget):
    # ratio = 0.5 * (b / 1024) ** 0.25: x 2**0.25 per doubling, reaching 1 at 1024 * 2**4 = 16,384
    pts = [(b, 0.5 * (b / 1024) ** 0.25) for b in (1024, 2048, 4096, 65536)]
    t = plot_budget.trend(pts)
    assert t["per_doubling"] == pytest.approx(2 ** 0.25, rel=1e-12)
    assert t["crosses_one_at_tokens_per_step"] == pytest.approx(16384, rel=1e-9)
    assert t["points"] == 4


def test_trend_moving_away_from_one_never_crosses(plot_budget):
    falling = [(1024, 0.8), (4096, 0.6), (16384, 0.5)]
    t = plot_budget.trend(falling)
    assert t["per_doubling"] < 1 and t["crosses_one_at_tokens_per_step"] is None
    # above 1 and rising: moving away too
    assert plot_budget.trend([(1024, 1.2), (2048, 1.5)])["crosses_one_at_tokens_per_step"] is None
    # above 1 and falling: crosses ahead
    t = plot_budget.trend([(1024, 2.0), (4096, 1.0 * 2 ** 0.5)])
    assert t["per_doubling"] == pytest.approx(2 ** -0.25) and t["crosses_one_at_tokens_per_step"] == pytest.approx(
        1024 * 2 ** 4)


def test_trend_least_squares_slope_on_noisy_points(plot_budget):
    # the slope of log2(ratio) on log2(batch) by the textbook formula, independently
    pts = [(1024, 0.72), (2048, 0.64), (4096, 0.60), (16384, 0.57)]
    xs = [math.log2(b) for b, _ in pts]
    ys = [math.log2(r) for _, r in pts]
    n = len(xs)
    slope = (n * sum(x * y for x, y in zip(xs, ys)) - sum(xs) * sum(ys)) / (n * sum(x * x for x in xs) - sum(xs) ** 2)
    assert plot_budget.trend(pts)["per_doubling"] == pytest.approx(2 ** slope, rel=1e-12)


def test_trend_needs_two_usable_points(plot_budget):
    assert plot_budget.trend([]) is None
    assert plot_budget.trend([(1024, 0.5)]) is None
    assert plot_budget.trend([(1024, 0.5), (2048, None), (4096, 0.0)]) is None  # unreached or zero: unusable
    assert plot_budget.trend([(1024, 0.5), (1024, 0.6)]) is None  # one batch size: no slope
