#!/usr/bin/env python3
"""The DE read path against the prefill reading for itself, same pages, same store, on one host.

Two real agents (prefill and decode roles, HTTP servers), a Full Block store in a directory
(default /dev/shm), and a prefill host pool in shared memory (memfd, as SGLang's `shm`
allocator makes it), page_first. For a load of N pages (8B-shaped: 32 layers x 64 tokens x 8 KV
heads x 128 x bf16, 8 MiB a page) it times:
- `pe`: the prefill's own read into its pool (`PageFirstAdapter.get_pages`, what the baseline
  and a PE-side plan do);
- `de`: `de_path.prefill_get` with a decode-side plan: one HTTP pull, the decode agent reads into
  its DE buffer, then copies into the prefill's pool (shm) with the transfer engine;
- `restore`: the decode's own restore of those pages from its DE buffer into its host pool
  (`de_path.decode_restore`, miss-only return), timed after the pull that read them.
At each storage-NIC cap given (0 = none) and median of repeats; the `de / pe` ratio is what the
detour costs over a direct read. Every load is checked byte for byte.

  python benchmark/storage/bench_de_path.py [--pages 64] [--caps 0,6.25] [--repeats 5]
      [--dir /dev/shm] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
try:  # the installed package (with its native module _C) over the source tree
    import dualpath  # noqa: F401
except ImportError:  # a checkout without an install
    sys.path.insert(0, str(ROOT / "python"))

from dualpath.config import PluginConfig  # noqa: E402
from dualpath.sglang_plugin import de_path  # noqa: E402
from dualpath.sglang_plugin.agent import Agent  # noqa: E402
from dualpath.sglang_plugin.plan import ReadPlan  # noqa: E402
from dualpath.storage import BlockGeometry, BlockStore, fingerprint  # noqa: E402
from dualpath.storage.page_first import PageFirstAdapter  # noqa: E402
from dualpath.version import git_sha  # noqa: E402

G = BlockGeometry(num_layers=32, page_size=64, num_kv_heads=8, head_dim=128, dtype_bytes=2)
ROW = G.num_kv_heads * G.head_dim * G.dtype_bytes


class Pool:
    """A page_first host pool [2, pages * page_size, layers, row] in a memfd."""

    def __init__(self, pages: int):
        self.pages = pages
        n = 2 * pages * G.page_size * G.num_layers * ROW
        self.fd = os.memfd_create("bench-pool")
        os.ftruncate(self.fd, n)
        self.mm = mmap.mmap(self.fd, n)
        self.arr = np.frombuffer(self.mm, np.uint8).reshape(2, pages * G.page_size,
                                                            G.num_layers, ROW)
        self.kv_buffer = self  # the bits of a torch tensor `_pool_region` uses

    def data_ptr(self) -> int:
        return self.arr.ctypes.data

    def numel(self) -> int:
        return self.arr.size

    def element_size(self) -> int:
        return 1

    def ptrs(self, pages):
        base = self.arr.ctypes.data
        v_off = self.arr[1].ctypes.data - base
        k = [base + p * G.page_size * G.num_layers * ROW for p in pages]
        return k, [x + v_off for x in k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--caps", default="0,6.25", help="storage-NIC caps, GB/s (0 = none)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.pages < 1 or args.repeats < 1:
        ap.error("--pages and --repeats must be >= 1")
    caps = [float(x) for x in args.caps.split(",") if x]
    page_bytes = 2 * G.page_size * G.num_layers * ROW
    meta = {"pages": args.pages, "page_bytes": page_bytes, "dir": args.dir,
            "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "git_sha": git_sha()}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="dualpath-bench-de-") as root:
        src = Pool(args.pages)
        src.arr[...] = np.random.default_rng(0).integers(0, 256, src.arr.shape, np.uint8)
        keys = [f"{i:064x}" for i in range(args.pages)]
        writer = PageFirstAdapter(BlockStore(root, G, fingerprint("m", G), description={}))
        if writer.set_pages(keys, *src.ptrs(range(args.pages))) != [True] * args.pages:
            print("error: could not write the blocks", file=sys.stderr)
            return 2
        agents = {}
        buffer_gb = 1.5 * args.pages * page_bytes / 2**30
        for role in ("prefill", "decode"):
            cfg = PluginConfig(enable_dual_path=True, role=role, buffer_gb=buffer_gb,
                               forward_timeout_s=120.0)
            a = Agent(cfg, role, f"bench-{role}-{os.getpid()}", free_port())
            a.attach_store(PageFirstAdapter(BlockStore(root, G, fingerprint("m", G),
                                                       description={}, nic=a.nic)))
            a.start()
            agents[role] = a
        pe, de = agents["prefill"], agents["decode"]
        dst = Pool(args.pages)
        order = [int(p) for p in np.random.default_rng(1).permutation(args.pages)]
        k_ptrs, v_ptrs = dst.ptrs(order)

        def check():
            for i, p in enumerate(order):
                a = dst.arr[:, p * G.page_size:(p + 1) * G.page_size]
                b = src.arr[:, i * G.page_size:(i + 1) * G.page_size]
                if not np.array_equal(a, b):
                    raise SystemExit(f"error: page {i} landed wrong")

        def load_pe():
            return pe.adapter.get_pages(keys, k_ptrs, v_ptrs)

        def load_de(k=[0]):  # noqa: B006  (a counter: a fresh request id each time)
            k[0] += 1
            plan = ReadPlan(f"bench-{k[0]}", 1.0, de_agent=de.url)
            return de_path.prefill_get(pe, pe.adapter, dst, plan, keys, k_ptrs, v_ptrs)

        print(f"{args.pages} pages x {page_bytes >> 20} MiB, store in {args.dir}, "
              f"{os.cpu_count()} cores")
        print(f"{'cap GB/s':>9} {'path':>5} {'median s':>9} {'GB/s':>7}")
        for cap in caps:
            for a in (pe, de):
                a.nic.set_cap(cap or None)
            times = {}
            for name, fn in (("pe", load_pe), ("de", load_de)):
                ts = []
                for _ in range(args.repeats + 1):  # the first is a warm-up
                    dst.arr[...] = 0
                    t0 = time.perf_counter()
                    got = fn()
                    ts.append(time.perf_counter() - t0)
                    if got != [True] * args.pages:
                        print(f"error: {name} load failed: {got}", file=sys.stderr)
                        return 1
                    check()
                times[name] = statistics.median(ts[1:])
                gbps = args.pages * page_bytes / times[name] / 1e9
                print(f"{cap:>9.2f} {name:>5} {times[name]:>9.3f} {gbps:>7.2f}", flush=True)
                row = {"cap_gbps": cap, "path": name, "median_s": times[name], "gbps": gbps,
                       **meta}
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
            ts = []
            own = Pool(args.pages)  # the decode's host pool
            for r in range(args.repeats + 1):
                rid = f"bench-restore-{cap}-{r}"
                plan = ReadPlan(rid, 1.0, de_agent=de.url)
                de.plans.put(plan)  # a decode-side plan: the pulled pages await the restore
                if de_path.prefill_get(pe, pe.adapter, dst, plan, keys, k_ptrs,
                                       v_ptrs) != [True] * args.pages:
                    print("error: pull before the restore failed", file=sys.stderr)
                    return 1
                own.arr[...] = 0
                t0 = time.perf_counter()
                got = de_path.decode_restore(de, de.adapter, keys, *own.ptrs(order), rid=rid)
                ts.append(time.perf_counter() - t0)
                if got != [True] * args.pages or de.counters["restore_from_buffer"] == 0:
                    print("error: restore failed", file=sys.stderr)
                    return 1
                for i, p in enumerate(order):
                    if not np.array_equal(own.arr[:, p * G.page_size:(p + 1) * G.page_size],
                                          src.arr[:, i * G.page_size:(i + 1) * G.page_size]):
                        print(f"error: restored page {i} wrong", file=sys.stderr)
                        return 1
            times["restore"] = statistics.median(ts[1:])
            gbps = args.pages * page_bytes / times["restore"] / 1e9
            print(f"{cap:>9.2f} {'restore':>7} {times['restore']:>7.3f} {gbps:>7.2f}")
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"cap_gbps": cap, "path": "restore",
                                        "median_s": times["restore"], "gbps": gbps,
                                        **meta}) + "\n")
            print(f"{'':>9} de/pe {times['de'] / times['pe']:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
