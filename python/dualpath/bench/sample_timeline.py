"""A replay's samples as a time line (`compare_report --timeline CONFIG`): per sampling interval
(0.5 s by default), each node's storage read and write GB/s, the prefill's prefetches in flight,
SGLang's prefetch budget in use, the host pool's free tokens, prefetches queued in the interval,
and each GPU's utilisation. What the run's means hide: a ramp, a dip, a stall."""

from __future__ import annotations

COLUMNS = (("t s", "t", "{:>6.1f}"), ("PE rd", "pe_read", "{:>6.2f}"),
           ("DE rd", "de_read", "{:>6.2f}"), ("PE wr", "pe_write", "{:>6.2f}"),
           ("DE wr", "de_write", "{:>6.2f}"), ("pf fly", "pf_in_flight", "{:>6}"),
           ("bud K", "pf_budget_k", "{:>6.0f}"), ("free K", "host_free_k", "{:>6.0f}"),
           ("queued", "pf_queued", "{:>6}"), ("gpu0 %", "gpu0", "{:>6}"),
           ("gpu1 %", "gpu1", "{:>6}"))


def timeline(run: dict) -> list[dict]:
    """Rows from a run's `samples` (agents: cumulative counters and gauges; gpu: NVML), times
    from each series' first sample (both start with the replay)."""
    agents = (run.get("samples") or {}).get("agents") or []
    gpu = (run.get("samples") or {}).get("gpu") or []
    if len(agents) < 2:
        return []
    t0, g0 = agents[0][0], (gpu[0][0] if gpu else 0.0)
    rows = []
    for (tp, p), (t, r) in zip(agents, agents[1:], strict=False):
        dt = max(t - tp, 1e-9)

        def rate(key, p=p, r=r, dt=dt):
            return (r.get(key, 0) - p.get(key, 0)) / dt / 1e9
        row = {"t": t - t0, "pe_read": rate("pe_read_bytes"), "de_read": rate("de_read_bytes"),
               "pe_write": rate("pe_write_bytes"), "de_write": rate("de_write_bytes"),
               "pf_in_flight": r.get("pe_pf_in_flight_now"),
               "pf_budget_k": r.get("pe_pf_budget_used_tokens_now", 0) / 1e3,
               "host_free_k": r.get("pe_pf_host_free_tokens_now", 0) / 1e3,
               "pf_queued": r.get("pe_pf_queued", 0) - p.get("pe_pf_queued", 0)}
        if gpu:  # the NVML sample nearest in time
            _, s = min(gpu, key=lambda x: abs((x[0] - g0) - row["t"]))  # noqa: B023
            row["gpu0"], row["gpu1"] = s.get("gpu0_util"), s.get("gpu1_util")
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = "".join(f"{name:>7}" for name, _, _ in COLUMNS)
    lines = [head]
    for row in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            v = row.get(key)
            cells.append(f"{'-':>6}" if v is None else fmt.format(v))
        lines.append(" ".join(cells))
    return "\n".join(lines)
