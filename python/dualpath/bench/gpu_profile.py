"""Where a server's GPU time went: a window of SGLang's torch profiler, summarized.

The GPU host has no Nsight Systems (ncu profiles one kernel; nsys is missing), so a timeline of a
running server comes from SGLang's own profiler (`POST /start_profile`, torch.profiler with
CUPTI): `start(url, out_dir, steps)` records the next `steps` forward batches of a server and
SGLang writes a Chrome trace (`*.trace.json.gz`) into `out_dir`; `summarize(trace)` reduces it
to what a run needs (kilobytes, not the trace's tens of megabytes):

- the window (first to last GPU event) and the fraction of it in which any kernel ran (the
  union of kernel intervals: concurrent streams counted once);
- kernels by name: total time, calls, share of the window (top N);
- memory copies by kind (HtoD, DtoH, DtoD, PtoP): time, bytes, GB/s;
- time per stream (which streams are busy: compute, HiCache load/backup, transfers).

CUPTI tracing slows the profiled server somewhat: use the window to see what the GPU does, not
to time the run. `python -m dualpath.bench.gpu_profile TRACE [--top 25]` prints a summary.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import urllib.request
from collections import defaultdict
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def start(url: str, out_dir: Path, steps: int, timeout_s: float = 30.0) -> dict:
    """Ask a SGLang server to profile its GPU for its next `steps` forward batches."""
    out_dir.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"output_dir": str(out_dir), "num_steps": int(steps),
                       "activities": ["GPU"], "with_stack": False,
                       "record_shapes": False}).encode()
    req = urllib.request.Request(f"{url}/start_profile", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return {"status": r.status, "body": r.read().decode(errors="replace")[:500]}


def load(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        doc = json.load(f)
    return doc.get("traceEvents", doc) if isinstance(doc, dict) else doc


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _kernel_name(name: str) -> str:
    """Template arguments and parameter lists dropped: one row per kernel, not per shape."""
    name = re.sub(r"\(.*$", "", name)
    depth, out = 0, []
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out).strip()[:100] or name[:100]


def _copy_kind(ev: dict) -> str:
    name = ev.get("name", "")
    for kind in ("HtoD", "DtoH", "DtoD", "PtoP", "HtoH"):
        if kind in name:
            return kind
    return "memset" if ev.get("cat") == "gpu_memset" else name[:40]


def summarize(events: list[dict], top: int = 25) -> dict:
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATS
           and "dur" in e and "ts" in e]
    if not gpu:
        return {"events": 0, "note": "no GPU events in the trace"}
    t0 = min(float(e["ts"]) for e in gpu)
    t1 = max(float(e["ts"]) + float(e["dur"]) for e in gpu)
    window_us = max(t1 - t0, 1e-9)
    kernels = [e for e in gpu if e["cat"] == "kernel"]
    busy = _union([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels])
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        row = by_name[_kernel_name(e.get("name", "?"))]
        row[0] += float(e["dur"])
        row[1] += 1
    copies: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for e in gpu:
        if e["cat"] == "kernel":
            continue
        row = copies[_copy_kind(e)]
        row[0] += float(e["dur"])
        row[1] += float((e.get("args") or {}).get("bytes", 0))
        row[2] += 1
    streams: dict[str, float] = defaultdict(float)
    for e in gpu:
        args = e.get("args") or {}
        streams[f"device {args.get('device', '?')} stream {args.get('stream', e.get('tid'))}"] \
            += float(e["dur"])
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {
        "events": len(gpu),
        "window_s": round(window_us / 1e6, 4),
        "kernel_busy_fraction": round(busy / window_us, 4),
        "kernel_s": round(sum(v[0] for v in by_name.values()) / 1e6, 4),
        "kernels": [{"name": n, "s": round(v[0] / 1e6, 5), "calls": int(v[1]),
                     "of_window": round(v[0] / window_us, 4)} for n, v in ranked[:top]],
        "copies": {k: {"s": round(v[0] / 1e6, 5), "bytes": int(v[1]), "calls": int(v[2]),
                       "gbps": round(v[1] / v[0] / 1e3, 2) if v[0] else None}
                   for k, v in sorted(copies.items(), key=lambda kv: -kv[1][0])},
        "streams": {k: round(v / 1e6, 4) for k, v in sorted(streams.items(),
                                                              key=lambda kv: -kv[1])[:12]},
    }


def summarize_dir(out_dir: Path, top: int = 25) -> dict | None:
    """Summary of the newest trace SGLang wrote into out_dir (None if it wrote none)."""
    traces = sorted(out_dir.glob("*.trace.json*"), key=lambda p: p.stat().st_mtime)
    if not traces:
        return None
    return {"trace": str(traces[-1]), **summarize(load(traces[-1]), top)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", type=Path, help="a *.trace.json(.gz) or a folder of them")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    s = (summarize_dir(args.trace, args.top) if args.trace.is_dir()
         else summarize(load(args.trace), args.top))
    if not s or not s.get("events"):
        print("no GPU events found")
        return 1
    print(f"window {s['window_s']:.3f} s, a kernel running {100 * s['kernel_busy_fraction']:.1f}%"
          f" of it ({s['events']} GPU events)")
    print("\nkernels (time, calls, of window):")
    for k in s["kernels"]:
        print(f"  {k['s']:9.4f} s {k['calls']:7d} {100 * k['of_window']:6.1f}%  {k['name']}")
    print("\ncopies:")
    for kind, v in s["copies"].items():
        print(f"  {kind:8} {v['s']:9.4f} s {v['bytes'] / 1e9:9.3f} GB {v['calls']:7d} calls "
              f"{v['gbps'] or 0:8.1f} GB/s")
    print("\nbusiest streams (s):")
    for k, v in s["streams"].items():
        print(f"  {v:9.4f}  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
