"""Fit the simulator's PerfModel to a measured 1P1D comparison (dualpath.bench.compare_1p1d's
result.json), `off` configuration.

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
    return mb / 1e3 / gbps if mb and gbps else 0.0


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


def samples(results: Iterable[dict], kv_bytes_per_token: int) -> tuple[list, list]:
    pre, dec = [], []
    for res in results:
        for cfg in res.get("configs", []):
            if cfg.get("config") != "off" or not cfg.get("offline"):
                continue
            pre += prefill_samples(cfg["offline"], kv_bytes_per_token, res.get("snic_gbps") or 0)
            dec += decode_samples(cfg["offline"])
    return pre, dec
