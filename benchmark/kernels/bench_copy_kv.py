#!/usr/bin/env python3
"""copy_kv bandwidth on the GPU host, as a fraction of peaks measured in the same run, next to
SGLang's own kernels (sgl_kernel.kvcacheio) for the moves SGLang has.

Moves (model shapes: 8b = 32 layers x 8 KV heads x 128, 70b = 80 x 8 x 128; bf16):
  d2d_gather     device pool -> Full Blocks, all layers     (peak: device copy, read+write)
  d2d_scatter    Full Blocks -> device pool, all layers     (peak: device copy, read+write)
  h2d_layer      pinned host page_first -> device pool, 1 layer  (peak: pinned H2D; peers:
                 sgl_kernel's transfer_kv_per_layer_pf_lf and the JIT HiCache kernel
                 transfer_hicache_one_layer, which a 0.5.17 server runs for this load)
  d2h_all        device pool -> pinned host page_first, all layers (peak: pinned D2H; peer:
                 transfer_kv_all_layer_lf_pf, SGLang's HiCache backup)
Host moves also report `memcpy_same_bytes_gbps`: one contiguous cudaMemcpy of the same bytes,
the copy engine's rate at that size (start-up and drain included), next to the 1 GiB peak.
Timing per METHOD.md: CUDA events, warm-up, median of repeats, buffers rotated so each timed
call touches memory not in L2 (50 MB on H100). The headline GB/s is device time: back-to-back
calls captured in a CUDA graph and replayed (no host launch gaps); the *_eager columns time one
call between events, host overhead included (what a lone call from Python costs). Every case
first checks its result byte-for-byte against the pure-torch reference; a peer whose result
differs is reported, not timed.

  python benchmark/kernels/bench_copy_kv.py [--models 8b,70b] [--page-sizes 16,64]
      [--pages 64,512] [--max-bytes N] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
try:  # the installed package (with its native module _C) over the source tree
    import dualpath  # noqa: F401
except ImportError:  # a checkout without an install
    sys.path.insert(0, str(ROOT / "python"))

from dualpath.ops import layout as L  # noqa: E402
from dualpath.ops.kv_copy import copy_kv, cuda_available  # noqa: E402
from dualpath.version import git_sha  # noqa: E402

MODELS = {"8b": (32, 8, 128), "70b": (80, 8, 128)}
L2_BYTES = 50 << 20


def timed(fn, warmup=5, repeats=30) -> float:
    """Median seconds of fn() (fn rotates its own buffers) measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def graph_timed(fn, calls: int) -> float | None:
    """Seconds per call of `calls` back-to-back fn() captured in one CUDA graph and replayed:
    the device time of the op without host launch gaps (METHOD.md: many small launches). None
    when fn cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for _ in range(calls):  # warm: compiles, cached tables, peer pointer tables
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError as e:
        print(f"  (not capturable, eager timing only: {e})")
        return None
    t = timed(graph.replay, 3, 20) / calls
    del graph
    return t


def peaks() -> dict:
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(
        n, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pinned.random_(0, 255)
    d2d = 2 * n / timed(lambda: dst.copy_(src), 2, 10)
    h2d = n / timed(lambda: dst.copy_(pinned, non_blocking=True), 2, 10)
    d2h = n / timed(lambda: pinned.copy_(dst, non_blocking=True), 2, 10)
    return {"d2d_gbps": d2d / 1e9, "h2d_gbps": h2d / 1e9, "d2h_gbps": d2h / 1e9}


class Case:
    """`sets` independent (src, dst) layout pairs, rotated so that timed calls miss L2."""

    def __init__(self, move, model, ps, pages):
        self.move, self.ps, self.pages = move, ps, pages
        self.layers, heads, dim = MODELS[model]
        self.heads, self.dim = heads, dim
        row = heads * dim * 2
        moved_layers = 1 if move == "h2d_layer" else self.layers
        self.moved = 2 * moved_layers * pages * ps * row  # K and V
        # enough independent sets that consecutive timed calls never find their data in L2
        self.sets = max(1, -(-2 * L2_BYTES // self.moved))
        self.pairs = [self._make() for _ in range(self.sets)]
        self.i = 0

    def _pool(self, pages):
        buf = lambda: torch.randn(pages * self.ps + self.ps, self.heads, self.dim,  # noqa: E731
                                  dtype=torch.bfloat16, device="cuda")
        return L.device_pool([buf() for _ in range(self.layers)],
                             [buf() for _ in range(self.layers)], self.ps)

    def _host(self, pages):
        shape = (2, pages * self.ps, self.layers, self.heads, self.dim)
        t = torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
        t.copy_(torch.randn(shape, dtype=torch.bfloat16, device="cuda"))  # CPU randn: minutes
        return L.host_page_first(t, self.ps)

    def _make(self):
        n = self.pages
        if self.move == "d2d_gather":
            src = self._pool(n)
            dst = L.full_blocks(torch.empty(n, self.layers, 2, self.ps, self.heads, self.dim,
                                            dtype=torch.bfloat16, device="cuda"))
        elif self.move == "d2d_scatter":
            src = L.full_blocks(torch.randn(n, self.layers, 2, self.ps, self.heads, self.dim,
                                            dtype=torch.bfloat16, device="cuda"))
            dst = self._pool(n)
        elif self.move == "h2d_layer":
            src, dst = self._host(n), self._pool(n)
        else:
            src, dst = self._pool(n), self._host(n)
        perm = torch.randperm(n, device="cuda")
        return src, dst, torch.arange(n, device="cuda"), perm

    def layers_arg(self):
        return ([self.layers // 2], [self.layers // 2]) if self.move == "h2d_layer" else (None,
                                                                                          None)

    def ours(self, impl: str = "triton"):
        src, dst, sp, dp = self.pairs[self.i % self.sets]
        self.i += 1
        sl, dl = self.layers_arg()
        copy_kv(src, dst, sp, dp, src_layers=sl, dst_layers=dl, impl=impl)

    def peer(self):
        """SGLang's kernel for the same move, or None where SGLang has none."""
        try:
            from sgl_kernel import kvcacheio
        except ImportError:
            return None
        item = self.heads * self.dim * 2
        ps = self.ps

        def tokens(pages):
            return (pages[:, None] * ps + torch.arange(ps, device="cuda")).reshape(-1)

        if self.move == "h2d_layer":
            def run():
                src, dst, sp, dp = self.pairs[self.i % self.sets]
                self.i += 1
                lay = self.layers // 2
                host = src.tensors[0]
                kvcacheio.transfer_kv_per_layer_pf_lf(
                    host[0], dst.tensor_of(lay, 0), host[1], dst.tensor_of(lay, 1),
                    tokens(sp), tokens(dp), lay, item, item * self.layers)
            return run
        if self.move == "d2h_all":
            ptrs = {}

            def run():
                src, dst, sp, dp = self.pairs[self.i % self.sets]
                self.i += 1
                key = id(src)
                if key not in ptrs:  # SGLang's per-layer K and V pointer tables
                    ptrs[key] = [torch.tensor([src.tensor_of(layer, c).data_ptr()
                                               for layer in range(self.layers)],
                                              dtype=torch.uint64, device="cuda") for c in (0, 1)]
                host = dst.tensors[0]
                kvcacheio.transfer_kv_all_layer_lf_pf(
                    ptrs[key][0], host[0], ptrs[key][1], host[1], tokens(sp), tokens(dp), item,
                    item * self.layers, self.layers)
            return run
        return None

    def peer_jit(self):
        """SGLang's JIT HiCache kernel for the one-layer load, what a 0.5.17 server runs
        (`MHATokenToKVPoolHost.load_to_device_per_layer` when `can_use_jit`), or None."""
        if self.move != "h2d_layer":
            return None
        try:
            from sglang.kernels.ops.kvcache.hicache import (
                can_use_hicache_jit_kernel,
                transfer_hicache_one_layer,
            )
            if not can_use_hicache_jit_kernel(element_size=self.heads * self.dim * 2):
                return None
        except Exception as e:  # noqa: BLE001  (no SGLang, or its JIT toolchain failed)
            print(f"  (SGLang's JIT HiCache kernel unavailable: {type(e).__name__}: {e})")
            return None
        ps = self.ps

        def tokens(pages):
            return (pages[:, None] * ps + torch.arange(ps, device="cuda")).reshape(-1)

        def run():
            src, dst, sp, dp = self.pairs[self.i % self.sets]
            self.i += 1
            lay = self.layers // 2
            host = src.tensors[0]  # [parts, slots, layers, heads, dim]: SGLang's per-layer view
            transfer_hicache_one_layer(
                k_cache_dst=dst.tensor_of(lay, 0), v_cache_dst=dst.tensor_of(lay, 1),
                indices_dst=tokens(dp), k_cache_src=host[0][:, lay],
                v_cache_src=host[1][:, lay], indices_src=tokens(sp),
                element_dim=self.heads * self.dim)
        return run

    def check(self, fn) -> bool:
        """Run fn on set 0 and compare the destination with the reference's, byte for byte."""
        src, dst, sp, dp = self.pairs[0]
        before = [t.clone() for t in dst.tensors]
        self.i = 0
        fn()
        torch.cuda.synchronize()
        got = [t.clone() for t in dst.tensors]
        for t, b in zip(dst.tensors, before, strict=True):
            t.copy_(b)
        sl, dl = self.layers_arg()
        copy_kv(src, dst, sp, dp, src_layers=sl, dst_layers=dl, impl="reference")
        torch.cuda.synchronize()
        return all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                   for a, b in zip(got, dst.tensors, strict=True))


