"""How long this process's threads wait for the GIL: a thread that sleeps one tick, then
measures how late it got to run Python again.

Every helper thread of a server (SGLang's KV transfer workers, our storage reads and writes,
the agent) releases the GIL around its system calls and copies and must win it back from the
scheduler thread, which always runs Python. With the 0.2 ms switch interval that should take
well under a millisecond, unless something holds the GIL without the interpreter's switch
points: a C call that keeps it (a long numpy or pickle call, a CUDA call through a binding that
does not release it) or the garbage collector. Our PD sender showed exactly such stalls (2x
H200, 8cde10f: a one-page KV send 4-477 ms, a 0.2 ms aux write 2-113 ms, 1 GB copies at 50
instead of 310 GB/s). This monitor says how often, how long, whether a GC was running, and where
the watched thread (the scheduler's) was when the stall ended.

Started with `--dualpath-gil-monitor` in every scheduler process; `snapshot()` goes into the
agent's /dualpath/stats (`gil`) and its Prometheus metrics; each stall of `report_over_s` or
more is logged (at most one line a second). A tick costs the other threads one GIL hand-over.
"""

from __future__ import annotations

import collections
import gc
import logging
import sys
import threading
import time

from prometheus_client import Counter, Histogram

from dualpath.sglang_plugin.stack_sampler import fold

log = logging.getLogger("dualpath.gil_monitor")
BUCKETS_S = (0.001, 0.005, 0.02, 0.1, 0.5)  # a stall is lateness past the tick
STALLS = Histogram("dualpath_gil_stall_seconds", "How late a thread that slept one tick got "
                   "the GIL back (stalls of 1 ms or more)", buckets=BUCKETS_S)
GC_PAUSE = Counter("dualpath_gc_pause_seconds", "Time in Python's garbage collector", ["gen"])
SITES_KEPT = 200


class GilMonitor:
    def __init__(self, tick_s: float = 0.005, report_over_s: float = 0.05,
                 watch_thread: int | None = None):
        if not tick_s > 0 or not report_over_s > 0:
            raise ValueError("GilMonitor: tick_s and report_over_s must be > 0")
        self.tick_s, self.report_over_s, self.watch = tick_s, report_over_s, watch_thread
        self._lock = threading.Lock()
        self.ticks = 0
        self.stalls = [0] * len(BUCKETS_S)  # lateness >= each bucket
        self.stalled_s = 0.0  # lateness summed over the stalls of >= 1 ms
        self.max_s = 0.0
        self.in_gc = 0  # stalls of >= 5 ms that overlapped a collection
        self.sites: collections.Counter[str] = collections.Counter()  # stalls >= 20 ms
        self.gc = {g: [0, 0.0, 0.0] for g in (0, 1, 2)}  # gen -> [count, pause s, max s]
        self._gc_start: float | None = None
        # the GC callback takes no lock (a collection can start on a thread that holds ours,
        # inside snapshot(): a non-reentrant lock would deadlock it): it only appends here
        # (deque.append is atomic); the ticking thread and snapshot() fold them in
        self._gc_done: collections.deque[tuple[int, float, float]] = collections.deque()
        self._gc_spans: collections.deque[tuple[float, float]] = collections.deque(maxlen=256)
        self._last_log = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="dualpath-gil-monitor")

    def start(self) -> GilMonitor:
        gc.callbacks.append(self._on_gc)
        self._thread.start()
        log.info("GIL monitor: %.1f ms ticks, stalls of %.0f ms or more logged", 1e3 * self.tick_s,
                 1e3 * self.report_over_s)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(1.0)

    # ---- the garbage collector (runs with the GIL held, on whichever thread triggered it) ----
    def _on_gc(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._gc_start = now
        elif self._gc_start is not None:
            start, self._gc_start = self._gc_start, None
            self._gc_spans.append((start, now))
            self._gc_done.append((info.get("generation", 2), start, now))

    def _fold_gc(self) -> None:
        """Account the collections the callback saw (call with self._lock held)."""
        while True:
            try:
                gen, start, end = self._gc_done.popleft()
            except IndexError:
                return
            row = self.gc.setdefault(gen, [0, 0.0, 0.0])
            row[0] += 1
            row[1] += end - start
            row[2] = max(row[2], end - start)
            GC_PAUSE.labels(str(gen)).inc(end - start)

    # ---- the ticking thread ----
    def observe(self, late_s: float, woke_at: float) -> None:
        """Account one tick that ran `late_s` past its sleep and ended at `woke_at`
        (perf_counter); public for tests."""
        where = None
        if late_s >= 0.02 and self.watch is not None:
            frame = sys._current_frames().get(self.watch)
            where = fold(frame, 6) if frame is not None else None
        gc_hit = late_s >= 0.005 and 2 * self.gc_overlap(woke_at - late_s, woke_at) >= late_s
        with self._lock:
            self._fold_gc()
            self.ticks += 1
            if late_s >= BUCKETS_S[0]:
                self.stalled_s += late_s
                self.max_s = max(self.max_s, late_s)
                for i, b in enumerate(BUCKETS_S):
                    if late_s >= b:
                        self.stalls[i] += 1
                self.in_gc += gc_hit
                if where is not None and (where in self.sites or len(self.sites) < SITES_KEPT):
                    self.sites[where] += 1
        if late_s >= BUCKETS_S[0]:
            STALLS.observe(late_s)
        if late_s >= self.report_over_s and woke_at - self._last_log >= 1.0:
            self._last_log = woke_at
            log.warning("GIL stall %.1f ms%s; the scheduler thread then at %s", 1e3 * late_s,
                        " (a garbage collection ran)" if gc_hit else "", where or "?")

    def gc_overlap(self, t0: float, t1: float) -> float:
        """Seconds of [t0, t1] spent in collections (a stall counts as the GC's when they
        cover half of it: a busy process runs a 0.1 ms gen-0 collection every few ms)."""
        return sum(max(0.0, min(e, t1) - max(s, t0)) for s, e in list(self._gc_spans))

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(self.tick_s)  # releases the GIL; waking needs it back
            t1 = time.perf_counter()
            self.observe(max(0.0, t1 - t0 - self.tick_s), t1)

    def snapshot(self) -> dict:
        with self._lock:
            self._fold_gc()
            return {"ticks": self.ticks, "tick_ms": 1e3 * self.tick_s,
                    "stalls_ge_ms": {f"{1e3 * b:g}": n for b, n in zip(BUCKETS_S, self.stalls,
                                                                     strict=True)},
                    "stalled_s": round(self.stalled_s, 4), "max_ms": round(1e3 * self.max_s, 2),
                    "stalls_in_gc": self.in_gc,
                    "gc": {str(g): {"count": r[0], "pause_s": round(r[1], 4),
                                    "max_ms": round(1e3 * r[2], 2)} for g, r in self.gc.items()},
                    "sites": self.sites.most_common(10)}


_MONITOR: GilMonitor | None = None


def start_for_current_thread() -> GilMonitor:
    """Watch the calling (scheduler) thread; once per process."""
    global _MONITOR
    if _MONITOR is None:
        _MONITOR = GilMonitor(watch_thread=threading.get_ident()).start()
    return _MONITOR


def snapshot() -> dict | None:
    return _MONITOR.snapshot() if _MONITOR is not None else None
