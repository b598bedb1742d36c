"""Storage NICs whose reads take turns a batch each (`SimCluster.read_batch_bytes` > 0).

SGLang reads a prefetch 128 pages at a time; in a first-in-first-out read pool (the plugin
before 9d24f5f) the reads in flight on a node took turns a batch each, a read's next batch
queued behind the others'. Each link serves one batch at a time at line rate.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class BatchTurns:
    def __init__(self, batch_bytes: int, store_bps: float, busy: dict[str, list[float]],
                 nodes: dict[str, int], n_turns: int, push: Callable, event: int):
        """busy: per side ('pe', 'de'), the NIC busy seconds per node (added to); push(t, kind,
        x): the simulator's event queue, `event` the kind whose x is the link whose batch
        ended (handed back to `batch_done`)."""
        self.batch, self.bps, self.busy, self.push, self.event = (batch_bytes, store_bps, busy,
                                                                  push, event)
        self.queue = {(side, n): deque() for side, count in nodes.items() for n in range(count)}
        self.on: dict = {}
        self.left, self.ready = [0] * n_turns, [0.0] * n_turns

    def start(self, t: int, now: float) -> None:
        """Turn t's reads begin (call `read` for each side with bytes)."""
        self.ready[t] = now

    def read(self, t: int, side: str, node: int, nbytes: int, now: float) -> None:
        self.left[t] += 1
        self.queue[(side, node)].append([t, side, node, nbytes])
        self._next((side, node), now)

    def _next(self, link, now: float) -> None:
        """Put the link's next queued read's next batch on it."""
        if self.on.get(link) is not None or not self.queue[link]:
            return
        r = self.queue[link].popleft()
        b = min(self.batch, r[3])
        self.busy[link[0]][link[1]] += b / self.bps
        self.on[link] = (r, b)
        self.push(now + b / self.bps, self.event, link)

    def batch_done(self, link, now: float, landed: Callable[[int, int], float]):
        """The link's batch ended at `now`: `landed(t, nbytes)` says when a decode-side batch
        reaches the prefill. Returns (turn, ready) when that ended the turn's reads, else
        None."""
        r, b = self.on.pop(link)
        t = r[0]
        r[3] -= b
        self.ready[t] = max(self.ready[t], landed(t, b) if r[1] == "de" else now)
        out = None
        if r[3] > 0:
            self.queue[link].append(r)  # its next batch, behind the others'
        else:
            self.left[t] -= 1
            if not self.left[t]:
                out = (t, self.ready[t])
        self._next(link, now)
        return out
