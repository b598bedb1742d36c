#!/usr/bin/env python3
"""Write and read GB/s of the KV block store vs block size and concurrency, next to SGLang's
`file` HiCache backend (HiCacheFile) on the same directory type and block shapes.

Blocks are Full Blocks of an 8B-shaped model (32 layers, 8 KV heads, head_dim 128, bf16:
128 KiB per token) of `page_size` tokens. Each case writes N fresh blocks, then reads them all
back into one set of already-touched buffers (as a pinned host pool is: no page faults),
checking a sample byte-for-byte. Reads come from the file
system's cache where it has one (tmpfs always; a disk after the writes): this measures the
store's own path (syscalls, copies, checksum, threads), not the device.

  python benchmark/storage/bench_store.py [--dir /dev/shm/dualpath-bench] [--blocks 64]
      [--page-sizes 16,64] [--threads 1,4,16] [--sglang] [--out FILE.jsonl]

--sglang also measures HiCacheFile (needs sglang importable: the GPU host's bundle, or
`pip install --no-deps sglang==0.5.17` plus its import-time dependencies).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
try:  # the installed package (with its native module _C) over the source tree
    import dualpath  # noqa: F401
except ImportError:  # a checkout without an install
    sys.path.insert(0, str(ROOT / "python"))

from dualpath.storage import BlockGeometry, BlockStore, fingerprint  # noqa: E402
from dualpath.version import git_sha  # noqa: E402


def geometry(page_size: int) -> BlockGeometry:
    return BlockGeometry(num_layers=32, page_size=page_size, num_kv_heads=8, head_dim=128,
                         dtype_bytes=2)


def keys(n: int, salt: str) -> list[str]:
    return [f"{salt}{i:060x}"[:64] for i in range(n)]


def bench_ours(root: Path, g: BlockGeometry, n: int, threads: int) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    s = BlockStore(str(root), g, fingerprint("bench-8b", g), description={}, io_threads=threads)
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, g.payload_bytes, dtype=np.uint8) for _ in range(n)]
    ks = keys(n, "a")
    t0 = time.perf_counter()
    assert all(s.batch_put(ks, data))
    t_write = time.perf_counter() - t0
    outs = [np.full(g.payload_bytes, 1, np.uint8) for _ in range(n)]  # touched: no page faults
    t0 = time.perf_counter()
    assert all(s.batch_get_into(ks, outs))
    t_read = time.perf_counter() - t0
    for i in (0, n // 2, n - 1):
        assert np.array_equal(outs[i], data[i]), "read back differs"
    s.close()
    nbytes = n * g.payload_bytes
    return {"write_gbps": nbytes / t_write / 1e9, "read_gbps": nbytes / t_read / 1e9}


def bench_sglang(root: Path, g: BlockGeometry, n: int) -> dict:
    import torch
    from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig

    shutil.rmtree(root, ignore_errors=True)
    os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = str(root)
    cfg = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0,
                               attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                               is_page_first_layout=True, model_name="bench-8b")
    f = HiCacheFile(cfg, file_path=str(root))
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 256, (g.payload_bytes,), dtype=torch.uint8, generator=gen)
            for _ in range(n)]
    ks = keys(n, "b")
    t0 = time.perf_counter()
    assert f.batch_set(ks, data)
    t_write = time.perf_counter() - t0
    outs = [torch.ones(g.payload_bytes, dtype=torch.uint8) for _ in range(n)]
    t0 = time.perf_counter()
    got = f.batch_get(ks, outs)
    t_read = time.perf_counter() - t0
    assert all(x is not None for x in got)
    assert torch.equal(outs[n - 1], data[n - 1])
    nbytes = n * g.payload_bytes
    return {"write_gbps": nbytes / t_write / 1e9, "read_gbps": nbytes / t_read / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm/dualpath-bench"))
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--page-sizes", default="16,64")
    ap.add_argument("--threads", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    ap.add_argument("--sglang", action="store_true", help="also measure SGLang's HiCacheFile")
    ap.add_argument("--out", type=Path, help="append one JSON row per case")
    args = ap.parse_args()
    sha = git_sha()
    fs = subprocess.run(["df", "--output=fstype", str(args.dir.parent)], capture_output=True,
                        text=True).stdout.split()[-1]
    meta = {"git_sha": sha, "date": time.strftime("%Y-%m-%d"), "dir": str(args.dir),
            "fs": fs, "cores": os.cpu_count(), "blocks": args.blocks}
    print(f"{'impl':>8} {'page':>5} {'MiB/blk':>8} {'threads':>7} {'write GB/s':>10} "
          f"{'read GB/s':>9}")
    cases = []
    for ps in (int(x) for x in args.page_sizes.split(",")):
        g = geometry(ps)
        for t in (int(x) for x in args.threads.split(",")):
            cases.append(("dualpath", g, t))
        if args.sglang:
            cases.append(("sglang", g, 1))
    for impl, g, t in cases:
        runs = [bench_ours(args.dir, g, args.blocks, t) if impl == "dualpath"
                else bench_sglang(args.dir, g, args.blocks) for _ in range(args.repeats)]
        row = {"impl": impl, "page_size": g.page_size, "block_mib": g.payload_bytes / 2**20,
               "threads": t, **meta,
               **{k: round(float(np.median([r[k] for r in runs])), 3) for k in runs[0]}}
        print(f"{impl:>8} {g.page_size:>5} {row['block_mib']:>8.1f} {t:>7} "
              f"{row['write_gbps']:>10.2f} {row['read_gbps']:>9.2f}")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
