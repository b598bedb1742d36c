#!/usr/bin/env python3
"""The `cuda` transfer backend on a GPU host, each against a baseline in the same run:

- large: one 1 GiB descriptor (split into slices over the workers), GPU0 -> GPU1 (NVLink) and
  pinned host -> GPU0, as a fraction of the peak a plain torch copy (cudaMemcpyAsync) reaches
  on the same buffers;
- small: N scattered descriptors of 16-128 KiB (256 MiB in all) within GPU 0, pinned host ->
  GPU 0 and (2 GPUs) GPU 0 -> GPU 1: the batched kernel ("cuda") vs one cudaMemcpyAsync per
  chunk from the same engine's C++ workers ("cuda:memcpy": --workers streams, and one stream,
  the plain loop) and vs a Python loop of torch copies;
- submit: time of `submit` alone per descriptor, batches of 1,000.
Wall time of submit + wait (wait returns after the streams synchronized), median of repeats.

  python benchmark/transfer/bench_cuda.py [--out FILE.jsonl] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
try:  # the installed package (with its native module _C) over the source tree
    import dualpath  # noqa: F401
except ImportError:  # a checkout without an install
    sys.path.insert(0, str(ROOT / "python"))

from dualpath.transfer import TransferBatch, TransferEngine  # noqa: E402
from dualpath.version import git_sha  # noqa: E402

GIB = 1 << 30


def median_s(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def engine_move(eng, a, b, so, do, ln):
    batch = TransferBatch.of(a, so, b, do, ln)

    def run():
        h = eng.submit(batch)
        st = eng.wait(h, 120)
        if st != "done":
            raise RuntimeError(f"{eng.backend}: {st}: {h.error}")
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--small-sizes", default="16384,65536,131072")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    meta = {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
            "date": time.strftime("%Y-%m-%d"), "git_sha": git_sha()}
    rows = []

    def emit(row):
        row = {**row, **meta}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    pinned = torch.randint(0, 256, (GIB,), dtype=torch.uint8).pin_memory()
    d0 = torch.randint(0, 256, (GIB,), dtype=torch.uint8, device="cuda:0")
    d0b = torch.empty(GIB, dtype=torch.uint8, device="cuda:0")
    d1 = torch.empty(GIB, dtype=torch.uint8, device="cuda:1") if meta["gpus"] > 1 else None
    eng = TransferEngine("cuda", num_workers=args.workers, slice_bytes=64 << 20)
    # every piece through the batched kernel (SMs, no copy engine), in 16 MiB slices as our PD
    # engine uses it: the alternative when the copy engines are shared (env.PD_CUDA_BACKEND)
    eng_k = TransferEngine("cuda:kernel", num_workers=args.workers, slice_bytes=16 << 20)
    base = TransferEngine("cuda:memcpy", num_workers=args.workers, slice_bytes=64 << 20)
    base1 = TransferEngine("cuda:memcpy", num_workers=1, slice_bytes=64 << 20)  # a plain loop
    regs = {}
    for e in (eng, eng_k, base, base1):
        regs[e] = {n: e.register_array(t) for n, t in
                   (("pinned", pinned), ("d0", d0), ("d0b", d0b), ("d1", d1)) if t is not None}

    # ---- large ----
    large = [("h2d", "pinned", "d0", lambda: d0b.copy_(pinned, non_blocking=True), "d0b")]
    if d1 is not None:
        large.insert(0, ("gpu0_to_gpu1", "d0", "d1", lambda: d1.copy_(d0, non_blocking=True),
                         "d1"))
    for name, s, d, peak_fn, _ in large:
        peak = GIB / median_s(peak_fn, args.repeats)
        r = regs[eng]
        ours = GIB / median_s(engine_move(eng, r[s], r[d], 0, 0, GIB), args.repeats)
        rk = regs[eng_k]
        kern = GIB / median_s(engine_move(eng_k, rk[s], rk[d], 0, 0, GIB), args.repeats)
        emit({"case": f"large_{name}", "bytes": GIB, "ours_gbps": ours / 1e9,
              "peak_gbps": peak / 1e9, "fraction_of_peak": ours / peak,
              "kernel_gbps": kern / 1e9, "kernel_fraction_of_peak": kern / peak})

    # ---- small, scattered ----
    rng = np.random.default_rng(0)
    for size in (int(x) for x in args.small_sizes.split(",")):
        n = (256 << 20) // size
        so = rng.permutation(GIB // size)[:n].astype(np.int64) * size
        do = rng.permutation(GIB // size)[:n].astype(np.int64) * size
        ln = np.full(n, size, np.int64)
        cases = [("d2d", "d0", "d0b", d0, d0b), ("h2d", "pinned", "d0b", pinned, d0b)]
        if d1 is not None:  # GPU0 -> GPU1 over NVLink
            cases.append(("p2p", "d0", "d1", d0, d1))
        for name, s, d, src_t, dst_t in cases:
            ours = median_s(engine_move(eng, regs[eng][s], regs[eng][d], so, do, ln),
                            args.repeats)
            loop_c = median_s(engine_move(base, regs[base][s], regs[base][d], so, do, ln),
                              args.repeats)
            loop_1 = median_s(engine_move(base1, regs[base1][s], regs[base1][d], so, do, ln),
                              args.repeats)
            so_l, do_l = so.tolist(), do.tolist()

            def torch_loop(so_l=so_l, do_l=do_l, src_t=src_t, dst_t=dst_t, size=size):
                for a, b in zip(so_l, do_l, strict=True):
                    dst_t[b:b + size].copy_(src_t[a:a + size], non_blocking=True)
            loop_py = median_s(torch_loop, max(1, args.repeats // 2), warmup=1)
            total = n * size
            emit({"case": f"small_{name}", "chunk_bytes": size, "chunks": n,
                  "ours_gbps": total / ours / 1e9,
                  "memcpy_loop_cpp_gbps": total / loop_c / 1e9,
                  "memcpy_loop_cpp_1stream_gbps": total / loop_1 / 1e9,
                  "memcpy_loop_torch_gbps": total / loop_py / 1e9,
                  "x_vs_cpp_loop": loop_c / ours, "x_vs_cpp_1stream": loop_1 / ours,
                  "x_vs_torch_loop": loop_py / ours})

    # ---- submit overhead ----
    n = 1000
    so = rng.integers(0, GIB - 4096, n)
    batch = TransferBatch.of(regs[eng]["d0"], so, regs[eng]["d0b"], np.arange(n) * 4096, 4096)
    per = []
    for _ in range(50):
        t0 = time.perf_counter()
        h = eng.submit(batch)
        per.append((time.perf_counter() - t0) / n)
        eng.wait(h, 60)
    emit({"case": "submit_overhead", "batch": n, "us_per_descriptor": statistics.median(per) * 1e6})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
