#!/usr/bin/env python3
"""Transfer engine: submit overhead per descriptor vs batch size, and bandwidth vs message size,
per backend (host for now), next to a plain per-chunk copy loop in the same run.

submit: time of `submit` alone (validation, queueing; data moves in worker threads), divided
by the descriptors in the batch. bandwidth: submit + wait for batches of N messages of one size
between two 512 MiB buffers; baseline: numpy copy of the same chunks one by one in Python.

  python benchmark/transfer/bench_engine.py [--backend host|tcp] [--remote] [--out FILE.jsonl]

--remote (tcp backend): the destination buffer belongs to a second engine in another process,
reached over loopback TCP (one-sided writes through `register_remote`), as across hosts; compare
with benchmark/transfer/bench_mooncake_tcp.py (Mooncake's transfer engine in TCP mode).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
try:  # the installed package (with its native module _C) over the source tree
    import dualpath  # noqa: F401
except ImportError:  # a checkout without an install
    sys.path.insert(0, str(ROOT / "python"))

from dualpath.transfer import TransferBatch, TransferEngine  # noqa: E402
from dualpath.version import git_sha  # noqa: E402

BUF = 512 << 20


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _serve(conn) -> None:
    """The remote side: an engine in its own process that owns the destination buffer."""
    eng = TransferEngine("tcp", num_workers=2)
    dst = np.zeros(BUF, np.uint8)
    rid = eng.register_array(dst)
    conn.send((eng.listen("127.0.0.1", 0), rid))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        n = msg  # bytes written: send back a digest of them for the correctness check
        conn.send(int(dst[:n].astype(np.uint64).sum()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="host")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,10,100,1000,10000")
    ap.add_argument("--message-sizes", default="4096,65536,1048576,16777216,67108864")
    ap.add_argument("--remote", action="store_true",
                    help="tcp: write into another process's engine over loopback")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.remote and args.backend != "tcp":
        ap.error("--remote needs --backend tcp")
    sha = git_sha()
    meta = {"backend": args.backend, "workers": args.workers, "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "git_sha": sha}
    eng = TransferEngine(args.backend, num_workers=args.workers)
    src = np.random.default_rng(0).integers(0, 256, BUF, dtype=np.uint8)
    dst = np.zeros(BUF, np.uint8)
    a, b = eng.register_array(src), eng.register_array(dst)
    rows = []
    if args.remote:
        import multiprocessing as mp

        parent, child = mp.get_context("spawn").Pipe()
        server = mp.get_context("spawn").Process(target=_serve, args=(child,), daemon=True)
        server.start()
        port, rid = parent.recv()
        b = eng.register_remote(f"127.0.0.1:{port}", rid, BUF, connections=args.workers)
        meta["remote"] = "loopback tcp, another process"

    print(f"{'batch':>7} {'submit us/desc':>15}")
    for n in (int(x) for x in args.batch_sizes.split(",") if not args.remote):
        off = (np.arange(n, dtype=np.int64) * 64) % (BUF - 64)
        batch = TransferBatch.of(a, off, b, off, 64)
        handles = []
        t = median_time(lambda: handles.append(eng.submit(batch)), 21)  # noqa: B023
        for h in handles:
            eng.wait(h)
        rows.append({"kind": "submit", "batch": n, "us_per_desc": t / n * 1e6, **meta})
        print(f"{n:>7} {t / n * 1e6:>15.3f}")

    print(f"{'msg bytes':>10} {'batch':>6} {'engine GB/s':>11} {'loop GB/s':>9}")
    for size in (int(x) for x in args.message_sizes.split(",")):
        n = max(1, min(1024, (256 << 20) // size))
        off = np.arange(n, dtype=np.int64) * size
        batch = TransferBatch.of(a, off, b, off, size)
        eng_t = median_time(lambda: eng.wait(eng.submit(batch)), 7)  # noqa: B023

        def loop():
            for o in off.tolist():  # noqa: B023
                dst[o:o + size] = src[o:o + size]  # noqa: B023

        loop_t = median_time(loop, 7)
        if args.remote:
            parent.send(n * size)
            assert parent.recv() == int(src[:n * size].astype(np.uint64).sum())
        else:
            assert np.array_equal(dst[:n * size], src[:n * size])
        gbps, base = n * size / eng_t / 1e9, n * size / loop_t / 1e9
        rows.append({"kind": "bandwidth", "message_bytes": size, "batch": n,
                     "engine_gbps": gbps, "loop_gbps": base, **meta})
        print(f"{size:>10} {n:>6} {gbps:>11.2f} {base:>9.2f}")
    if args.remote:
        parent.send(None)
        server.join(10)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
