"""Replay agentic trajectories against an SGLang-compatible `/generate` (a server or the router).

Each agent runs its turns one after another: the prompt is the whole context so far (initial
tokens, every earlier append and every earlier *generated* output, as returned by the server)
plus the turn's append; exactly `generate` tokens come back (greedy, ignore_eos). Offline mode:
every agent starts at t=0 and the job completion time (JCT) is when the last turn ends. Online
mode: agents start at their `arrival_s`. Token ids are drawn from a seeded generator per
(agent, turn), so two runs (e.g. DualPath on and off) send the same prompts.

Per turn: TTFT, TTST (time to the second token) and TPOT. Online runs may stop early the way the
paper's do: once the mean TTFT of the last `STOP_WINDOW` turns exceeds `stop_ttft_s`, no new
turn starts (turns in flight finish) and the summary says when (`stopped_at_s`); the paper's
other stop rule (TTFT steady for 150 s against 30 minutes earlier) needs runs far longer than
ours. Progress goes to stderr (a line per `progress_s`).

Each turn carries a request id, `<run tag>-a<agent>-t<turn>`, so a turn can be found in the
router's and servers' logs. With `stall_s`, a replay in which no turn has finished for that long
while turns are in flight stops instead of waiting for the HTTP timeout: the turns in flight
become errors ("stalled ..."), and the summary's `stall` says which they were, how long each had
waited and whether its first token had come, with whatever `on_stall()` returned (the servers'
state at that moment).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass

import aiohttp
import xxhash

from dualpath.bench.client import iter_sse, merge_stream_ids
from dualpath.bench.trace import Trajectory

log = logging.getLogger("dualpath.replay")


@dataclass
class TurnRecord:
    agent: int
    turn: int
    prompt_len: int
    generate: int
    start_s: float
    ttft_s: float | None = None
    ttst_s: float | None = None
    """Time to the second token, from the turn's start."""
    end_s: float | None = None
    output_len: int = 0
    cached_tokens: int | None = None
    output_digest: str | None = None
    """xxh64 of the output ids: runs that should agree (DualPath on/off) compare these."""
    error: str | None = None
    rid: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.end_s is None or self.output_len < 2:
            return None
        return (self.end_s - self.start_s - self.ttft_s) / (self.output_len - 1)


def token_ids(seed: int, agent: int, turn: int, n: int) -> list[int]:
    rng = random.Random(f"{seed}/{agent}/{turn}")
    return [rng.randrange(1000, 100_000) for _ in range(n)]


async def _turn(session: aiohttp.ClientSession, url: str, prompt: list[int], gen: int,
                rec: TurnRecord, t0: float) -> list[int]:
    body = {"input_ids": prompt, "stream": True, "rid": rec.rid,
            "sampling_params": {"max_new_tokens": gen, "temperature": 0.0, "ignore_eos": True}}
    ids: list[int] = []
    last: dict = {}
    async with session.post(url + "/generate", json=body) as r:
        if r.status != 200:
            rec.error = f"HTTP {r.status}: {(await r.text())[:200]}"
            return ids
        buf = b""
        async for chunk in r.content.iter_any():
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for obj in iter_sse(lines):
                if rec.ttft_s is None:
                    rec.ttft_s = time.perf_counter() - t0 - rec.start_s
                ids = merge_stream_ids(ids, obj)
                if rec.ttst_s is None and len(ids) >= 2:
                    rec.ttst_s = time.perf_counter() - t0 - rec.start_s
                last = obj
    rec.end_s = time.perf_counter() - t0
    rec.output_len = len(ids)
    rec.output_digest = xxhash.xxh64(json.dumps(ids).encode()).hexdigest()
    rec.cached_tokens = (last.get("meta_info") or {}).get("cached_tokens")
    if len(ids) != gen:
        rec.error = f"generated {len(ids)} tokens, asked for {gen}"
    return ids


STOP_WINDOW = 16


class _Run:
    """Shared state of one replay: the records, the stop rule, progress."""

    def __init__(self, total: int, stop_ttft_s: float | None, t0: float):
        self.records: list[TurnRecord] = []
        self.total, self.stop_ttft_s, self.t0 = total, stop_ttft_s, t0
        self.recent: deque[float] = deque(maxlen=STOP_WINDOW)
        self.stopped_at: float | None = None
        self.tag = secrets.token_hex(4)
        self.last_done = t0  # perf_counter of the last turn that ended (or failed)

    def in_flight(self) -> list[TurnRecord]:
        return [r for r in self.records if r.end_s is None and r.error is None]

    def finished(self, rec: TurnRecord) -> None:
        self.last_done = time.perf_counter()
        if rec.ttft_s is None or self.stop_ttft_s is None or self.stopped_at is not None:
            return
        self.recent.append(rec.ttft_s)
        if len(self.recent) == STOP_WINDOW and statistics.mean(self.recent) > self.stop_ttft_s:
            self.stopped_at = time.perf_counter() - self.t0

    def progress(self) -> str:
        done = sum(1 for r in self.records if r.end_s is not None or r.error)
        errors = sum(1 for r in self.records if r.error)
        stop = f", stopped at {self.stopped_at:.1f} s" if self.stopped_at is not None else ""
        return (f"[replay] {done}/{self.total} turns, {errors} errors, "
                f"{time.perf_counter() - self.t0:.1f} s{stop}")


