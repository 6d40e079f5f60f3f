"""The launcher's round periods: the time between consecutive rounds' metrics, per round."""

from __future__ import annotations

import pytest

from deploy.launcher import round_periods


def test_round_periods_are_gaps_between_consecutive_rounds():
    arrivals = {1: 10.0, 2: 10.25, 3: 10.75, 5: 12.0}  # round 4's metrics never arrived
    periods = round_periods(arrivals)
    assert periods == {"2": pytest.approx(0.25), "3": pytest.approx(0.5)}
    assert round_periods({}) == {} and round_periods({7: 1.0}) == {}
