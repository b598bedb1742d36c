#!/usr/bin/env python3
"""Block reads while another thread runs Python, as in a server: SGLang's scheduler thread
always does, and the storage reads of HiCache prefetches run on threads of the same process.

A thread that releases the GIL (a syscall, a checksum) must win it back, which can take up to
the interpreter's switch interval (5 ms by default) while another thread runs Python. This
measures BlockStore.get_into (8 MiB Full Blocks of an 8B-shaped model, tmpfs) on one thread:
alone, then next to a thread spinning in Python, for several switch intervals; and what the
spinning thread keeps of its speed alone (the scheduler's cost of a shorter interval).

  python benchmark/storage/bench_gil.py [--dir /dev/shm/dualpath-gil] [--blocks 16]
      [--seconds 2] [--intervals-ms 5,1,0.5,0.2] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
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

from dualpath.storage import BlockGeometry, BlockStore, fingerprint  # noqa: E402
from dualpath.version import git_sha  # noqa: E402


def spin(seconds: float, out: list) -> None:
    """Pure-Python work for `seconds`; appends iterations per second."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(1000):
            n += 1
    out.append(n / seconds)


def read_for(store: BlockStore, keys: list[str], buf, until) -> float:
    """Read blocks round-robin until `until()` is false; returns GB/s."""
    n, t0 = 0, time.perf_counter()
    while until() or n == 0:
        if not store.get_into(keys[n % len(keys)], buf):
            raise RuntimeError(f"block {keys[n % len(keys)]} missing")
        n += 1
    return n * buf.nbytes / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/dev/shm/dualpath-gil")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--intervals-ms", default="5,1,0.5,0.2")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.blocks < 1 or args.seconds <= 0:
        ap.error("--blocks and --seconds must be positive")
    intervals = [float(x) for x in args.intervals_ms.split(",")]
    if any(x <= 0 for x in intervals):
        ap.error("--intervals-ms: positive values")
    g = BlockGeometry(num_layers=32, page_size=64, num_kv_heads=8, head_dim=128, dtype_bytes=2)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    store = BlockStore(str(root), g, fingerprint("bench-gil-8b", g), description={})
    rng = np.random.default_rng(0)
    keys = [f"gil-{i}" for i in range(args.blocks)]
    for k in keys:
        store.put(k, rng.integers(0, 256, g.payload_bytes, dtype=np.uint8))
    buf = np.empty(g.payload_bytes, dtype=np.uint8)
    buf.fill(0)  # touched, as a pinned host pool is
    default = sys.getswitchinterval()
    alone_spin: list = []
    spin(args.seconds, alone_spin)
    t_end = time.perf_counter() + args.seconds
    alone = read_for(store, keys, buf, lambda: time.perf_counter() < t_end)
    rows = [{"case": "alone", "read_gbps": round(alone, 3)}]
    try:
        for ms in intervals:
            sys.setswitchinterval(ms / 1e3)
            got: list = []
            th = threading.Thread(target=spin, args=(args.seconds, got))
            th.start()
            gbps = read_for(store, keys, buf, th.is_alive)
            th.join()
            rows.append({"case": "next to a Python thread", "switch_interval_ms": ms,
                         "read_gbps": round(gbps, 3),
                         "python_thread_speed": round(got[0] / alone_spin[0], 3)})
    finally:
        sys.setswitchinterval(default)
        shutil.rmtree(root, ignore_errors=True)
    meta = {"bench": "gil", "git_sha": git_sha(), "date": time.strftime("%Y-%m-%d"),
            "block_mib": g.payload_bytes / 2**20, "dir": str(root)}
    emit(rows, meta, args.out)
    return 0


def emit(rows: list[dict], meta: dict, out: Path | None) -> None:
    """Print each row as JSON; with `out`, append it with `meta` as JSON lines."""
    for r in rows:
        print(json.dumps(r))
        if out:
            with open(out, "a") as f:
                f.write(json.dumps({**meta, **r}) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
