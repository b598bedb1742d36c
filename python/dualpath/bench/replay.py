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
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass

import aiohttp
import xxhash

from dualpath.bench.client import iter_sse, merge_stream_ids
from dualpath.bench.trace import Trajectory


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
    body = {"input_ids": prompt, "stream": True,
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

    def finished(self, rec: TurnRecord) -> None:
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
        rec = TurnRecord(traj.agent, i, len(ctx), gen, time.perf_counter() - t0)
        records.append(rec)
        try:
            out = await _turn(session, url, ctx, gen, rec, t0)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, RuntimeError) as e:
            rec.error = f"{type(e).__name__}: {e}"
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


async def replay(url: str, trajs: list[Trajectory], *, online: bool = False, seed: int = 0,
                 timeout_s: float = 3600.0, stop_ttft_s: float | None = None,
                 progress_s: float | None = 10.0) -> tuple[dict, list[TurnRecord]]:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        t0 = time.perf_counter()
        run = _Run(sum(len(t.turns) for t in trajs), stop_ttft_s if online else None, t0)
        reporter = asyncio.create_task(_report(run, progress_s)) if progress_s else None
        try:
            await asyncio.gather(*(_agent(session, url.rstrip("/"), t, online, seed, t0, run)
                                   for t in trajs))
        finally:
            if reporter is not None:
                reporter.cancel()
        wall = time.perf_counter() - t0
    summary = summarize(run.records, wall)
    summary["stopped_at_s"] = run.stopped_at
    if progress_s:
        print(run.progress(), file=sys.stderr, flush=True)
    return summary, run.records


def records_jsonl(records: list[TurnRecord]) -> str:
    return "".join(json.dumps(asdict(r)) + "\n" for r in records)
