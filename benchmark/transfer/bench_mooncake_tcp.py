#!/usr/bin/env python3
"""Mooncake transfer engine, TCP transport on loopback: one-sided WRITE bandwidth vs message size,
the peer that our own C++ `tcp` transfer backend (bench_engine.py --backend tcp --remote) is
compared against.

Two processes, two Mooncake engines, both initialised in P2P handshake mode
(`initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")`, so no metadata server): the server
process registers a zeroed --total-bytes buffer and reports its address and RPC port through a
pipe; the client process registers a random source buffer of the same size and writes into the
server's buffer with `batch_transfer_sync_write(target, [src addrs], [peer addrs], [lengths])`.
Batches hold min(--max-batch, total / size) messages of one size at consecutive offsets; one
measurement issues as many batches as move ~--total-bytes (walking the whole buffer). Reported:
bytes / median wall time of --repeats measurements after one warm-up measurement. Correctness:
the server zeroes its buffer before each size and afterwards returns a SHA-256 of the region
written, which must equal the client's hash of the same source bytes.

Runs on the CPU machine (loopback, no GPU or RDMA needed). Install Mooncake with
`pip install mooncake-transfer-engine` (or, on a box without the CUDA driver, where that wheel's
engine.so fails to load libcudart.so.12 / libcuda.so.1, `pip install
mooncake-transfer-engine-non-cuda`; both need libibverbs1 and libnuma1 from the OS at import).

  python benchmark/transfer/bench_mooncake_tcp.py [--message-sizes 4096,65536,...]
      [--total-bytes 268435456] [--repeats 7] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
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

from dualpath.version import git_sha  # noqa: E402

HOST = "127.0.0.1"
DISTS = ("mooncake-transfer-engine", "mooncake-transfer-engine-non-cuda")


def _engine():
    try:
        from mooncake.engine import TransferEngine
    except ImportError as e:
        raise SystemExit(f"cannot import mooncake.engine ({e}); pip install "
                         "mooncake-transfer-engine (or mooncake-transfer-engine-non-cuda)") from e
    eng = TransferEngine()
    rc = eng.initialize(HOST, "P2PHANDSHAKE", "tcp", "")
    if rc != 0:
        raise RuntimeError(f"mooncake initialize failed: {rc}")
    return eng


def _mooncake_version() -> tuple[str, str]:
    from importlib import metadata

    for dist in DISTS:
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return "unknown", "unknown"


def _serve(conn, nbytes: int) -> None:
    """Server process: register a zeroed buffer, report (address, rpc port), then answer
    ("clear",) -> None and ("hash", n) -> sha256 hex of the first n bytes until ("stop",)."""
    eng = _engine()
    buf = np.zeros(nbytes, np.uint8)
    rc = eng.register_memory(buf.ctypes.data, buf.nbytes)
    if rc != 0:
        raise RuntimeError(f"mooncake register_memory failed: {rc}")
    conn.send((buf.ctypes.data, eng.get_rpc_port()))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        if msg[0] == "clear":
            buf[:] = 0
            conn.send(None)
        elif msg[0] == "hash":
            conn.send(hashlib.sha256(memoryview(buf[:msg[1]])).hexdigest())
    eng.unregister_memory(buf.ctypes.data)
    conn.send("stopped")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--message-sizes", default="4096,65536,1048576,16777216,67108864")
    ap.add_argument("--total-bytes", type=int, default=256 << 20,
                    help="bytes moved per measurement (also the size of both buffers)")
    ap.add_argument("--max-batch", type=int, default=1024,
                    help="messages per batch_transfer_sync_write call, at most")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sizes = [int(x) for x in args.message_sizes.split(",")]
    total = args.total_bytes
    if max(sizes) > total:
        ap.error("--total-bytes must be at least the largest message size")
    dist, version = _mooncake_version()
    meta = {"mooncake_version": version, "mooncake_dist": dist, "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "git_sha": git_sha()}

    ctx = mp.get_context("spawn")  # Mooncake starts threads: never fork after import
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child, total), daemon=True)
    server.start()
    if not parent.poll(60):
        raise SystemExit("mooncake server process did not report its buffer in 60 s")
    peer_base, port = parent.recv()
    target = f"{HOST}:{port}"

    eng = _engine()
    src = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
    rc = eng.register_memory(src.ctypes.data, src.nbytes)
    if rc != 0:
        raise RuntimeError(f"mooncake register_memory failed: {rc}")
    base = src.ctypes.data
    rows = []

    print(f"mooncake {dist} {version}, tcp, {HOST} loopback, 2 processes, "
          f"{total >> 20} MiB per measurement, median of {args.repeats}")
    print(f"{'msg bytes':>10} {'batch':>6} {'batches':>7} {'GB/s':>7}")
    for size in sizes:
        per = total // size                      # messages per measurement
        n = max(1, min(args.max_batch, per))     # messages per batch call
        calls = []
        for start in range(0, per - per % n, n):
            offs = [(start + i) * size for i in range(n)]
            calls.append(([base + o for o in offs], [peer_base + o for o in offs], [size] * n))
        moved = len(calls) * n * size

        def measure(calls=calls, size=size, n=n):
            for loc, rem, lens in calls:
                rc = eng.batch_transfer_sync_write(target, loc, rem, lens)
                if rc != 0:
                    raise RuntimeError(f"batch_transfer_sync_write failed: {rc} "
                                       f"(size {size}, batch {n})")

        parent.send(("clear",))
        parent.recv()
        measure()  # warm-up (first use also opens the connection)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            measure()
            times.append(time.perf_counter() - t0)
        parent.send(("hash", moved))
        if parent.recv() != hashlib.sha256(memoryview(src[:moved])).hexdigest():
            raise SystemExit(f"mismatch: bytes received for size {size} differ from those sent")
        gbps = moved / statistics.median(times) / 1e9
        rows.append({"kind": "bandwidth", "impl": "mooncake_tcp", "message_bytes": size,
                     "batch": n, "gbps": gbps, "bytes_per_measurement": moved, **meta})
        print(f"{size:>10} {n:>6} {len(calls):>7} {gbps:>7.3f}")

    parent.send(("stop",))
    if parent.poll(30):
        parent.recv()
    server.join(10)
    eng.unregister_memory(base)
    print("correctness: received bytes equal sent bytes (SHA-256 of every region written)")
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"appended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
