"""The storage NIC of one node: a meter on every read and write, and an optional bandwidth cap.

On one GPU host every engine shares one memory bus, so a node's storage NIC must be modelled
explicitly (DESIGN.md): `cap_gbps` makes each transfer take at least bytes / cap, shared
first-come-first-served by all transfers of the node in this process, like a link at line rate.
The link is full duplex, as an Ethernet or InfiniBand NIC is: reads (receive) and writes
(transmit) each have the cap, so a node's KV write-back does not take its read bandwidth.
With the cap off (None) this is only a meter, which is what runs in production.

The read queue (reads submitted and not yet finished, in bytes and tokens) is the scheduler's
`read_q`. `snapshot()` is a cheap in-process copy; the same numbers are Prometheus metrics
labelled by node.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

_BYTES = Counter("dualpath_storage_bytes", "Bytes moved by the node's storage NIC",
                 ["node", "op"])
_OPS = Counter("dualpath_storage_ops", "Block transfers by the node's storage NIC", ["node", "op"])
_IN_FLIGHT = Gauge("dualpath_storage_in_flight", "Transfers in progress", ["node", "op"])
_QUEUE_BYTES = Gauge("dualpath_storage_read_queue_bytes", "Reads submitted, not finished",
                     ["node"])
_QUEUE_TOKENS = Gauge("dualpath_storage_read_queue_tokens", "Reads submitted, not finished, "
                      "in tokens", ["node"])
_CAP = Gauge("dualpath_storage_cap_gbps", "Emulated NIC cap (0 = none)", ["node"])


@dataclass(frozen=True)
class NicSnapshot:
    node: str
    read_bytes: int
    write_bytes: int
    read_ops: int
    write_ops: int
    reads_in_flight: int
    writes_in_flight: int
    read_queue_bytes: int
    read_queue_tokens: int
    read_busy_s: float
    """Seconds with at least one read in flight (rate = read_bytes / read_busy_s)."""


class LinkClock:
    """First-come-first-served line-rate clock: a transfer of n bytes reserved at time t ends at
    max(t, previous end) + n / rate. Up to `burst_bytes` of idle credit may accumulate."""

    def __init__(self, bytes_per_s: float, burst_bytes: int = 0):
        if bytes_per_s <= 0:
            raise ValueError("a link rate must be > 0")
        self.rate, self.burst_s = bytes_per_s, burst_bytes / bytes_per_s
        self._end = 0.0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int, now: float | None = None) -> float:
        """Return the monotonic time at which this transfer may complete."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._end = max(now - self.burst_s, self._end) + nbytes / self.rate
            return self._end


@dataclass(eq=False)
class BatchTransfer:
    """n transfers done by one call (`StorageNic.transfers`): `ends` are their line-rate finish
    times (time.monotonic; None without a cap), `ok` is set by the caller to the number that
    moved their bytes."""

    n: int
    ends: list[float] | None = None
    ok: int = 0
    nbytes: int = 0  # each
    tokens: int = 0  # each
    retired: int = 0  # queued reads that already left the read queue at their ends