def time_peer(case: Case, fn, traffic: int, calls: int, name: str = ""):
    """(graph GB/s, eager GB/s) of a peer kernel after checking its result: (None, None) when
    there is no peer, "wrong" when its bytes differ, "failed" (with `name`: its exceptions are
    a result, not a crash)."""
    if fn is None:
        return None, None
    try:
        if not case.check(fn):
            return "wrong", "wrong"
        eager = traffic / timed(fn) / 1e9
        t = graph_timed(fn, calls)
        return (traffic / t / 1e9 if t else None), eager
    except Exception as e:  # noqa: BLE001
        if not name:
            raise
        print(f"  ({name} failed: {type(e).__name__}: {e})")
        return "failed", "failed"


def same_bytes_copy(case: Case, move: str, calls: int) -> float | None:
    """GB/s of one contiguous cudaMemcpy of the bytes a host move carries (graph replay, buffers
    rotated as for the move): the copy engine's rate at this size, start-up and drain included,
    next to the 1 GiB peak. None for device moves."""
    if move not in ("h2d_layer", "d2h_all"):
        return None
    n = case.moved
    sets = max(1, case.sets)
    host = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(sets)]
    dev = [torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(sets)]
    i = [0]

    def fn():
        k = i[0] % sets
        i[0] += 1
        if move == "h2d_layer":
            dev[k].copy_(host[k], non_blocking=True)
        else:
            host[k].copy_(dev[k], non_blocking=True)
    t = graph_timed(fn, calls)
    return n / t / 1e9 if t else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="8b,70b")
    ap.add_argument("--page-sizes", default="16,64")
    ap.add_argument("--pages", default="64,512")
    ap.add_argument("--moves", default="d2d_gather,d2d_scatter,h2d_layer,d2h_all")
    ap.add_argument("--max-bytes", type=int, default=4 << 30,
                    help="skip cases that move more than this per call (memory)")
    ap.add_argument("--impls", default="triton,cuda",
                    help="our implementations to time (cuda: when dualpath._C has the kernels)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    impls = [i for i in args.impls.split(",") if i != "cuda" or cuda_available()]
    if len(impls) < len(args.impls.split(",")):
        print("note: dualpath._C has no CUDA kernels here; timing", ",".join(impls), "only")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (kernel correctness on the CPU: pytest test/ops)")
        return 2
    sha = git_sha()
    meta = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
            "git_sha": sha}
    pk = peaks()
    print("peaks (GB/s):", {k: round(v, 1) for k, v in pk.items()})
    ref_peak = {"d2d_gather": "d2d_gbps", "d2d_scatter": "d2d_gbps", "h2d_layer": "h2d_gbps",
                "d2h_all": "d2h_gbps"}
    print(f"{'move':>12} {'impl':>6} {'model':>5} {'ps':>3} {'pages':>5} {'ours GB/s':>11} "
          f"{'of peak':>7} "
          f"{'sglang GB/s':>11} {'ours eager':>11} {'sgl eager':>11} {'sgl JIT':>11} "
          f"{'JIT eager':>11} {'memcpy same':>11}")
    for model in args.models.split(","):
        for ps in (int(x) for x in args.page_sizes.split(",")):
            for pages in (int(x) for x in args.pages.split(",")):
                for move in args.moves.split(","):
                    layers = 1 if move == "h2d_layer" else MODELS[model][0]
                    size = 2 * layers * pages * ps * MODELS[model][1] * MODELS[model][2] * 2
                    if size > args.max_bytes:
                        print(f"{move:>12} {model:>5} {ps:>3} {pages:>5}  skipped: moves "
                              f"{size / 2**30:.1f} GiB > --max-bytes")
                        continue
                    case = Case(move, model, ps, pages)
                    traffic = case.moved * (2 if move.startswith("d2d") else 1)
                    calls = max(4, case.sets)  # every set once per round: L2 never warm
                    peer, peer_eager = time_peer(case, case.peer(), traffic, calls)
                    jit, jit_eager = time_peer(case, case.peer_jit(), traffic, calls,
                                               "SGLang's JIT kernel")
                    pk_row = {**pk, "sglang_jit_gbps": jit, "sglang_jit_eager_gbps": jit_eager,
                              "memcpy_same_bytes_gbps": same_bytes_copy(case, move, calls)}
                    for impl in impls:
                        fn = functools.partial(case.ours, impl)
                        ok = case.check(fn)
                        ours = ours_eager = None
                        if ok:
                            ours_eager = traffic / timed(fn) / 1e9
                            t = graph_timed(fn, calls)
                            ours = traffic / t / 1e9 if t else None
                        row(args, move, impl, model, ps, pages, case, ok, ours, ours_eager,
                            peer, peer_eager, pk_row, pk[ref_peak[move]], meta)
                    del case
                    torch.cuda.empty_cache()
    return 0


