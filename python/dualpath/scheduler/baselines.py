"""The paper's Basic baselines: prefill/decode pairs by round-robin or at random, every stored
prefix read on the prefill side, no admission control. Same interface as GlobalScheduler."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

from dualpath.scheduler.global_scheduler import Plan
from dualpath.scheduler.state import EngineSpec, Request


class PairScheduler:
    def __init__(self, prefill: Sequence[EngineSpec], decode: Sequence[EngineSpec],
                 policy: str = "round_robin", seed: int = 0):
        if policy not in ("round_robin", "random"):
            raise ValueError(f"unknown baseline policy {policy!r}; use round_robin or random")
        if not prefill or not decode:
            raise ValueError("need at least one prefill and one decode engine")
        self.prefill = [s.name for s in prefill]
        self.decode = [s.name for s in decode]
        self.policy = policy
        self._rng = random.Random(seed)
        self._n = 0
        self._down: set[str] = set()
        self._specs = (list(prefill), list(decode))
        self.queue: deque[Request] = deque()
        self.running: dict[str, Plan] = {}

    def submit(self, req: Request) -> None:
        if req.rid in self.running or any(q.rid == req.rid for q in self.queue):
            raise ValueError(f"request id {req.rid!r} is already queued or running")
        self.queue.append(req)

    def schedule(self) -> list[Plan]:
        plans = []
        pes = [p for p in self.prefill if p not in self._down]
        des = [d for d in self.decode if d not in self._down]
        while self.queue and pes and des:
            req = self.queue.popleft()
            if self.policy == "random":
                pe, de = self._rng.choice(pes), self._rng.choice(des)
            else:
                pe, de = pes[self._n % len(pes)], des[self._n % len(des)]
                self._n += 1
            plan = Plan(req.rid, pe, de, req.hit_len, 0)
            self.running[req.rid] = plan
            plans.append(plan)
        return plans

    def cancel(self, rid: str) -> bool:
        n = len(self.queue)
        self.queue = deque(r for r in self.queue if r.rid != rid)
        return len(self.queue) < n

    def set_available(self, name: str, available: bool) -> None:
        if name not in self.prefill and name not in self.decode:
            raise KeyError(f"unknown engine {name!r}")
        (self._down.discard if available else self._down.add)(name)

    def rebuilt(self, prefill: Sequence[EngineSpec], decode: Sequence[EngineSpec]):
        new = PairScheduler(prefill, decode, self.policy)
        new._rng, new._n, new.queue = self._rng, self._n, self.queue
        new.running = {r: p for r, p in self.running.items()
                       if p.prefill in new.prefill and p.decode in new.decode}
        new._down = {n for n in self._down if n in new.prefill or n in new.decode}
        return new

    def read_done(self, rid: str) -> None:
        pass

    def prefill_done(self, rid: str) -> None:
        pass

    def finish(self, rid: str) -> None:
        if self.running.pop(rid, None) is None:
            raise KeyError(f"request {rid!r} is not running")
