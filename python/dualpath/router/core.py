"""The router's core: admission through the scheduler, PD dispatch, engine health and stats.

All of it runs on one asyncio event loop. A request: `admit` queues it in the scheduler and
waits for a Plan (admission control: it may wait, or get `Overloaded` when the queue is full or
the wait too long); `dispatch` sends the same body, plus bootstrap_host/port/room, to the
prefill and the decode server at once and streams the decode answer back; `release` returns
what the request held to the scheduler. An engine that cannot be reached before the client got
any byte is marked down and the request is retried on another pair.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid

import aiohttp
from aiohttp import web

from dualpath.config import RouterConfig, SchedulerConfig
from dualpath.router.contract import STATS_PATH, ContractError, EngineStats
from dualpath.router.engines import Engine
from dualpath.router.metrics import RouterMetrics
from dualpath.router.warmup import PairWarmer
from dualpath.scheduler import GlobalScheduler, PairScheduler, Plan, Request

log = logging.getLogger("dualpath.router")


class Overloaded(Exception):
    """No engine pair for this request now: the client should retry later (503)."""


class EngineUnreachable(Exception):
    def __init__(self, engine: str, why: str):
        super().__init__(f"engine {engine} unreachable: {why}")
        self.engine = engine


class Router:
    def __init__(self, cfg: RouterConfig, engines: list[Engine],
                 sched_cfg: SchedulerConfig | None = None):
        self.cfg = cfg
        self.sched_cfg = sched_cfg or SchedulerConfig()
        self.engines: dict[str, Engine] = {}
        for e in engines:
            if e.name in self.engines:
                raise ValueError(f"engine name {e.name!r} given twice")
            self.engines[e.name] = e
        self.scheduler: GlobalScheduler | PairScheduler | None = None
        self._rebuild()
        self.metrics = RouterMetrics()
        self._waiters: dict[str, asyncio.Future] = {}
        self.session: aiohttp.ClientSession | None = None
        self._poller: asyncio.Task | None = None
        self.up: dict[str, bool] = dict.fromkeys(self.engines, True)
        self.agents: dict[str, str] = {}  # engine -> its dualpath agent URL (from its stats)
        self.warmer = PairWarmer(self)

    # ---- engine set ----
    def _rebuild(self) -> None:
        pre = [e.spec() for e in self.engines.values() if e.role == "prefill"]
        dec = [e.spec() for e in self.engines.values() if e.role == "decode"]
        if not pre or not dec:
            self.scheduler = None
        elif self.scheduler is not None:
            self.scheduler = self.scheduler.rebuilt(pre, dec)
        elif self.cfg.policy == "dualpath":
            self.scheduler = GlobalScheduler(pre, dec, self.sched_cfg)
        else:
            self.scheduler = PairScheduler(pre, dec, self.cfg.policy)
        if self.scheduler is not None:  # a fresh scheduler knows nothing of dead engines
            for name, up in getattr(self, "up", {}).items():
                if not up and name in self.engines:
                    self.scheduler.set_available(name, False)

    def add_engine(self, e: Engine) -> None:
        if e.name in self.engines:
            raise KeyError(f"engine {e.name!r} already registered")
        self.engines[e.name] = e
        self.up[e.name] = True
        self._rebuild()
        self._pump()
        self.warmer.start_new()
        log.info("engine added: %s", e.to_dict())

    def remove_engine(self, name: str) -> Engine:
        e = self.engines.pop(name)  # KeyError if unknown
        self.up.pop(name, None)
        self.warmer.forget(name)
        self._rebuild()
        self._pump()
        log.info("engine removed: %s", name)
        return e

    def max_decode_kv(self) -> int:
        """The largest KV capacity (tokens) of a registered decode engine."""
        return max((e.kv_capacity for e in self.engines.values() if e.role == "decode"),
                   default=0)

    def set_up(self, name: str, up: bool) -> None:
        if self.up.get(name) == up or name not in self.engines:
            return
        self.up[name] = up
        if self.scheduler is not None:
            self.scheduler.set_available(name, up)
        self.metrics.engine_up.labels(name, self.engines[name].role).set(int(up))
        log.warning("engine %s is %s", name, "back up" if up else "down")
        if up:
            self._pump()

    # ---- admission ----
    def _pump(self) -> None:
        if self.scheduler is None:
            return
        for plan in self.scheduler.schedule():
            fut = self._waiters.pop(plan.rid, None)
            if fut is not None and not fut.done():
                fut.set_result(plan)
            else:  # nobody waits any more
                self.scheduler.finish(plan.rid)
        self.metrics.queue_waiting.set(len(self.scheduler.queue))

    async def admit(self, req: Request) -> Plan:
        if self.scheduler is None:
            raise Overloaded("no prefill or no decode engine is registered")
        for role in ("prefill", "decode"):  # fail fast rather than wait for a dead role
            if not any(up and self.engines[n].role == role for n, up in self.up.items()):
                raise Overloaded(f"no {role} engine is up")
        if len(self.scheduler.queue) >= self.cfg.max_queue:
            raise Overloaded(f"{len(self.scheduler.queue)} requests are already waiting")
        fut = asyncio.get_running_loop().create_future()
        self._waiters[req.rid] = fut
        t0 = time.monotonic()
        self.scheduler.submit(req)
        self._pump()
        try:
            plan = await asyncio.wait_for(fut, self.cfg.queue_timeout_s)
            self.metrics.admission_wait.observe(time.monotonic() - t0)
            return plan
        except (TimeoutError, asyncio.CancelledError) as e:
            self.metrics.admission_wait.observe(time.monotonic() - t0)  # gave up waiting
            self._waiters.pop(req.rid, None)
            if fut.done() and not fut.cancelled():  # planned just before we gave up
                self.release(req.rid)
            elif self.scheduler is not None:
                self.scheduler.cancel(req.rid)
            if isinstance(e, TimeoutError):
                raise Overloaded(f"no engine pair within {self.cfg.queue_timeout_s:.0f} s") from e
            raise

    def release(self, rid: str) -> None:
        if self.scheduler is not None:
            try:
                self.scheduler.finish(rid)
            except KeyError:  # its engine was removed meanwhile
                pass
        self._pump()

    # ---- dispatch ----
    async def dispatch(self, request: web.Request, body: dict, path: str,
                       plan: Plan) -> web.StreamResponse:
        pe, de = self.engines.get(plan.prefill), self.engines.get(plan.decode)
        if pe is None or de is None:  # removed between planning and dispatch
            raise EngineUnreachable(plan.prefill if pe is None else plan.decode, "removed")
        payload = {**body, "bootstrap_host": pe.host, "bootstrap_port": pe.bootstrap_port,
                   "bootstrap_room": random.getrandbits(63)}
        # both servers must know the request by the same id: the read plan is keyed by it
        payload["rid"] = body.get("rid") or plan.rid
        await self._send_plan(plan, pe, de, payload["rid"])
        # per-read, not total: a long generation is not a dead engine
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s,
                                        sock_read=self.cfg.request_timeout_s)
        pre_task = asyncio.create_task(self._post_prefill(pe, path, payload, timeout, plan.rid))
        pre_task.add_done_callback(_consume)  # its failure is handled here or only logged
        dec_task = asyncio.create_task(self.session.post(de.url + path, json=payload,
                                                         timeout=timeout))
        try:
            done, _ = await asyncio.wait({pre_task, dec_task},
                                         return_when=asyncio.FIRST_COMPLETED)
            if pre_task in done and (pre_task.exception() or pre_task.result()[0] != 200):
                _drop(dec_task)  # the decode would wait for KV that never comes
                if pre_task.exception():
                    raise EngineUnreachable(pe.name, str(pre_task.exception()))
                status, text = pre_task.result()
                return web.Response(status=status, text=text, content_type="application/json")
            try:
                resp = await dec_task
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                raise EngineUnreachable(de.name, str(e) or type(e).__name__) from e
        except BaseException:
            pre_task.cancel()
            _drop(dec_task)
            raise
        try:
            if resp.status != 200 or not body.get("stream"):
                data = await resp.read()
                return web.Response(status=resp.status, body=data,
                                    content_type=resp.content_type or "application/json")
            out = web.StreamResponse(status=200, headers={
                "Content-Type": resp.headers.get("Content-Type", "text/event-stream")})
            await out.prepare(request)
            # a prefill that fails now leaves the decode waiting for KV: cut the stream short
            pre_task.add_done_callback(lambda t: _failed(t) and resp.close())
            broke = None
            try:
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                broke = e  # cut by us (prefill failed) or the decode broke off
            msg = None
            if _failed(pre_task):
                why = (str(pre_task.exception()) if pre_task.exception() else
                       f"prefill answered {pre_task.result()[0]}")
                if pre_task.exception():
                    self.set_up(pe.name, False)
                msg = f"prefill {pe.name} failed: {why}"
            elif broke is not None:
                self.set_up(de.name, False)
                msg = f"decode {de.name} broke off the stream: {broke}"
            if msg:  # the client already has a 200: end the stream with an error event
                err = {"error": {"message": msg, "code": 502}}
                await out.write(f"data: {json.dumps(err)}\n\n".encode())
            await out.write_eof()
            return out
        finally:
            resp.release()

    async def _send_plan(self, plan: Plan, pe: Engine, de: Engine, rid: str) -> None:
        """Tell the engines' agents which share of the stored prefix the decode side reads. A
        PE-side plan needs no message (it is what a server does without one); if the decode's
        agent cannot take the plan, the prefill reads everything itself."""
        total = plan.pe_read_tokens + plan.de_read_tokens
        pe_agent, de_agent = self.agents.get(pe.name), self.agents.get(de.name)
        if not plan.de_read_tokens or not total:
            return
        if not pe_agent or not de_agent:
            self.metrics.plan_fallbacks.labels("no_agent").inc()
            return
        msg = {"rid": rid, "de_fraction": plan.de_read_tokens / total, "de_agent": de_agent,
               "prefill_agent": pe_agent}
        timeout = aiohttp.ClientTimeout(total=self.cfg.connect_timeout_s)
        for agent in (de_agent, pe_agent):  # the decode first: the prefill acts on its plan
            try:
                async with self.session.post(agent + "/dualpath/plan", json=msg,
                                             timeout=timeout) as r:
                    if r.status != 200:
                        raise aiohttp.ClientResponseError(r.request_info, (), status=r.status,
                                                          message=await r.text())
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.warning("plan for %s not delivered to %s (%s): reads fall back to the "
                            "prefill", rid, agent, e)
                self.metrics.plan_fallbacks.labels("agent_error").inc()
                return

    async def _post_prefill(self, pe: Engine, path: str, payload: dict,
                            timeout: aiohttp.ClientTimeout, rid: str) -> tuple[int, str]:
        async with self.session.post(pe.url + path, json=payload, timeout=timeout) as r:
            text = await r.text()  # connection errors propagate: dispatch() retries elsewhere
        if r.status != 200:
            log.warning("prefill %s answered %d for %s: %s", pe.name, r.status, rid, text[:200])
        elif self.scheduler is not None and rid in self.scheduler.running:
            self.scheduler.read_done(rid)  # the prefill has all its KV: reads are over
            self.scheduler.prefill_done(rid)
            self._pump()
        return r.status, text

    async def handle(self, request: web.Request, body: dict, path: str,
                     req: Request) -> web.StreamResponse:
        last, client_rid = None, body.get("rid")
        for attempt in range(self.cfg.max_attempts):
            rid = req.rid if attempt == 0 else f"{req.rid}-retry{attempt}"
            plan = await self.admit(Request(rid, req.prompt_len, req.hit_len, req.max_new_tokens))
            self.metrics.plans.labels(plan.read_side).inc()
            sent = body if not (attempt and client_rid) else {  # a retry gets its own id
                **body, "rid": f"{client_rid}-retry{attempt}"}
            try:
                return await self.dispatch(request, sent, path, plan)
            except EngineUnreachable as e:
                last = e
                self.metrics.retries.labels(e.engine).inc()
                self.set_up(e.engine, False)
            finally:
                self.release(rid)
        raise last

    # ---- lifecycle and polling ----
    async def start(self, app: web.Application | None = None) -> None:
        # no connection cap: the scheduler, not the HTTP pool, decides how much runs at once
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._poller = asyncio.create_task(self._poll_forever())
        self.warmer.start_new()

    async def stop(self, app: web.Application | None = None) -> None:
        if self._poller:
            self._poller.cancel()
        await self.warmer.stop()
        if self.session:
            await self.session.close()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.stats_interval_s)
            await asyncio.gather(*(self.poll(e) for e in list(self.engines.values())),
                                 return_exceptions=True)

    async def poll(self, e: Engine) -> None:
        """Take the engine's stats (dualpath plugin) or, from a stock server, its health."""
        timeout = aiohttp.ClientTimeout(total=max(1.0, self.cfg.stats_interval_s))
        try:
            async with self.session.get(e.url + STATS_PATH, timeout=timeout) as r:
                if r.status == 200:
                    raw = await r.read()
                    self._apply_stats(e, EngineStats.decode(raw))
                    agent = json.loads(raw).get("agent")
                    if isinstance(agent, str) and agent.startswith("http"):
                        self.agents[e.name] = agent
                    self.set_up(e.name, True)
                    return
            if self.up.get(e.name):
                return  # a stock server: keep it up until a request to it fails
            async with self.session.get(e.url + "/health", timeout=timeout) as r:
                self.set_up(e.name, r.status == 200)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self.set_up(e.name, False)
        except ContractError as err:
            log.warning("engine %s sent bad stats: %s", e.name, err)

    def _apply_stats(self, e: Engine, s: EngineStats) -> None:
        sched = self.scheduler
        if not isinstance(sched, GlobalScheduler) or e.name not in self.engines:
            return
        if e.role == "decode":
            sched.report_decode(e.name, free_kv=s.free_kv_tokens)
        else:
            sched.report_prefill_rate(e.name, s.prefill_tokens_total, s.prefill_busy_s_total)
        sched.report_read(e.role, e.node, queue_tokens=s.read_queue_tokens,
                          tokens_total=s.read_tokens_total, busy_s_total=s.read_busy_s_total)
        self._pump()  # freed KV or shorter queues may admit waiting requests


def new_rid() -> str:
    return uuid.uuid4().hex


def _failed(task: asyncio.Task) -> bool:
    """A finished prefill POST that raised or did not answer 200."""
    if not task.done() or task.cancelled():
        return False
    return task.exception() is not None or task.result()[0] != 200


def _consume(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("prefill request failed: %s", task.exception())


def _drop(task: asyncio.Task) -> None:
    """Cancel a pending decode POST, or close its response if it already came."""
    if not task.done():
        task.cancel()
    elif not task.cancelled() and task.exception() is None:
        task.result().close()
    task.add_done_callback(_consume)
