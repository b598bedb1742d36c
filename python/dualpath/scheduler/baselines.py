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
        self.queue: deque[Request] = deque()
        self.running: dict[str, Plan] = {}

    def submit(self, req: Request) -> None:
        if req.rid in self.running or any(q.rid == req.rid for q in self.queue):
            raise ValueError(f"request id {req.rid!r} is already queued or running")
        self.queue.append(req)

    def schedule(self) -> list[Plan]:
        plans = []
        while self.queue:
            req = self.queue.popleft()
            if self.policy == "random":
                pe, de = self._rng.choice(self.prefill), self._rng.choice(self.decode)
            else:
                pe = self.prefill[self._n % len(self.prefill)]
                de = self.decode[self._n % len(self.decode)]
                self._n += 1
            plan = Plan(req.rid, pe, de, req.hit_len, 0)
            self.running[req.rid] = plan
            plans.append(plan)
        return plans

    def read_done(self, rid: str) -> None:
        pass

    def prefill_done(self, rid: str) -> None:
        pass

    def finish(self, rid: str) -> None:
        self.running.pop(rid)
