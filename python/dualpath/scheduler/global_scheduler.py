"""The global scheduler: a FIFO of waiting requests, engine state, and the plans it produces.

Lifecycle (one instance, used from one thread: the router's event loop or the simulator):
  submit(req)         a request arrives; it waits in FIFO order
  schedule()          assign as many waiting requests as the rules allow -> [Plan]
  read_done(rid)      the plan's storage reads finished (frees the nodes' read queues)
  prefill_done(rid)   the PE finished the request (frees its tokens on the PE)
  finish(rid)         the request left the DE (frees tokens, the request slot and KV on the DE)
  report_*(...)       engines' own numbers replace the bookkeeping; measured rates move alpha/beta

A round runs Algorithm 1 over the queue (PE), phase 1 and phase 2 over the requests that got a PE
(DE), then picks the read side. A request that got a PE but no DE stays queued and its PE
choice is dropped; phase 2 does not keep global FIFO order (nor does the paper's).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dualpath.config import SchedulerConfig
from dualpath.scheduler.de import assign_groups, group_tokens, schedule_decode_group
from dualpath.scheduler.pe import schedule_prefill
from dualpath.scheduler.rates import RateMeter
from dualpath.scheduler.read_side import shorter_side, split_read
from dualpath.scheduler.state import EngineSpec, EngineTable, Request


@dataclass(frozen=True)
class Plan:
    rid: str
    prefill: str
    decode: str
    pe_read_tokens: int
    """Stored prefix tokens the PE's node reads."""
    de_read_tokens: int
    """Stored prefix tokens the DE's node reads and forwards to the PE."""

    @property
    def read_side(self) -> str:
        if self.pe_read_tokens and self.de_read_tokens:
            return "split"
        return "de" if self.de_read_tokens else "pe"


