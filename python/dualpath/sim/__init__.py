"""Cluster simulation and planning (paper §4.2 bounds; the discrete-event simulator comes next)."""

from dualpath.sim.bounds import PdBounds, pd_bounds

__all__ = ["PdBounds", "pd_bounds"]
