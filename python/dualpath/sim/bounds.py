"""The paper's bottleneck-free P:D range (§4.2, inequality 9).

Notation (per node): g GPUs, each with one compute NIC of bandwidth B; storage bandwidth s*B
shared by the node; memory bandwidth M. P and D count prefill and decode *nodes*. With the
paper's assumptions (GPU-NIC pairs under one PCIe switch, balanced scheduling, no compute-network
congestion, storage read bandwidth fully used), no link or DRAM is a bottleneck when

    s / (g - s)  <=  P / D  <=  min{ (g - 2s) / s,  (g - s) / (2s),  (M / (B s) - 3) / 2 }

lower bound: PE compute-NIC write direction; upper bounds: DE compute-NIC read, DE compute-NIC
write, DE DRAM. Like the paper it ignores the miss-token KV return on the DE path and collective
traffic. (The paper's claim that the PE read direction always holds needs s <= g/2; it is
checked here too.)
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class PdBounds:
    lower: float
    upper: float
    limits: dict[str, float]
    """Each upper bound by the resource that sets it."""

    @property
    def feasible(self) -> bool:
        return self.lower <= self.upper

    def admits(self, prefill_nodes: int, decode_nodes: int) -> bool:
        return self.lower <= prefill_nodes / decode_nodes <= self.upper

    def binding(self) -> str:
        """The resource whose upper bound is the smallest."""
        return min(self.limits, key=self.limits.get)


def pd_bounds(g: int, s: float, mem_over_storage: float | None = None) -> PdBounds:
    """Bottleneck-free P/D range.

    Parameters
    ----------
    g : GPUs (and compute NICs) per node.
    s : node storage bandwidth in units of one compute NIC's bandwidth B (s*B per node).
    mem_over_storage : M / (B s), memory bandwidth over the node's storage bandwidth; None leaves
        the DRAM bound out.
    """
    if g < 1 or not 0 < s < g:
        raise ValueError(f"need g >= 1 and 0 < s < g, got g={g}, s={s}")
    if 2 * s > g:
        raise ValueError(f"s={s} > g/2: the PE compute NICs' read direction is a bottleneck "
                         "(2s/g > 1), outside the paper's model")
    limits = {"de_cnic_read": (g - 2 * s) / s, "de_cnic_write": (g - s) / (2 * s)}
    if mem_over_storage is not None:
        if mem_over_storage <= 0:
            raise ValueError("mem_over_storage must be > 0")
        limits["de_dram"] = (mem_over_storage - 3) / 2
    return PdBounds(lower=s / (g - s), upper=min(limits.values()), limits=limits)


def as_fraction(x: float, max_den: int = 64) -> Fraction:
    return Fraction(x).limit_denominator(max_den)