class StorageNic:
    def __init__(self, node: str, cap_gbps: float | None = None, burst_bytes: int = 0):
        self.node = node
        self._burst_bytes = burst_bytes
        self._lock = threading.Lock()
        self.cap_gbps: float | None = None
        self._clocks: dict[str, LinkClock] = {}  # per direction: "read", "write"
        self.set_cap(cap_gbps)
        self._c = {"read_bytes": 0, "write_bytes": 0, "read_ops": 0, "write_ops": 0,
                   "reads_in_flight": 0, "writes_in_flight": 0, "read_queue_bytes": 0,
                   "read_queue_tokens": 0}
        self._busy_s, self._busy_since = 0.0, None
        # queued reads of native batches with line-rate ends: each leaves the read queue at its
        # end time (`_retire_due`), as the Python reader's reads leave it one by one, not all
        # when the batch returns
        self._timed: list[BatchTransfer] = []

    def set_cap(self, cap_gbps: float | None) -> None:
        """Change the emulated cap (None = meter only). Transfers already reserved keep their
        end times; later ones queue behind them at the new rate."""
        if cap_gbps is not None and not cap_gbps > 0:
            raise ValueError(f"cap_gbps must be > 0 or None, got {cap_gbps}")
        clocks = ({op: LinkClock(cap_gbps * 1e9, self._burst_bytes) for op in ("read", "write")}
                  if cap_gbps else {})
        with self._lock:
            for op, clock in clocks.items():
                if op in self._clocks:
                    clock._end = self._clocks[op]._end
            self.cap_gbps, self._clocks = cap_gbps, clocks
        _CAP.labels(self.node).set(cap_gbps or 0)

    # ---- the read queue (what the scheduler sees) ----
    def submit_read(self, nbytes: int, tokens: int) -> None:
        with self._lock:
            self._c["read_queue_bytes"] += nbytes
            self._c["read_queue_tokens"] += tokens
        _QUEUE_BYTES.labels(self.node).inc(nbytes)
        _QUEUE_TOKENS.labels(self.node).inc(tokens)

    def _retire_read(self, nbytes: int, tokens: int) -> None:
        with self._lock:
            self._c["read_queue_bytes"] -= nbytes
            self._c["read_queue_tokens"] -= tokens
        _QUEUE_BYTES.labels(self.node).dec(nbytes)
        _QUEUE_TOKENS.labels(self.node).dec(tokens)

    # ---- transfers ----
    @contextmanager
    def transfer(self, op: str, nbytes: int, tokens: int = 0,
                 queued: bool = False, started_at: float | None = None) -> Iterator[None]:
        """Wrap one block transfer (op 'read' or 'write'). Counts it, holds it to the cap, and
        for a read submitted with `submit_read` (queued=True) takes it off the queue at the end.
        A failed transfer is not counted as moved bytes. `started_at` (time.monotonic): the
        transfer already ran from then (a native write), so its line-rate end counts from
        there; it is in flight only while it waits for that end."""
        clock = self._check_op(op)
        end = clock.reserve(nbytes, now=started_at) if clock else None
        self._begin(op, 1)
        ok = False
        try:
            yield
            ok = True
            if end is not None:
                wait = end - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
        finally:
            self._end(op, 1, int(ok), nbytes)
            if queued:
                self._retire_read(nbytes, tokens)

    @contextmanager
    def transfers(self, op: str, n: int, nbytes: int, tokens: int = 0,
                  queued: bool = False) -> Iterator[BatchTransfer]:
        """`transfer` for n blocks of `nbytes` that one native call moves: each is reserved on
        the clock now, in order (the call waits for `ends` itself, without the GIL); at exit the
        batch's `ok` count is counted as moved and, for reads submitted with `submit_read`, all
        n leave the queue (those whose line-rate end passed already did, `_retire_due`)."""
        clock = self._check_op(op)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        batch = BatchTransfer(n, [clock.reserve(nbytes) for _ in range(n)] if clock else None,
                              nbytes=nbytes, tokens=tokens)
        timed = queued and bool(batch.ends)
        if timed:
            with self._lock:
                self._timed.append(batch)
        self._begin(op, n)
        try:
            yield batch
        finally:
            self._end(op, n, min(max(batch.ok, 0), n), nbytes)
            if timed:
                with self._lock:
                    self._timed.remove(batch)
            left = n - batch.retired
            if queued and left:
                self._retire_read(left * nbytes, left * tokens)

    def _check_op(self, op: str) -> LinkClock | None:
        """The op's line-rate clock (None without a cap); ValueError for an unknown op."""
        if op not in ("read", "write"):
            raise ValueError(f"op must be 'read' or 'write', got {op!r}")
        return self._clocks.get(op)

    def _begin(self, op: str, n: int) -> None:
        with self._lock:
            self._c[f"{op}s_in_flight"] += n
            if op == "read" and n and self._c["reads_in_flight"] == n:
                self._busy_since = time.monotonic()
        _IN_FLIGHT.labels(self.node, op).inc(n)

    def _end(self, op: str, n: int, ok: int, nbytes: int) -> None:
        """n transfers of `op` are over, `ok` of them moved their `nbytes`."""
        with self._lock:
            self._c[f"{op}s_in_flight"] -= n
            self._c[f"{op}_bytes"] += ok * nbytes
            self._c[f"{op}_ops"] += ok
            if op == "read" and n and self._c["reads_in_flight"] == 0:
                self._busy_s += time.monotonic() - self._busy_since
        _IN_FLIGHT.labels(self.node, op).dec(n)
        if ok:
            _BYTES.labels(self.node, op).inc(ok * nbytes)
            _OPS.labels(self.node, op).inc(ok)

    def _retire_due(self) -> None:
        """Queued reads of native batches whose line-rate end passed leave the read queue."""
        now = time.monotonic()
        due_bytes = due_tokens = 0
        with self._lock:
            for b in self._timed:
                i = b.retired
                while i < b.n and b.ends[i] <= now:
                    i += 1
                due_bytes += (i - b.retired) * b.nbytes
                due_tokens += (i - b.retired) * b.tokens
                b.retired = i
        if due_bytes:
            self._retire_read(due_bytes, due_tokens)

    def snapshot(self) -> NicSnapshot:
        if self._timed:
            self._retire_due()
        with self._lock:
            busy = self._busy_s
            if self._c["reads_in_flight"]:
                busy += time.monotonic() - self._busy_since
            return NicSnapshot(node=self.node, read_busy_s=busy, **self._c)
