"""Discrete-event simulation of a PD cluster serving agentic trajectories, driven by the very
scheduler the router runs (`dualpath.scheduler`, unchanged).

Each turn: it arrives (offline: when the agent's previous turn ends; online: the agent arrives
at its `arrival_s`); the scheduler places it (it runs on a tick of `schedule_interval_s`, as
the router's loop would, so arrivals in one tick are placed together; requests it refuses are
retried when a read, prefill or turn ends); its stored prefix (the whole earlier context,
page-aligned) is read over the chosen node(s)' storage NIC (first come first served at line
rate), a decode-side read then crosses the decode GPU's compute NIC to the prefill; the
prefill engine (FIFO) computes the missed tokens; the KV the decode lacks crosses the prefill
GPU's compute NIC (everything, or only the missed tokens when the decode read the prefix
itself and restores it over H2D); the decode engine generates the turn's tokens at the step
time of its batch when the request joins it.
Outputs: JCT, turns/s, TTFT/TPOT percentiles, SLO attainment, per-node storage-NIC busy share.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from dataclasses import dataclass

from dualpath.config import SchedulerConfig
from dualpath.scheduler import EngineSpec, GlobalScheduler, PairScheduler, Request
from dualpath.sim.batch_turns import BatchTurns
from dualpath.sim.model import PerfModel, SimCluster

PAGE = 64
ARRIVE, SCHEDULE, READ_DONE, PREFILL_DONE, DECODE_START, DONE, BATCH_DONE = range(7)


@dataclass
class SimResult:
    jct_s: float
    turns: int
    turns_per_s: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    tpot_mean: float
    slo_attainment: float
    storage_busy_pe: float
    """Mean over prefill nodes of the share of the run their storage NIC was busy."""
    storage_busy_de: float
    read_bytes_pe: float
    read_bytes_de: float
    prefill_busy: float
    """Mean share of the run the prefill GPUs were computing."""
    events: int
    ttft_mean: float = math.nan


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


class Simulator:
    def __init__(self, cluster: SimCluster, perf: PerfModel, trajectories, *,
                 online: bool = False, slo_ttft_s: float = 4.0, slo_tpot_s: float = 0.050,
                 hits: dict[tuple[int, int], int] | None = None,
                 prefill_hits: dict[tuple[int, int], int] | None = None,
                 held: dict[tuple[int, int], int] | None = None):
        """`hits`: (agent, turn) -> prefix tokens the turn found stored, in place of the whole
        earlier context (e.g. what a measured run actually reused). `prefill_hits`: of those,
        what the prefill reused (it computes the rest), where that differs: with DualPath on a
        measured decode restored the whole prefix while its prefill recomputed part of it.
        `held`: of the stored prefix, what the prefill found in its own pools (no storage
        read), in place of the model's LRU of agents' prefixes (`pe_cache_tokens`)."""
        self.c, self.perf, self.online = cluster, perf, online
        self.slo = (slo_ttft_s, slo_tpot_s)
        g = cluster.gpus_per_node
        pre = [EngineSpec(f"p{n}.{i}", f"pn{n}", f"pn{n}") for n in range(cluster.prefill_nodes)
               for i in range(g)]
        dec = [EngineSpec(f"d{n}.{i}", f"dn{n}", f"dn{n}", cluster.decode_kv_tokens)
               for n in range(cluster.decode_nodes) for i in range(g)]
        self.n_pe, self.n_de = len(pre), len(dec)
        # per-turn arrays (index = turn id); agents' turns are consecutive ids
        self.agent_first, self.turn_agent, self.prompt, self.hit, self.gen = [], [], [], [], []
        self.arrival_at = []
        for traj in trajectories:
            self.agent_first.append(len(self.prompt))
            ctx = traj.initial
            for t, (append, gen) in enumerate(traj.turns):
                self.turn_agent.append(len(self.agent_first) - 1)
                self.hit.append(0 if t == 0 else ctx - ctx % PAGE)
                ctx += append
                self.prompt.append(ctx)
                self.gen.append(gen)
                ctx += gen
            self.arrival_at.append(traj.arrival_s if online else 0.0)
        turn_of = [tid - self.agent_first[a] for tid, a in enumerate(self.turn_agent)]
        self._override(self.hit, hits, turn_of, self.prompt)
        self.pe_hit = list(self.hit)  # the prefix the prefill reuses (computes the rest)
        self._override(self.pe_hit, prefill_hits, turn_of, self.hit)
        self.held = None
        if held is not None:
            self.held = [0] * len(self.prompt)
            self._override(self.held, held, turn_of, self.hit)
        self.agent_end = self.agent_first[1:] + [len(self.prompt)]
        if cluster.policy == "basic":
            self.sched = PairScheduler(pre, dec, "round_robin")
        else:
            mean_prompt = sum(self.prompt) / max(1, len(self.prompt))
            mean_miss = sum(p - h for p, h in zip(self.prompt, self.hit, strict=True)) / max(
                1, len(self.prompt))
            cfg = SchedulerConfig(
                read_side=cluster.read_side,
                initial_read_tokens_per_s=cluster.storage_bytes_per_s / cluster.kv_bytes_per_token,
                initial_prefill_tokens_per_s=cluster.router_prefill_tokens_per_s
                or mean_prompt / perf.prefill_s(int(mean_miss), int(mean_prompt)))
            self.sched = GlobalScheduler(pre, dec, cfg)
        self.pe_index = {s.name: i for i, s in enumerate(pre)}
        self.de_index = {s.name: i for i, s in enumerate(dec)}
        self.pe_node = [i // g for i in range(self.n_pe)]
        self.de_node = [i // g for i in range(self.n_de)]
        self.pe_cache: list[OrderedDict] = [OrderedDict() for _ in range(self.n_pe)]

    def _override(self, target: list[int], given, turn_of: list[int], cap: list[int]) -> None:
        """target[tid] = given[(agent, turn)] capped by cap[tid], page-aligned, where given."""
        for tid, a in enumerate(self.turn_agent):
            h = given.get((a, turn_of[tid])) if given else None
            if h is not None:
                h = min(int(h), cap[tid])
                target[tid] = h - h % PAGE

    def _pe_cached(self, pe: int, tid: int) -> int:
        """Tokens of turn `tid`'s stored prefix the prefill engine still holds (LRU by agent;
        the held prefix of an agent is its last prompt there)."""
        held = self.pe_cache[pe].get(self.turn_agent[tid], 0)
        return min(held - held % PAGE, self.hit[tid])

    def _pe_keep(self, pe: int, tid: int) -> None:
        cap = self.c.pe_cache_tokens
        if cap <= 0:
            return
        cache, agent = self.pe_cache[pe], self.turn_agent[tid]
        cache.pop(agent, None)
        cache[agent] = self.prompt[tid]
        total = sum(cache.values())
        while total > cap and cache:
            _, n = cache.popitem(last=False)
            total -= n

    def run(self) -> SimResult:
        c, perf = self.c, self.perf
        kvb, store_bps = c.kv_bytes_per_token, c.storage_bytes_per_s
        nic_bps, h2d_bps = c.compute_nic_gbps * 1e9, c.h2d_gbps * 1e9
        n_turns = len(self.prompt)
        pe_link = [0.0] * c.prefill_nodes
        de_link = [0.0] * c.decode_nodes
        pe_link_busy = [0.0] * c.prefill_nodes
        de_link_busy = [0.0] * c.decode_nodes
        read_bytes = [0.0, 0.0]
        pe_nic = [0.0] * self.n_pe
        de_nic = [0.0] * self.n_de
        pe_queue = [deque() for _ in range(self.n_pe)]
        pe_busy = [False] * self.n_pe
        pe_left = [0] * self.n_pe  # turns of the running batch not yet done
        pe_kv = [0] * self.n_pe  # GPU-pool tokens held by turns from prefill start to handoff
        kv_cap = c.prefill_kv_tokens
        # the prefill's host staging: a turn's read prefix (either side's read lands there)
        # from read start until its prefill moves it to the GPU
        stage_cap, staged = c.prefill_staging_tokens, [0] * n_turns
        pe_stage = [0] * self.n_pe
        stage_wait = [deque() for _ in range(self.n_pe)]
        # loads (either side's read + forward) a prefill has in flight: its prefetch IO threads
        load_cap, pe_loads = c.prefill_loads, [0] * self.n_pe
        pe_busy_s = 0.0
        de_running = [0] * self.n_de
        de_ctx = [0] * self.n_de
        plan_pe, plan_de, plan_de_read = [0] * n_turns, [0] * n_turns, [0] * n_turns
        arrive_t, ttft, tpot = [0.0] * n_turns, [0.0] * n_turns, [0.0] * n_turns
        heap: list = []
        seq = 0

        def push(t, kind, x):
            nonlocal seq
            seq += 1
            heapq.heappush(heap, (t, seq, kind, x))

        for a, first in enumerate(self.agent_first):
            if first < self.agent_end[a]:
                push(self.arrival_at[a], ARRIVE, first)
        sched, waiting, tick_pending, events, done, last_t = self.sched, 0, False, 0, 0, 0.0
        iv = c.schedule_interval_s

        def request_tick(now):
            nonlocal tick_pending
            if not tick_pending:  # the scheduler runs on its tick: events in one tick share a run
                tick_pending = True
                push(math.ceil(now / iv) * iv, SCHEDULE, -1)

        def storage_read(link, busy, node, nbytes, now) -> float:
            """FCFS at line rate on one node's storage NIC; returns when the read ends."""
            link[node] = max(now, link[node]) + nbytes / store_bps
            busy[node] += nbytes / store_bps
            return link[node]

        # reads taking turns a batch each (c.read_batch_bytes > 0), else first come first served
        rr = (BatchTurns(c.read_batch_bytes, store_bps, {"pe": pe_link_busy, "de": de_link_busy},
                         {"pe": c.prefill_nodes, "de": c.decode_nodes}, n_turns, push,
                         BATCH_DONE) if c.read_batch_bytes else None)

        def start_read(t, pe_bytes, de_bytes, now):
            """Both sides' reads of turn t start now; it lands in its prefill's staging."""
            pe, de = plan_pe[t], plan_de[t]
            pe_stage[pe] += staged[t]
            pe_loads[pe] += 1
            read_bytes[0] += pe_bytes
            read_bytes[1] += de_bytes
            if rr is not None and (pe_bytes or de_bytes):
                rr.start(t, now)
                if pe_bytes:
                    rr.read(t, "pe", self.pe_node[pe], pe_bytes, now)
                if de_bytes:
                    rr.read(t, "de", self.de_node[de], de_bytes, now)
                return
            ready = now
            if pe_bytes:
                ready = storage_read(pe_link, pe_link_busy, self.pe_node[pe], pe_bytes, now)
            if de_bytes:
                end = storage_read(de_link, de_link_busy, self.de_node[de], de_bytes, now)
                fwd = max(end, de_nic[de]) + de_bytes / nic_bps  # DE -> PE
                de_nic[de] = fwd
                ready = max(ready, fwd)
            push(ready, READ_DONE, t)

        def can_read(pe, stored) -> bool:
            """Room in the prefill's staging (always when empty) and a free load slot?"""
            if load_cap and pe_loads[pe] >= load_cap:
                return False
            return not (stage_cap and pe_stage[pe] and pe_stage[pe] + stored > stage_cap)

        def start_waiting_reads(pe, now):
            q = stage_wait[pe]
            while q and can_read(pe, staged[q[0][0]]):
                start_read(*q.popleft(), now)

        def unstage(pe, t, now):
            """Turn t's prefix left the prefill's staging for its GPU pool: start the reads
            that waited for room, in order."""
            pe_stage[pe] -= staged[t]
            start_waiting_reads(pe, now)

        def start_prefill(pe, now):
            """Start the head of the engine's queue if it fits its GPU pool (always when the
            pool holds nothing else)."""
            nonlocal pe_busy_s
            batch = []
            while pe_queue[pe] and len(batch) < c.prefill_batch:
                tid = pe_queue[pe][0]
                if kv_cap and pe_kv[pe] and pe_kv[pe] + self.prompt[tid] > kv_cap:
                    break
                pe_queue[pe].popleft()
                pe_kv[pe] += self.prompt[tid]
                unstage(pe, tid, now)
                batch.append(tid)
            if not batch:
                return
            pe_busy[pe] = True
            pe_left[pe] = len(batch)
            # the prefixes go host -> GPU layer by layer while the missed tokens compute
            dt = max(perf.prefill_batch_s([(self.prompt[t] - self.pe_hit[t], self.prompt[t])
                                           for t in batch]),
                     sum(self.pe_hit[t] for t in batch) * kvb / h2d_bps)
            pe_busy_s += dt
            for tid in batch:
                push(now + dt, PREFILL_DONE, tid)

        while heap:
            now, _, kind, tid = heapq.heappop(heap)
            events += 1
            if kind == ARRIVE:
                arrive_t[tid] = now
                sched.submit(Request(str(tid), self.prompt[tid], self.hit[tid], self.gen[tid]))
                waiting += 1
                request_tick(now)
            elif kind == SCHEDULE:
                tick_pending = False
                for plan in sched.schedule():
                    waiting -= 1
                    t = int(plan.rid)
                    pe, de = self.pe_index[plan.prefill], self.de_index[plan.decode]
                    plan_pe[t], plan_de[t] = pe, de
                    # tokens the plan reads -> bytes actually stored (the trace knows the hit),
                    # less what the prefill engine still caches of this agent's prefix
                    stored = self.hit[t] - (self.held[t] if self.held is not None
                                            else self._pe_cached(pe, t))
                    total = plan.pe_read_tokens + plan.de_read_tokens
                    de_share = plan.de_read_tokens / total if total else 0.0
                    de_bytes = round(stored * de_share) * kvb
                    pe_bytes = stored * kvb - de_bytes
                    if de_share >= 1 and self.hit[t]:
                        # a decode-side plan: the decode takes the whole stored prefix as its
                        # own (miss-only return), so it also reads what the prefill held (the
                        # model forwards that part too: a few ms on the compute link)
                        de_bytes = self.hit[t] * kvb
                    plan_de_read[t] = de_bytes
                    staged[t] = stored
                    # nothing stored: no load at all (it never waits for one)
                    if stored and (stage_wait[pe] or not can_read(pe, stored)):
                        stage_wait[pe].append((t, pe_bytes, de_bytes))  # in order, later
                    else:
                        start_read(t, pe_bytes, de_bytes, now)
                # what still waits was refused: only a finished read, prefill or turn can change
                # that, and each of those asks for the next tick (no polling)
                if waiting and not heap:  # nothing in flight, nothing to arrive: never runs
                    break
            elif kind == BATCH_DONE:  # tid: the link whose batch ended

                def landed(t, nbytes, now=now):  # a decode batch crosses as it lands
                    de = plan_de[t]
                    de_nic[de] = max(now, de_nic[de]) + nbytes / nic_bps
                    return de_nic[de]
                ended = rr.batch_done(tid, now, landed)
                if ended is not None:
                    push(ended[1], READ_DONE, ended[0])
            elif kind == READ_DONE:
                sched.read_done(str(tid))
                if waiting:
                    request_tick(now)
                pe = plan_pe[tid]
                pe_loads[pe] -= 1
                start_waiting_reads(pe, now)
                pe_queue[pe].append(tid)
                if not pe_busy[pe]:
                    start_prefill(pe, now)
            elif kind == PREFILL_DONE:
                pe, de = plan_pe[tid], plan_de[tid]
                self._pe_keep(pe, tid)
                sched.prefill_done(str(tid))
                pe_left[pe] -= 1
                if not pe_left[pe]:  # the batch's last turn: the engine is free
                    pe_busy[pe] = False
                if waiting:
                    request_tick(now)
                if pe_queue[pe] and not pe_busy[pe]:
                    start_prefill(pe, now)
                # miss-only return when the decode read the whole prefix itself
                miss_only = plan_de_read[tid] == self.hit[tid] * kvb and self.hit[tid] > 0
                send = (self.prompt[tid] - self.hit[tid] if miss_only else self.prompt[tid]) * kvb
                arrive = max(now, pe_nic[pe]) + send / nic_bps
                pe_nic[pe] = arrive
                if miss_only:  # the decode restores the prefix it read: H2D, overlapped
                    arrive = max(arrive, now + self.hit[tid] * kvb / h2d_bps)
                push(arrive, DECODE_START, tid)
            elif kind == DECODE_START:
                pe = plan_pe[tid]
                pe_kv[pe] -= self.prompt[tid]  # its KV reached the decode: the prefill frees it
                if pe_queue[pe] and not pe_busy[pe]:
                    start_prefill(pe, now)
                de = plan_de[tid]
                de_running[de] += 1
                de_ctx[de] += self.prompt[tid]
                step = perf.decode_step_s(de_running[de], de_ctx[de])
                tpot[tid] = step
                ttft[tid] = now + step - arrive_t[tid]
                push(now + step * max(1, self.gen[tid]), DONE, tid)
            else:  # DONE
                de = plan_de[tid]
                de_running[de] -= 1
                de_ctx[de] -= self.prompt[tid]
                sched.finish(str(tid))
                done += 1
                last_t = now
                a = self.turn_agent[tid]
                if tid + 1 < self.agent_end[a]:
                    push(now, ARRIVE, tid + 1)  # the agent's next turn (no tool time)
                if waiting:
                    request_tick(now)
        if done != n_turns:
            raise RuntimeError(f"simulation ended with {n_turns - done} turns unserved "
                               "(a request larger than any engine's KV capacity?)")
        jct = max(last_t, 1e-9)
        ok = sum(1 for i in range(n_turns)
                 if ttft[i] <= self.slo[0] and tpot[i] <= self.slo[1])
        return SimResult(
            jct_s=jct, turns=n_turns, turns_per_s=n_turns / jct,
            ttft_p50=_pct(ttft, 0.5), ttft_p90=_pct(ttft, 0.9), ttft_p99=_pct(ttft, 0.99),
            tpot_mean=sum(tpot) / max(1, n_turns), slo_attainment=ok / max(1, n_turns),
            storage_busy_pe=sum(pe_link_busy) / (c.prefill_nodes * jct),
            storage_busy_de=sum(de_link_busy) / (c.decode_nodes * jct),
            read_bytes_pe=read_bytes[0], read_bytes_de=read_bytes[1],
            prefill_busy=pe_busy_s / (self.n_pe * jct), events=events,
            ttft_mean=sum(ttft) / max(1, n_turns))


def simulate(cluster: SimCluster, perf: PerfModel, trajectories, **kw) -> SimResult:
    return Simulator(cluster, perf, trajectories, **kw).run()