class GlobalScheduler:
    def __init__(self, prefill: Sequence[EngineSpec], decode: Sequence[EngineSpec],
                 cfg: SchedulerConfig | None = None):
        self.cfg = cfg or SchedulerConfig()
        if not prefill or not decode:
            raise ValueError("need at least one prefill and one decode engine")
        shared = {s.node for s in prefill} & {s.node for s in decode}
        if shared:
            raise ValueError(f"nodes {sorted(shared)} hold both prefill and decode engines; "
                             "a node's engines form one group of one role")
        self.pe = EngineTable.build(prefill)
        self.de = EngineTable.build(decode)
        self._de_members = self.de.group_members()
        self._de_group_tok = group_tokens(self.de)  # kept in step with de.tok
        self.pe_read_q = np.zeros(len(self.pe.node_names), dtype=np.int64)
        self.de_read_q = np.zeros(len(self.de.node_names), dtype=np.int64)
        w = self.cfg.rate_ewma
        self.pe_read_rate = [RateMeter(self.cfg.initial_read_tokens_per_s, w)
                             for _ in self.pe.node_names]
        self.de_read_rate = [RateMeter(self.cfg.initial_read_tokens_per_s, w)
                             for _ in self.de.node_names]
        self.prefill_rate = [RateMeter(self.cfg.initial_prefill_tokens_per_s, w)
                             for _ in self.pe.names]
        self.queue: deque[Request] = deque()
        self._queued: set[str] = set()
        self.running: dict[str, tuple[Request, Plan]] = {}
        self._prefilled: set[str] = set()
        self._down: set[str] = set()
        self._thresholds: tuple[np.ndarray, np.ndarray] | None = None  # (alpha, beta) cache
        self._pe_index = {n: i for i, n in enumerate(self.pe.names)}
        self._de_index = {n: i for i, n in enumerate(self.de.names)}

    # ---- thresholds ----
    def _alpha_beta(self) -> tuple[np.ndarray, np.ndarray]:
        if self._thresholds is None:  # rebuilt only after a rate report
            self._thresholds = (
                np.array([m.rate for m in self.pe_read_rate]) * self.cfg.alpha_window_s,
                np.array([m.rate for m in self.prefill_rate]) * self.cfg.beta_window_s)
        return self._thresholds

    @property
    def alpha(self) -> np.ndarray:
        """Per PE node: tokens it reads in alpha_window_s at its measured rate."""
        return self._alpha_beta()[0]

    @property
    def beta(self) -> np.ndarray:
        """Per PE: tokens it prefills in beta_window_s at its measured rate."""
        return self._alpha_beta()[1]

    # ---- requests ----
    def submit(self, req: Request) -> None:
        if req.rid in self.running or req.rid in self._queued:
            raise ValueError(f"request id {req.rid!r} is already queued or running")
        self.queue.append(req)
        self._queued.add(req.rid)

    def schedule(self) -> list[Plan]:
        if not self.queue:
            return []
        alpha, beta = self._alpha_beta()
        de, gtok = self.de, self._de_group_tok
        if self._down:  # unavailable engines: beta < 0 never admits, free KV < 0 never fits
            beta, de, gtok = beta.copy(), self.de.copy(), gtok.copy()
            for name in self._down:
                if name in self._pe_index:
                    beta[self._pe_index[name]] = -1
                else:
                    de.free_kv[self._de_index[name]] = -1
            for g, members in enumerate(self._de_members):
                if (de.free_kv[members] < 0).all():  # phase 1 must not pick a dead group
                    gtok[g] = 1 << 62  # never the least (and no overflow when added to)
        # Algorithm 1 stops at the first request no engine can take: cost ~ requests admitted,
        # not the queue length (tens of thousands wait at once in offline runs)
        # ... and no further than the decode side's free KV could hold: requests past that
        # would pass the prefill phase only to wait for a decode engine (and be retried on
        # every call)
        room = int(de.free_kv[de.free_kv > 0].sum())
        fits = 0
        for r in self.queue:
            room -= r.kv_tokens
            if room < 0:
                break
            fits += 1
        pe_of = schedule_prefill(itertools.islice(self.queue, fits), self.pe, self.pe_read_q,
                                 alpha, beta)
        got_pe = list(itertools.islice(self.queue, len(pe_of)))
        by_group: dict[int, list[int]] = {}
        for i, g in enumerate(assign_groups(got_pe, de, gtok)):
            by_group.setdefault(g, []).append(i)
        de_of: dict[int, int] = {}
        for g, idx in by_group.items():
            picks = schedule_decode_group([got_pe[i] for i in idx], de, self._de_members[g],
                                          self.cfg.de_high_token_factor)
            de_of.update(zip(idx[: len(picks)], picks, strict=False))
        plans = []
        for i, req in enumerate(got_pe):
            if i in de_of:
                plans.append(self._commit(req, pe_of[i], de_of[i]))
        if plans:  # they are among the first len(got_pe): only that head is rebuilt
            done = {p.rid for p in plans}
            self._queued -= done
            head = [self.queue.popleft() for _ in range(len(got_pe))]
            self.queue.extendleft(r for r in reversed(head) if r.rid not in done)
        return plans

    def cancel(self, rid: str) -> bool:
        """Drop a request that is still waiting; False if it is not in the queue."""
        if rid not in self._queued:
            return False
        self._queued.discard(rid)
        self.queue = deque(r for r in self.queue if r.rid != rid)
        return True

    def set_available(self, name: str, available: bool) -> None:
        """Take an engine out of (or back into) scheduling, e.g. after a failed request."""
        if name not in self._pe_index and name not in self._de_index:
            raise KeyError(f"unknown engine {name!r}")
        (self._down.discard if available else self._down.add)(name)

    def _commit(self, req: Request, pe: int, de: int) -> Plan:
        pn, dn = int(self.pe.node[pe]), int(self.de.node[de])
        mode = self.cfg.read_side
        if mode == "pe":
            pe_read, de_read = req.hit_len, 0
        elif mode == "de":
            pe_read, de_read = 0, req.hit_len
        elif mode == "shorter":
            side = shorter_side(self.pe_read_q[pn], self.de_read_q[dn])
            pe_read, de_read = (req.hit_len, 0) if side == "pe" else (0, req.hit_len)
        else:
            pe_read, de_read = split_read(req.hit_len, self.pe_read_q[pn], self.de_read_q[dn],
                                          self.pe_read_rate[pn].rate, self.de_read_rate[dn].rate,
                                          self.cfg.block_tokens)
        self.pe.tok[pe] += req.prompt_len
        self.pe.seq[pe] += 1
        self.de.tok[de] += req.prompt_len
        self._de_group_tok[self.de.group[de]] += req.prompt_len
        self.de.seq[de] += 1
        self.de.free_kv[de] -= req.kv_tokens
        self.pe_read_q[pn] += pe_read
        self.de_read_q[dn] += de_read
        plan = Plan(req.rid, self.pe.names[pe], self.de.names[de], int(pe_read), int(de_read))
        self.running[req.rid] = (req, plan)
        return plan

    def _running(self, rid: str) -> tuple[Request, Plan]:
        try:
            return self.running[rid]
        except KeyError:
            raise KeyError(f"request {rid!r} is not running") from None

    def read_done(self, rid: str) -> None:
        req, plan = self._running(rid)
        pn = self.pe.node[self._pe_index[plan.prefill]]
        dn = self.de.node[self._de_index[plan.decode]]
        # engine reports may have replaced the queue meanwhile: never below zero
        self.pe_read_q[pn] = max(0, self.pe_read_q[pn] - plan.pe_read_tokens)
        self.de_read_q[dn] = max(0, self.de_read_q[dn] - plan.de_read_tokens)
        self.running[rid] = (req, Plan(rid, plan.prefill, plan.decode, 0, 0))

    def prefill_done(self, rid: str) -> None:
        req, plan = self._running(rid)
        if rid in self._prefilled:
            return
        self._prefilled.add(rid)
        pe = self._pe_index[plan.prefill]
        self.pe.tok[pe] -= req.prompt_len
        self.pe.seq[pe] -= 1

    def finish(self, rid: str) -> None:
        """The request left the system (any stage): release whatever it still holds."""
        req, plan = self._running(rid)
        if plan.pe_read_tokens or plan.de_read_tokens:
            self.read_done(rid)
        self.prefill_done(rid)
        self._prefilled.discard(rid)
        de = self._de_index[plan.decode]
        self.de.tok[de] -= req.prompt_len
        self._de_group_tok[self.de.group[de]] -= req.prompt_len
        self.de.seq[de] -= 1
        self.de.free_kv[de] += req.kv_tokens
        del self.running[rid]

    def rebuilt(self, prefill: Sequence[EngineSpec],
                decode: Sequence[EngineSpec]) -> GlobalScheduler:
        """A scheduler over a new engine set that keeps the state of engines present in both:
        their loads, free KV, read queues and measured rates, the queue, and running requests
        whose engines all remain (the others are dropped: their engines are gone)."""
        new = GlobalScheduler(prefill, decode, self.cfg)
        for old_t, new_t in ((self.pe, new.pe), (self.de, new.de)):
            for i, name in enumerate(new_t.names):
                j = old_t.names.index(name) if name in old_t.names else None
                if j is not None:
                    new_t.tok[i], new_t.seq[i], new_t.free_kv[i] = (old_t.tok[j], old_t.seq[j],
                                                                    old_t.free_kv[j])
        for old_q, old_t, new_q, new_t in ((self.pe_read_q, self.pe, new.pe_read_q, new.pe),
                                           (self.de_read_q, self.de, new.de_read_q, new.de)):
            for i, node in enumerate(new_t.node_names):
                if node in old_t.node_names:
                    new_q[i] = old_q[old_t.node_names.index(node)]
        for old_m, old_names, new_m, new_names in (
                (self.pe_read_rate, self.pe.node_names, new.pe_read_rate, new.pe.node_names),
                (self.de_read_rate, self.de.node_names, new.de_read_rate, new.de.node_names),
                (self.prefill_rate, self.pe.names, new.prefill_rate, new.pe.names)):
            for i, name in enumerate(new_names):
                if name in old_names:
                    new_m[i] = old_m[old_names.index(name)]
        for req in self.queue:
            new.submit(req)
        for rid, (req, plan) in self.running.items():
            pe, de = new._pe_index.get(plan.prefill), new._de_index.get(plan.decode)
            if pe is not None and de is not None:
                new.running[rid] = (req, plan)
                if rid in self._prefilled:
                    new._prefilled.add(rid)
                continue
            # the request dies with its removed engine: release what it held on the survivors
            if pe is not None and rid not in self._prefilled:
                new.pe.tok[pe] -= req.prompt_len
                new.pe.seq[pe] -= 1
            if de is not None:
                new.de.tok[de] -= req.prompt_len
                new.de.seq[de] -= 1
                new.de.free_kv[de] += req.kv_tokens
            # read queues belong to nodes, which may survive the engine
            pe_node = self.pe.node_names[self.pe.node[self._pe_index[plan.prefill]]]
            de_node = self.de.node_names[self.de.node[self._de_index[plan.decode]]]
            if pe_node in new.pe.node_names:
                new.pe_read_q[new.pe.node_names.index(pe_node)] -= plan.pe_read_tokens
            if de_node in new.de.node_names:
                new.de_read_q[new.de.node_names.index(de_node)] -= plan.de_read_tokens
        new._down = {n for n in self._down if n in new._pe_index or n in new._de_index}
        new.refresh()
        return new

    def refresh(self) -> None:
        """Recompute derived state after the tables were edited directly (tests, simulator)."""
        self._de_group_tok = group_tokens(self.de)
        self._thresholds = None

    # ---- engine reports (authoritative over the bookkeeping above) ----
    def report_decode(self, name: str, *, free_kv: int) -> None:
        self.de.free_kv[self._de_index[name]] = free_kv

    def report_prefill_rate(self, name: str, tokens_total: float, busy_s_total: float) -> None:
        self.prefill_rate[self._pe_index[name]].observe(tokens_total, busy_s_total)
        self._thresholds = None

    def report_read(self, role: str, node: str, *, queue_tokens: int | None = None,
                    tokens_total: float | None = None, busy_s_total: float | None = None) -> None:
        table, q, meters = ((self.pe, self.pe_read_q, self.pe_read_rate) if role == "prefill"
                            else (self.de, self.de_read_q, self.de_read_rate))
        n = table.node_names.index(node)
        if queue_tokens is not None:
            q[n] = queue_tokens
        if tokens_total is not None and busy_s_total is not None:
            meters[n].observe(tokens_total, busy_s_total)
            self._thresholds = None