def row(args, move, impl, model, ps, pages, case, ok, ours, ours_eager, peer, peer_eager, pk,
        peak, meta) -> None:
    """Print one result line and append it to --out."""
    frac = ours / peak if ours else None
    rec = {"move": move, "impl": impl, "model": model, "page_size": ps,
           "pages": pages, "bytes": case.moved, "ours_gbps": ours,
           "ours_correct": ok,
           "fraction_of_peak": frac, "sglang_gbps": peer,
           "ours_eager_gbps": ours_eager, "sglang_eager_gbps": peer_eager,
           "timing": "CUDA graph of back-to-back calls (device time); *_eager: "
                     "one call between events (includes host overhead)",
           **pk, **meta}

    def fmt(v):
        return f"{v:>11}" if isinstance(v, str) else f"{v or float('nan'):>11.1f}"
    print(f"{move:>12} {impl:>6} {model:>5} {ps:>3} {pages:>5} {fmt(ours)} "
          f"{frac or float('nan'):>7.2f} {fmt(peer)} {fmt(ours_eager)} "
          f"{fmt(peer_eager)} {fmt(pk.get('sglang_jit_gbps'))} "
          f"{fmt(pk.get('sglang_jit_eager_gbps'))} {fmt(pk.get('memcpy_same_bytes_gbps'))}",
          flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
