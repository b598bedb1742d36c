"""Fit the simulator's PerfModel to measured runs: 1P1D comparisons (dualpath.bench.
compare_1p1d's result.json, `off` configuration) and, for the prefill, PD transfer runs
(dualpath.bench.pd_transfer's result.json: isolated cold prompts) when given.

- Prefill, from PD transfer runs: SGLang's forward time of each cold prompt, alone on the
  engine, against its length. Preferred: in a loaded 1P1D run a request's forward time also
  holds the other requests of its batch and the wait for its KV send.
- PD link: the median of SGLang's measured KV transfer rates of the 1P1D prefills (>= 100 MB).

- Prefill: per request, SGLang's own forward time on the prefill (`stage_records`, from
  --enable-request-time-stats-logging: forward entry to KV sent) less the KV send in it (size
  over the measured transfer speed; the simulator has the PD transfer as its own stage),
  against the tokens it computed (prompt minus cached) and the prompt length. Results without
  stage records fall back to TTFT minus the read at the cap and one decode step, which also
  counts queueing (crude).
- Decode: per turn, TPOT against the number of turns decoding at the middle of its decode and
  their summed context (from the replayer's per-turn start/TTFT/end).
"""

from __future__ import annotations

from collections.abc import Iterable


def transfer_s(rec: dict) -> float:
    """The KV send inside a prefill's forward time (SGLang counts forward entry to KV sent; the
    simulator models the PD transfer as its own stage): its size over its measured speed."""
    mb, gbps = rec.get("transfer_total_mb"), rec.get("transfer_speed_gbps")
    return mb / 1024 / gbps if mb and gbps else 0.0  # SGLang 0.5.17: MiB, and MiB / 1024 / s


def prefill_samples(run: dict, kv_bytes_per_token: int, cap_gbps: float) -> list[tuple]:
    """(computed tokens, prompt tokens, seconds) per prefill."""
    recs = [r for r in run.get("stage_records") or []
            if r.get("type") == "prefill" and "forward_s" in r]
    if recs:
        return [(r["input_len"] - r.get("cached_input_len", 0), r["input_len"],
                 max(0.0, r["forward_s"] - transfer_s(r))) for r in recs]
    out = []
    cap = cap_gbps * 1e9
    for r in run.get("turn_records") or []:
        if r.get("error") or not r.get("ttft_s"):
            continue
        hit = r.get("cached_tokens") or 0
        read_s = hit * kv_bytes_per_token / cap if cap else 0.0
        out.append((r["prompt_len"] - hit, r["prompt_len"], max(0.0, r["ttft_s"] - read_s)))
    return out


def decode_samples(run: dict) -> list[tuple]:
    """(turns decoding, their summed context tokens, seconds per output token) per turn."""
    spans = []
    for r in run.get("turn_records") or []:
        if r.get("error") or not r.get("ttft_s") or not r.get("end_s"):
            continue
        if (r.get("output_len") or 0) < 2:
            continue
        a = r["start_s"] + r["ttft_s"]
        spans.append((a, r["end_s"], r["prompt_len"] + r["output_len"] / 2,
                      (r["end_s"] - a) / (r["output_len"] - 1)))
    out = []
    for a, b, _, step in spans:
        mid = (a + b) / 2
        live = [s for s in spans if s[0] <= mid <= s[1]]
        out.append((len(live), sum(s[2] for s in live), step))
    return out


def isolated_prefill_samples(res: dict) -> list[tuple]:
    """(tokens, tokens, seconds) per cold prompt of a PD transfer run (dualpath.bench.
    pd_transfer's result.json): one request at a time, nothing cached, so SGLang's prefill
    forward time is the compute (its KV send overlaps the next chunk; ~10 ms remain)."""
    return [(r["prompt_len"], r["prompt_len"], r["prefill_forward_s"])
            for b in res.get("backends", []) for r in b.get("requests", [])
            if r.get("prefill_forward_s")]


def pd_transfer_gbps(run: dict) -> list[float]:
    """SGLang's measured PD KV transfer rates of a run's prefills that sent >= 100 MB, in GB/s
    (1e9, the simulator's unit: SGLang 0.5.17 reports MiB / 1024 per second, GiB/s; perf files
    calibrated before 2026-11-28's session 20, e.g. session 16's 12.37, hold GiB/s). SGLang
    divides all of a request's chunks by the last chunk's latency, which overstates a chunked
    prefill's rate."""
    return [r["transfer_speed_gbps"] * 2**30 / 1e9 for r in run.get("stage_records") or []
            if r.get("type") == "prefill" and r.get("transfer_speed_gbps")
            and (r.get("transfer_total_mb") or 0) >= 100]


def samples(results: Iterable[dict], kv_bytes_per_token: int) -> tuple[list, list, list]:
    """Prefill samples (from PD transfer runs when any are given: isolated prompts; else from the
    1P1D runs' per-request records, which also hold batching and send waits), decode samples
    and PD transfer rates (the 1P1D runs' `off` configuration)."""
    isolated, pre, dec, rates = [], [], [], []
    for res in results:
        isolated += isolated_prefill_samples(res)
        for cfg in res.get("configs", []):
            if cfg.get("config") != "off" or not cfg.get("offline"):
                continue
            pre += prefill_samples(cfg["offline"], kv_bytes_per_token, res.get("snic_gbps") or 0)
            dec += decode_samples(cfg["offline"])
            rates += pd_transfer_gbps(cfg["offline"])
    return (isolated or pre), dec, rates
