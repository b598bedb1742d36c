"""The GIL monitor (sglang_plugin/gil_monitor.py): a thread held off the GIL by a C call that
keeps it shows up as a stall with the watched thread's place; a garbage collection inside the
stall is named; short waits are not stalls."""

import gc
import threading
import time

import pytest

from dualpath.sglang_plugin.gil_monitor import GilMonitor


def test_accounting_buckets_gc_and_sites():
    m = GilMonitor(tick_s=0.005, report_over_s=0.05, watch_thread=threading.get_ident())
    m.observe(0.0002, time.perf_counter())  # a normal hand-over: no stall
    m.observe(0.003, time.perf_counter())
    now = time.perf_counter()
    m._gc_spans.append((now - 0.03, now - 0.01))  # 20 ms of GC in a 120 ms stall: not its cause
    m.observe(0.12, now)
    m._gc_spans.append((now - 0.2, now - 0.05))  # 150 of 170 ms: the GC's
    m.observe(0.17, now)
    s = m.snapshot()
    assert s["ticks"] == 4 and s["stalls_ge_ms"] == {"1": 3, "5": 2, "20": 2, "100": 2, "500": 0}
    assert s["max_ms"] == 170.0 and s["stalled_s"] == pytest.approx(0.293)
    assert s["stalls_in_gc"] == 1
    assert sum(n for _, n in s["sites"]) == 2  # this thread's frame at each (two lines)
    assert all("test_accounting_buckets_gc_and_sites" in site for site, _ in s["sites"])


def test_a_collection_inside_snapshot_does_not_deadlock():
    """The GC callback takes no lock: a collection that starts while this thread holds the
    monitor's lock (inside snapshot) must not block it (it did: a non-reentrant lock)."""
    m = GilMonitor(watch_thread=threading.get_ident())
    gc.callbacks.append(m._on_gc)
    try:
        with m._lock:  # as snapshot() holds it while it allocates
            gc.collect()  # runs the callback on this very thread
        assert m.snapshot()["gc"]["2"]["count"] == 1
    finally:
        gc.callbacks.remove(m._on_gc)


def test_a_gil_holding_call_is_a_stall_and_gc_pauses_are_counted():
    m = GilMonitor(tick_s=0.002, report_over_s=10.0, watch_thread=threading.get_ident()).start()
    try:
        time.sleep(0.05)  # ticks run
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.08:  # hold the GIL: one C call that never yields
            sum(range(3_000_000))  # noqa: B018  (~30-60 ms per call on the CI VM, GIL held)
        gc.collect()
        time.sleep(0.05)
    finally:
        m.stop()
    s = m.snapshot()
    assert s["ticks"] > 5 and s["stalls_ge_ms"]["5"] >= 1 and s["max_ms"] >= 5
    assert s["gc"]["2"]["count"] >= 1 and s["gc"]["2"]["pause_s"] > 0
    assert not m._thread.is_alive()


def test_bad_settings_raise():
    with pytest.raises(ValueError):
        GilMonitor(tick_s=0)