async def _agent(session, url, traj: Trajectory, online: bool, seed: int, t0: float,
                 run: _Run) -> None:
    records = run.records
    if online:  # asyncio's clock may wake a hair early: never start before the arrival
        while (wait := traj.arrival_s - (time.perf_counter() - t0)) > 0:
            await asyncio.sleep(wait)
    ctx = token_ids(seed, traj.agent, -1, traj.initial)
    for i, (append, gen) in enumerate(traj.turns):
        if run.stopped_at is not None:
            return
        ctx = ctx + token_ids(seed, traj.agent, i, append)
        rec = TurnRecord(traj.agent, i, len(ctx), gen, time.perf_counter() - t0,
                         rid=f"{run.tag}-a{traj.agent}-t{i}")
        records.append(rec)
        try:
            out = await _turn(session, url, ctx, gen, rec, t0)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, RuntimeError) as e:
            rec.error = f"{type(e).__name__}: {e}"
            run.finished(rec)
            return  # the agent's context is broken: stop this trajectory
        run.finished(rec)
        if rec.error:
            return
        ctx = ctx + out


def percentile(xs: list[float], q: float) -> float | None:
    """The q-quantile of xs (nearest rank); None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def summarize(records: list[TurnRecord], wall_s: float) -> dict:
    ok = [r for r in records if not r.error and r.end_s is not None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    ttst = [r.ttst_s for r in ok if r.ttst_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    out = {"turns": len(records), "turns_ok": len(ok), "errors": len(records) - len(ok),
           "jct_s": max((r.end_s for r in ok), default=None), "wall_s": wall_s,
           "turns_per_s": len(ok) / wall_s if wall_s > 0 else None,
           "prompt_tokens_per_s": sum(r.prompt_len for r in ok) / wall_s if wall_s > 0 else None,
           "cached_token_ratio": (sum(r.cached_tokens or 0 for r in ok)
                                  / max(1, sum(r.prompt_len for r in ok)))}
    for name, xs in (("ttft_s", ttft), ("ttst_s", ttst), ("tpot_s", tpot)):
        for q in (0.5, 0.9, 0.99):
            out[f"{name}_p{int(q * 100)}"] = percentile(xs, q)
        out[f"{name}_mean"] = statistics.mean(xs) if xs else None
    return out


async def _report(run: _Run, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        print(run.progress(), file=sys.stderr, flush=True)


async def _watch_stall(run: _Run, stall_s: float, on_stall) -> dict:
    """Return (with the stall's description) once turns are in flight and none has finished
    for `stall_s`; runs until cancelled otherwise."""
    while True:
        await asyncio.sleep(min(1.0, stall_s / 4))
        now = time.perf_counter()
        waiting = run.in_flight()
        # stalled: a turn has waited stall_s and none finished meanwhile (an online turn that
        # arrived after an idle gap has not waited, however long ago the last one finished)
        if (not waiting or now - run.last_done < stall_s
                or max(now - run.t0 - r.start_s for r in waiting) < stall_s):
            continue
        info = {"at_s": round(now - run.t0, 1), "stall_s": stall_s,
                "in_flight": [{"rid": r.rid, "agent": r.agent, "turn": r.turn,
                               "prompt_len": r.prompt_len,
                               "waited_s": round(now - run.t0 - r.start_s, 1),
                               "first_token": r.ttft_s is not None} for r in waiting]}
        log.error("replay stalled: no turn finished for %g s; in flight: %s", stall_s,
                  ", ".join(f"{x['rid']} ({x['waited_s']} s)" for x in info["in_flight"]))
        if on_stall is not None:
            try:
                info["servers"] = on_stall()
            except Exception as e:  # the diagnosis must not cost the results
                info["servers"] = {"error": f"{type(e).__name__}: {e}"}
        return info


async def replay(url: str, trajs: list[Trajectory], *, online: bool = False, seed: int = 0,
                 timeout_s: float = 3600.0, stop_ttft_s: float | None = None,
                 progress_s: float | None = 10.0, stall_s: float | None = None,
                 on_stall=None) -> tuple[dict, list[TurnRecord]]:
    if stall_s is not None and stall_s <= 0:
        raise ValueError(f"stall_s must be > 0 (or None: no stall check), got {stall_s}")
    timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout_s)
    stall = None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        t0, t0_wall = time.perf_counter(), time.time()
        run = _Run(sum(len(t.turns) for t in trajs), stop_ttft_s if online else None, t0)
        reporter = asyncio.create_task(_report(run, progress_s)) if progress_s else None
        agents = [asyncio.create_task(_agent(session, url.rstrip("/"), t, online, seed, t0, run))
                  for t in trajs]
        watch = (asyncio.create_task(_watch_stall(run, stall_s, on_stall))
                 if stall_s is not None else None)
        try:
            pending = set(agents)
            while pending and not (watch and watch.done()):
                _, pending = await asyncio.wait(pending | ({watch} if watch else set()),
                                                return_when=asyncio.FIRST_COMPLETED)
                pending.discard(watch)
            if pending:  # the stall watch fired while agents still ran
                stall = watch.result()
                for r in run.in_flight():
                    r.error = (f"stalled: no turn finished for {stall_s:.0f} s "
                               f"(this one waited {time.perf_counter() - t0 - r.start_s:.0f} s)")
                for t in pending:
                    t.cancel()
            await asyncio.gather(*agents, return_exceptions=True)
            for t in agents:  # an agent's own failure (not a turn's error) still surfaces
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()
        finally:
            for t in (reporter, watch):
                if t is not None:
                    t.cancel()
        wall = time.perf_counter() - t0
    summary = summarize(run.records, wall)
    summary["stopped_at_s"] = run.stopped_at
    summary["t0_wall"] = t0_wall  # wall clock of start_s 0: joins turns to servers' logs
    if stall is not None:
        summary["stall"] = stall
    if progress_s:
        print(run.progress(), file=sys.stderr, flush=True)
    return summary, run.records


def records_jsonl(records: list[TurnRecord]) -> str:
    return "".join(json.dumps(asdict(r)) + "\n" for r in records)
