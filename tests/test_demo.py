"""The demo's remaining-time estimate: scaled by the measured matmul rate, then by measured steps."""

from __future__ import annotations

import pytest

from samora_components.apps import demo


def test_step_shares_cover_the_whole_demo():
    assert sum(demo.STEP_SHARES.values()) == pytest.approx(1.0)


def test_remaining_time_starts_from_the_matmul_rate_then_follows_the_steps(monkeypatch):
    monkeypatch.setattr(demo, "matmul_peak", lambda *args, **kwargs: demo.REFERENCE_GFLOPS / 2)
    eta = demo.RemainingTime()
    assert eta.first_guess == pytest.approx(2 * demo.REFERENCE_SECONDS)  # half the rate: twice the time
    assert str(eta) == f"about {2 * demo.REFERENCE_SECONDS / 60:.1f} min left"
    eta.start -= 110.0  # stage 1 took 110 s
    eta.finished("stage1")
    share = demo.STEP_SHARES["stage1"]
    expected = 110.0 / share * (1 - share) / 60
    assert float(str(eta).split()[1]) == pytest.approx(expected, abs=0.06)
    for step in ("samed", "samora", "evaluate", "infer"):
        eta.finished(step)
    assert str(eta) == "about 0.0 min left"
