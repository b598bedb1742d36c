"""Measured throughputs behind alpha and beta, updated online from engine reports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RateMeter:
    """Moving average of a capacity in tokens/s from cumulative (tokens, busy seconds) counters.

    Rates are measured over busy time only, so an idle node keeps its last measured capacity
    instead of decaying to zero (which would make alpha zero and every node look congested)."""

    rate: float
    weight: float
    _tokens: float | None = None
    _busy_s: float | None = None

    def observe(self, tokens_total: float, busy_s_total: float) -> float:
        if self._tokens is not None:
            dt, db = busy_s_total - self._busy_s, tokens_total - self._tokens
            if dt < 0 or db < 0:  # the engine restarted: counters went back; start over
                self._tokens = None
            elif dt > 0:
                self.rate = (1 - self.weight) * self.rate + self.weight * (db / dt)
        self._tokens, self._busy_s = tokens_total, busy_s_total
        return self.rate
