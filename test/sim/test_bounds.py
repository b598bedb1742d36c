"""The bottleneck-free P:D range against the paper's worked example (g=8, s=1: 1/7 .. 7/2)."""

import pytest

from dualpath.sim.bounds import as_fraction, pd_bounds


def test_paper_worked_example():
    b = pd_bounds(g=8, s=1, mem_over_storage=500 / 50)  # M ~ 500 GB/s, Bs ~ 50 GB/s
    assert as_fraction(b.lower) == pytest.approx(1 / 7) and str(as_fraction(b.lower)) == "1/7"
    assert str(as_fraction(b.upper)) == "7/2"
    assert b.limits == pytest.approx({"de_cnic_read": 6, "de_cnic_write": 3.5, "de_dram": 3.5})
    # the configurations the paper tested all lie inside
    for p, d in [(1, 1), (2, 1), (1, 2), (2, 4), (48, 96)]:
        assert b.admits(p, d), (p, d)
    assert not b.admits(4, 1) and not b.admits(1, 8)


def test_dram_can_bind_and_bounds_can_cross():
    tight = pd_bounds(g=8, s=1, mem_over_storage=4)  # (4 - 3) / 2 = 0.5
    assert tight.binding() == "de_dram" and tight.upper == pytest.approx(0.5)
    assert pd_bounds(g=8, s=1).binding() == "de_cnic_write"
    crossed = pd_bounds(g=4, s=1.9)
    assert not crossed.feasible  # lower 1.9/2.1 ~ 0.9 > upper 0.2/1.9


@pytest.mark.parametrize("g,s", [(8, 0), (8, 8), (8, 5)])
def test_outside_the_model_is_refused(g, s):
    with pytest.raises(ValueError):
        pd_bounds(g, s)


def test_cli_lists_ratios_inside(capsys):
    from dualpath.sim.__main__ import main

    assert main(["bounds", "--g", "8", "--s", "1", "--mem-over-storage", "10",
                 "--max-nodes", "4"]) == 0
    out = capsys.readouterr().out
    assert "1/7" in out and "7/2" in out and "1P1D" in out and "2P4D" not in out  # reduced: 1P2D
    assert "1P2D" in out and "4P1D" not in out
