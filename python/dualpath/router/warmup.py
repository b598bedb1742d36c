"""Warm each prefill/decode pair before traffic reaches it (RouterConfig.warm_pairs).

A pair's first PD request pays its transfer backend's set-up: SGLang 0.5.17's NIXL backend
builds, on the prefill, a descriptor list over every KV slot of the decode's pool when it first
sees that decode (`_add_remote_peer` -> `_prep_equal_tp_dlist` + `prep_xfer_dlist`). On 2x
H100 with a 300K-token decode pool that made the first requests of every run wait 5-13 s in
the prefill's bootstrap stage (session 18). The router sends one 1-token, 1-output-token
request through each new pair (at start and when an engine is added) and reports /health 503
until they finished, so the first user requests, and a benchmark's measured ones, don't pay it.

A pair whose engines do not answer is retried until `warm_timeout_s`, then given up on with a
warning (its first request pays the set-up; /health no longer waits for it).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from dualpath.router.core import Router
    from dualpath.router.engines import Engine

log = logging.getLogger("dualpath.router")


class PairWarmer:
    def __init__(self, router: Router):
        self.router = router
        self.tasks: dict[tuple[str, str], asyncio.Task] = {}
        self.done: dict[tuple[str, str], bool] = {}  # pair -> warmed (False: given up)

    @property
    def warming(self) -> list[str]:
        return [f"{p}->{d}" for p, d in self.tasks]

    def start_new(self) -> None:
        """Start a warm-up for every registered pair not warmed or warming yet."""
        r = self.router
        if not r.cfg.warm_pairs or r.session is None:
            return
        engines = list(r.engines.values())
        for pe in (e for e in engines if e.role == "prefill"):
            for de in (e for e in engines if e.role == "decode"):
                key = (pe.name, de.name)
                if key in self.done or key in self.tasks:
                    continue
                task = asyncio.create_task(self._warm(pe, de))
                self.tasks[key] = task
                task.add_done_callback(lambda _t, key=key: self.tasks.pop(key, None))

    def forget(self, name: str) -> None:
        """An engine was removed: its pairs are warmed again if it comes back."""
        for key in [k for k in self.done if name in k]:
            del self.done[key]
        for key in [k for k in self.tasks if name in k]:
            self.tasks.pop(key).cancel()

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _warm(self, pe: Engine, de: Engine) -> None:
        r, key = self.router, (pe.name, de.name)
        t0 = time.monotonic()
        deadline, tries, why = t0 + r.cfg.warm_timeout_s, 0, "no answer"
        while time.monotonic() < deadline:
            if r.engines.get(pe.name) is not pe or r.engines.get(de.name) is not de:
                return  # removed meanwhile
            try:
                statuses = await self._one(pe, de, deadline)
                if statuses == (200, 200):
                    self.done[key] = True
                    log.info("pair %s -> %s warmed in %.1f s (%d earlier tries)", pe.name,
                             de.name, time.monotonic() - t0, tries)
                    return
                why = f"answers {statuses}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                why = str(e) or type(e).__name__
            tries += 1
            await asyncio.sleep(min(2.0, 0.25 * tries, max(0.0, deadline - time.monotonic())))
        self.done[key] = False
        log.warning("pair %s -> %s not warmed within %.0f s (%s): its first request pays the "
                    "transfer set-up", pe.name, de.name, r.cfg.warm_timeout_s, why)

    async def _one(self, pe: Engine, de: Engine, deadline: float) -> tuple[int, int]:
        """One warm-up request through the pair: (prefill status, decode status), 0 for a half
        dropped because the other failed first (it would wait for its peer)."""
        r = self.router
        payload = {"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                   "bootstrap_host": pe.host, "bootstrap_port": pe.bootstrap_port,
                   "bootstrap_room": random.getrandbits(63),
                   "rid": f"dualpath-warmup-{uuid.uuid4().hex}"}
        timeout = aiohttp.ClientTimeout(total=max(1.0, deadline - time.monotonic()),
                                        sock_connect=r.cfg.connect_timeout_s)

        async def post(e: Engine) -> int:
            async with r.session.post(e.url + "/generate", json=payload, timeout=timeout) as resp:
                await resp.read()
                return resp.status

        tasks = [asyncio.create_task(post(pe)), asyncio.create_task(post(de))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if any(t.exception() or t.result() != 200 for t in done):
                for t in tasks:  # the other half would wait for its peer until SGLang's timeout
                    t.cancel()
            await asyncio.wait(tasks)
            for t in tasks:
                if not t.cancelled() and t.exception():
                    raise t.exception()
            return tuple(0 if t.cancelled() else t.result() for t in tasks)
        finally:
            for t in tasks:
                t.cancel()
