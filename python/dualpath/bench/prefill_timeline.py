"""Where a PD prefill's requests spent their time, from its SGLang log alone
(`--enable-request-time-stats-logging`): how many requests sat in each stage on average
(bootstrap, waiting queue, forward incl. the KV send), the share of time no request was in
forward, and the batches (requests whose forward started together).

    python -m dualpath.bench.prefill_timeline PREFILL_LOG[.xz] [...]

A prefill whose queue is long while no resource (storage NIC, GPU) is busy is limited by its
scheduler thread (2x H100, 17ce76c: about 7 requests queued, 2.6 in forward, GPU 32% busy).
"""

from __future__ import annotations

import argparse
import lzma
import statistics
from pathlib import Path

from dualpath.bench.stage_stats import parse_lines

BATCH_GAP_S = 0.002  # entry times and durations are logged to the millisecond


def intervals(records) -> list[tuple[float, float, float, float, int]]:
    """(entry, queue start, forward start, end, prompt tokens) per prefill request with an
    entry time; SGLang's warm-up and health checks (1-4 token prompts) left out."""
    out = []
    for r in records:
        if r.get("type") != "prefill" or r.get("entry_time") is None or r["input_len"] < 8:
            continue
        t0 = r["entry_time"]
        q = t0 + (r.get("bootstrap_s") or 0.0)
        f = q + (r.get("queue_s") or 0.0)
        out.append((t0, q, f, f + (r.get("forward_s") or 0.0), r["input_len"]))
    return sorted(out)


def timeline(records, samples: int = 2000) -> dict:
    iv = intervals(records)
    if not iv:
        raise ValueError("no prefill requests with entry times (SGLang logs with "
                         "--enable-request-time-stats-logging)")
    t0, t1 = iv[0][0], max(x[3] for x in iv)
    span = max(t1 - t0, 1e-9)
    ts = [t0 + span * (i + 0.5) / samples for i in range(samples)]

    def mean_in(a: int, b: int) -> float:
        return statistics.fmean(sum(1 for x in iv if x[a] <= t < x[b]) for t in ts)

    idle = statistics.fmean(all(not (x[2] <= t < x[3]) for x in iv) for t in ts)
    starts = sorted(x[2] for x in iv)
    batches = 1 + sum(1 for a, b in zip(starts, starts[1:], strict=False) if b - a > BATCH_GAP_S)
    return {"requests": len(iv), "span_s": round(span, 2),
            "mean_in_bootstrap": round(mean_in(0, 1), 2), "mean_in_queue": round(mean_in(1, 2), 2),
            "mean_in_forward": round(mean_in(2, 3), 2), "no_forward_share": round(idle, 3),
            "batches": batches, "requests_per_batch": round(len(iv) / batches, 2),
            "queue_s_mean": round(statistics.fmean(x[2] - x[1] for x in iv), 3),
            "forward_s_mean": round(statistics.fmean(x[3] - x[2] for x in iv), 3)}


def read_log(path: Path) -> list[dict]:
    opener = lzma.open if str(path).endswith(".xz") else open
    with opener(path, "rt", errors="replace") as f:
        return parse_lines(f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dualpath.bench.prefill_timeline",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", type=Path, help="SGLang prefill server logs (.xz ok)")
    args = ap.parse_args(argv)
    for p in args.logs:
        try:
            t = timeline(read_log(p))
        except ValueError as e:
            print(f"{p}: {e}")
            continue
        print(f"{p}: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def turn_breakdown(turns, records, t0_wall: float) -> dict | None:
    """Where each turn's time to first token went, joined by request id: from the client's
    send to the prefill's entry (the router's admission and the HTTP hop), the prefill's
    bootstrap, queue (incl. its storage prefetch) and forward + KV send, and the rest of the
    TTFT (decode side). Means over the turns found in both; None when none are."""
    pre = {r["rid"]: r for r in records
           if r.get("type") == "prefill" and r.get("rid") and r.get("entry_time") is not None}
    rows = []
    for t in turns:
        r = pre.get(t.get("rid"))
        if r is None or t.get("ttft_s") is None:
            continue
        to_pe = r["entry_time"] - (t0_wall + t["start_s"])
        pe = (r.get("bootstrap_s") or 0.0) + (r.get("queue_s") or 0.0) + (r.get("forward_s") or 0.0)
        rows.append((to_pe, r.get("bootstrap_s") or 0.0, r.get("queue_s") or 0.0,
                     r.get("forward_s") or 0.0, t["ttft_s"] - to_pe - pe, t["ttft_s"]))
    if not rows:
        return None
    names = ("to_prefill_s", "pe_bootstrap_s", "pe_queue_s", "pe_forward_s", "after_prefill_s",
             "ttft_s")
    return {"turns": len(rows),
            **{n: round(statistics.fmean(x[i] for x in rows), 4) for i, n in enumerate(names)}}
