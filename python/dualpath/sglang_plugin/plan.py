"""Per-request read plans, as the router sends them to a server's agent before the request.

A plan says which share of a request's stored prefix the decode side reads and forwards
(`de_fraction`: 0 = the prefill reads everything, the baseline; 1 = the decode reads everything;
in between = split) and where that decode's agent is. Plans are keyed by the SGLang request id
(`rid`), which the router sets identically in the bodies it sends to the prefill and the decode.
A request without a plan is served as stock SGLang serves it (prefill-side reads).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ReadPlan:
    rid: str
    de_fraction: float
    """Share of the stored prefix blocks the decode side reads, in [0, 1]."""
    de_agent: str = ""
    """Base URL of the decode's agent (http://host:port); needed when de_fraction > 0."""
    prefill_agent: str = ""
    """Base URL of the prefill's agent (informational: logs and stats)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rid, str) or not self.rid:
            raise ValueError("a plan needs a non-empty rid")
        f = self.de_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ValueError(f"plan {self.rid}: de_fraction must be in [0, 1], got {f!r}")
        if f > 0 and not self.de_agent.startswith(("http://", "https://")):
            raise ValueError(f"plan {self.rid}: de_fraction > 0 needs de_agent as http://host:port")

    @property
    def side(self) -> str:
        if self.de_fraction <= 0:
            return "pe"
        return "de" if self.de_fraction >= 1 else "split"

    def de_count(self, n: int) -> int:
        """How many of `n` blocks the decode side reads (the first ones of the batch)."""
        return min(n, round(n * self.de_fraction))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ReadPlan:
        if not isinstance(d, dict):
            raise ValueError("a plan must be a JSON object")
        known = {"rid", "de_fraction", "de_agent", "prefill_agent"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown plan fields {sorted(unknown)}")
        return cls(rid=d.get("rid", ""), de_fraction=d.get("de_fraction", 0.0),
                   de_agent=d.get("de_agent", "") or "",
                   prefill_agent=d.get("prefill_agent", "") or "")


class PlanTable:
    """Thread-safe rid -> plan map with a time-to-live (a plan whose request never comes, or
    whose request ended without anyone dropping it, does not stay forever)."""

    def __init__(self, ttl_s: float = 600.0, max_plans: int = 1 << 16, clock=time.monotonic):
        if ttl_s <= 0 or max_plans < 1:
            raise ValueError("ttl_s > 0 and max_plans >= 1")
        self.ttl_s, self.max_plans, self._clock = ttl_s, max_plans, clock
        self._plans: OrderedDict[str, tuple[float, ReadPlan]] = OrderedDict()
        self._lock = threading.Lock()
        self.expired = 0

    def put(self, plan: ReadPlan) -> None:
        now = self._clock()
        with self._lock:
            self._plans.pop(plan.rid, None)
            self._plans[plan.rid] = (now + self.ttl_s, plan)
            self._expire(now)

    def get(self, rid: str | None) -> ReadPlan | None:
        if rid is None:
            return None
        now = self._clock()
        with self._lock:
            item = self._plans.get(rid)
            if item is None:
                return None
            if item[0] < now:
                del self._plans[rid]
                self.expired += 1
                return None
            return item[1]

    def drop(self, rid: str) -> None:
        with self._lock:
            self._plans.pop(rid, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._plans)

    def _expire(self, now: float) -> None:
        while self._plans:
            rid, (deadline, _) = next(iter(self._plans.items()))
            if deadline >= now and len(self._plans) <= self.max_plans:
                break
            del self._plans[rid]
            self.expired += 1
