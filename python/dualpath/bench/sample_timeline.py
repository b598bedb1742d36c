"""A replay's samples as a time line (`compare_report --timeline CONFIG`): per sampling interval
(0.5 s by default), each node's storage read and write GB/s, the prefill's prefetches in flight,
SGLang's prefetch budget in use, the host pool's free tokens, prefetches queued in the interval,
and the prefill's and the decode's GPU utilisation. What the run's means hide: a ramp, a dip,
a stall."""

from __future__ import annotations

COLUMNS = (("t s", "t", "{:>6.1f}"), ("PE rd", "pe_read", "{:>6.2f}"),
           ("DE rd", "de_read", "{:>6.2f}"), ("PE wr", "pe_write", "{:>6.2f}"),
           ("DE wr", "de_write", "{:>6.2f}"), ("pf fly", "pf_in_flight", "{:>6}"),
           ("bud K", "pf_budget_k", "{:>6.0f}"), ("free K", "host_free_k", "{:>6.0f}"),
           ("queued", "pf_queued", "{:>6}"), ("PE gpu", "gpu0", "{:>6}"),
           ("DE gpu", "gpu1", "{:>6}"))  # GPU busy, %


def timeline(run: dict) -> list[dict]:
    """Rows from a run's `samples` (agents: cumulative counters and gauges; gpu: NVML), times
    from each series' first sample (both start with the replay)."""
    pre, dec = run.get("gpus") or (0, 1)  # recorded since 2026-11-28 (--parallel-start)
    agents = (run.get("samples") or {}).get("agents") or []
    gpu = (run.get("samples") or {}).get("gpu") or []
    if len(agents) < 2:
        return []
    t0, g0 = agents[0][0], (gpu[0][0] if gpu else 0.0)
    rows = []
    for (tp, p), (t, r) in zip(agents, agents[1:], strict=False):
        dt = max(t - tp, 1e-9)

        def delta(key, p=p, r=r):  # None where a sample lacks the node (its stats timed out)
            return r[key] - p[key] if key in r and key in p else None

        def rate(key, dt=dt):
            d = delta(key)
            return None if d is None else d / dt / 1e9

        def kilo(key, r=r):
            return r[key] / 1e3 if key in r else None
        row = {"t": t - t0, "pe_read": rate("pe_read_bytes"), "de_read": rate("de_read_bytes"),
               "pe_write": rate("pe_write_bytes"), "de_write": rate("de_write_bytes"),
               "pf_in_flight": r.get("pe_pf_in_flight_now"),
               "pf_budget_k": kilo("pe_pf_budget_used_tokens_now"),
               "host_free_k": kilo("pe_pf_host_free_tokens_now"),
               "pf_queued": delta("pe_pf_queued")}
        if gpu:  # the NVML sample nearest in time, of this config's prefill and decode GPUs
            _, s = min(gpu, key=lambda x: abs((x[0] - g0) - row["t"]))  # noqa: B023
            row["gpu0"], row["gpu1"] = (s.get(f"gpu{pre}_util"), s.get(f"gpu{dec}_util"))
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = " ".join(f"{name:>6}" for name, _, _ in COLUMNS)
    lines = [head]
    for row in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            v = row.get(key)
            cells.append(f"{'-':>6}" if v is None else fmt.format(v))
        lines.append(" ".join(cells))
    return "\n".join(lines)
