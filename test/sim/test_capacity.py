"""The capacity search: brackets from a guess, bisects to the tolerance, handles the edges."""

import pytest

from dualpath.sim.capacity import max_aps, within_slo


@pytest.mark.parametrize("true,guess", [(3.7, 1.0), (3.7, 50.0), (0.02, 1.0), (10.0, 10.0)])
def test_finds_the_threshold_within_tolerance(true, guess):
    asked = []

    def within(r):
        asked.append(r)
        return r <= true

    got = max_aps(within, guess, tolerance=0.05)
    assert got <= true and got >= true * 0.95 and len(asked) < 20


def test_nothing_within_and_bad_arguments():
    assert max_aps(lambda r: False, 1.0, max_steps=4) == 0.0
    with pytest.raises(ValueError):
        max_aps(lambda r: True, 0.0)
    assert within_slo(4.0, 0.05) and not within_slo(4.01, 0.01) and not within_slo(1, 0.051)
