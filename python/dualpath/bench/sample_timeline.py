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


def _delta(p: dict, r: dict, key: str):
    """A counter's change between two samples; None where one lacks it (its node's stats
    timed out)."""
    return r[key] - p[key] if key in r and key in p else None


def _scaled(v, scale: float):  # v / scale; None stays None
    return None if v is None else v / scale


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
        gbps = {k: _scaled(_delta(p, r, k), dt * 1e9) for k in
                ("pe_read_bytes", "de_read_bytes", "pe_write_bytes", "de_write_bytes")}
        row = {"t": t - t0, "pe_read": gbps["pe_read_bytes"], "de_read": gbps["de_read_bytes"],
               "pe_write": gbps["pe_write_bytes"], "de_write": gbps["de_write_bytes"],
               "pf_in_flight": r.get("pe_pf_in_flight_now"),
               "pf_budget_k": _scaled(r.get("pe_pf_budget_used_tokens_now"), 1e3),
               "host_free_k": _scaled(r.get("pe_pf_host_free_tokens_now"), 1e3),
               "pf_queued": _delta(p, r, "pe_pf_queued")}
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
