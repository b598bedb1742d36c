#!/usr/bin/env python3
"""What storage reads and writes of page_first host pages cost a scheduler thread of the same
process, native block I/O against the Python reference (PageFirstAdapter.get_pages, the path
HiCache prefetches and the decode engine's reads take; set_pages, HiCache's write-through).

The "scheduler" is a thread that does a step of Python work then releases the GIL `--releases`
times (time.sleep(0): as a CUDA synchronize, a ZMQ poll or a lock do), like SGLang's scheduler
loop; its step time is measured alone, then while `--readers` threads read batches of 8 MiB Full
Blocks (8B-shaped model, tmpfs) into a host pool. Reported: read GB/s, and the step's p50/p90
against alone; then the same with one thread writing 16-page batches (fresh keys, each batch's
files removed after it, alike for both writers). On 2x H100 a decode engine reading ~2.6 GB/s
with the Python reader doubled its TPOT (session 18).

  python benchmark/storage/bench_pagefirst_gil.py [--dir /dev/shm/dualpath-pfgil] [--blocks 32]
      [--batch 16] [--io-threads 8] [--readers 2] [--seconds 3] [--releases 40]
      [--switch-interval-ms 0.2] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
try:  # the installed package over the source tree
    import dualpath  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "python"))

from bench_gil import emit  # noqa: E402  (this script's folder is on sys.path)

from dualpath.storage import BlockGeometry, BlockStore, fingerprint  # noqa: E402
from dualpath.storage.page_first import (  # noqa: E402
    PageFirstAdapter,
    native_reader,
    native_writer,
)
from dualpath.version import git_sha  # noqa: E402


def scheduler(stop: threading.Event, releases: int, steps: list) -> None:
    """Steps of ~20 us of Python, each followed by `releases` GIL hand-overs; step seconds."""
    while not stop.is_set():
        t0 = time.perf_counter()
        n = 0
        for _ in range(releases):
            for _ in range(50):
                n += 1
            time.sleep(0)
        steps.append(time.perf_counter() - t0)


def pct(xs: list, q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def measure(workers: list, seconds: float, releases: int) -> tuple[dict, float]:
    """Run `workers` (each `fn(stop) -> None`, looping until stop is set) next to the
    scheduler thread for `seconds`; the scheduler's step percentiles and the wall seconds."""
    stop, steps = threading.Event(), []
    threads = [threading.Thread(target=w, args=(stop,)) for w in workers]
    threads.append(threading.Thread(target=scheduler, args=(stop, releases, steps)))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return ({"step_ms_p50": round(pct(steps, 50) * 1e3, 3),
             "step_ms_p90": round(pct(steps, 90) * 1e3, 3), "steps": len(steps)},
            time.perf_counter() - t0)


def run_reads(adapter, keys, ptrs, batch: int, readers: int, seconds: float,
              releases: int) -> dict:
    moved = [0] * readers

    def reader(i: int):
        def read(stop: threading.Event) -> None:
            j = i * batch
            while not stop.is_set():
                ks = [keys[(j + x) % len(keys)] for x in range(batch)]
                if not all(adapter.get_pages(ks, *ptrs[i])):
                    raise RuntimeError("a block went missing")
                moved[i] += batch
                j += batch
        return read

    r, took = measure([reader(i) for i in range(readers)], seconds, releases)
    return {"read_gbps": round(sum(moved) * adapter.store.block_bytes / took / 1e9, 3), **r}


def run_writes(adapter, ptrs, batch: int, seconds: float, releases: int) -> dict:
    moved = [0]

    def write(stop: threading.Event) -> None:
        j = 0
        while not stop.is_set():
            ks = [f"pfgil-w{j}-{x}" for x in range(batch)]
            adapter.set_pages(ks, *ptrs[0])
            moved[0] += batch
            for key in ks:
                os.unlink(adapter.store.path(key))
            j += 1

    r, took = measure([write], seconds, releases)
    return {"write_gbps": round(moved[0] * adapter.store.block_bytes / took / 1e9, 3), **r}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/dev/shm/dualpath-pfgil")
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="blocks per get_pages call")
    ap.add_argument("--io-threads", type=int, default=8)
    ap.add_argument("--readers", type=int, default=2, help="get_pages calls in flight")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--releases", type=int, default=40, help="GIL releases per scheduler step")
    ap.add_argument("--switch-interval-ms", type=float, default=0.2,
                    help="the servers' setting (--dualpath-switch-interval-ms)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if min(args.blocks, args.batch, args.io_threads, args.readers, args.releases) < 1 or \
            args.seconds <= 0 or args.switch_interval_ms <= 0:
        ap.error("counts, --seconds and --switch-interval-ms must be positive")
    if native_reader() is None or native_writer() is None:
        ap.error("this build of dualpath._C has no native block I/O")
    g = BlockGeometry(num_layers=32, page_size=64, num_kv_heads=8, head_dim=128, dtype_bytes=2)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    store = BlockStore(str(root), g, fingerprint("bench-pfgil-8b", g), description={})
    row = g.num_kv_heads * g.head_dim * g.dtype_bytes
    rng = np.random.default_rng(0)
    keys = [f"pfgil-{i}" for i in range(args.blocks)]
    for k in keys:
        store.put(k, rng.integers(0, 256, g.payload_bytes, dtype=np.uint8))
    pages = args.batch * args.readers  # each reader its own pages of one pool
    pool = np.zeros((2, pages * g.page_size, g.num_layers, row), dtype=np.uint8)
    page_bytes = g.page_size * g.num_layers * row
    base, v_off = pool.ctypes.data, pool[1].ctypes.data - pool.ctypes.data
    ptrs = []
    for i in range(args.readers):
        k = [base + (i * args.batch + p) * page_bytes for p in range(args.batch)]
        ptrs.append((k, [x + v_off for x in k]))
    default = sys.getswitchinterval()
    sys.setswitchinterval(args.switch_interval_ms / 1e3)
    rows = []
    try:
        r, _ = measure([], args.seconds, args.releases)
        alone = {"case": "scheduler alone", "step_ms_p50": r["step_ms_p50"],
                 "step_ms_p90": r["step_ms_p90"]}
        rows.append(alone)
        for op in ("reads", "writes"):
            for native in (True, False):
                a = PageFirstAdapter(store, io_threads=args.io_threads, native=native)
                if op == "reads":
                    a.get_pages(keys[:args.batch], *ptrs[0])  # warm: threads, staging buffers
                    r = run_reads(a, keys, ptrs, args.batch, args.readers, args.seconds,
                                  args.releases)
                else:
                    r = run_writes(a, ptrs, args.batch, args.seconds, args.releases)
                a.close()
                r["step_p50_vs_alone"] = round(r["step_ms_p50"] / alone["step_ms_p50"], 2)
                kind = "native" if native else "python"
                who = {"reads": "reader", "writes": "writer"}[op]
                rows.append({"case": f"{op}, {kind} {who}", **r})
    finally:
        sys.setswitchinterval(default)
        shutil.rmtree(root, ignore_errors=True)
    meta = {"bench": "pagefirst_gil", "git_sha": git_sha(), "date": time.strftime("%Y-%m-%d"),
            "batch": args.batch, "io_threads": args.io_threads, "readers": args.readers,
            "releases": args.releases, "switch_interval_ms": args.switch_interval_ms}
    emit(rows, meta, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
