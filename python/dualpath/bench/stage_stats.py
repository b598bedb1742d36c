"""Per-request stage times from SGLang's own logs (`--enable-request-time-stats-logging`).

A finished request logs one line, e.g. on a PD prefill:
  ReqTimeStats(rid=..., input_len=10240, cached_input_len=10176, output_len=1, attempts=1,
  type=prefill): bootstrap_duration=1.20ms, queue_duration=85.10ms, forward_duration=310.00ms,
  entry_time=..., transfer_speed=4.31 GB/s, transfer_total=1310.72 MB
and on a decode: bootstrap_duration, alloc_wait_duration, transfer_duration, queue_duration,
forward_duration. `summarize` turns the lines of one run into p50/p90 per role and field, so a
benchmark can say where a turn's time goes (storage prefetch wait, KV transfer, decode).
"""

from __future__ import annotations

import re
from pathlib import Path

from dualpath.bench.replay import percentile

_LINE = re.compile(r"ReqTimeStats\(rid=([^,]*)(?:, bootstrap_room=[^,]*)?, input_len=(\d+), "
                   r"cached_input_len=(\d+), output_len=(\d+), attempts=\d+, type=(\w+)\): (.*)$")
_FIELD = re.compile(r"(\w+)=([-\d.]+)\s*(ms|GB/s|MB)?")


def parse_line(line: str) -> dict | None:
    """One ReqTimeStats line as {'type', 'rid', 'input_len', 'cached_input_len', 'output_len',
    '<field>_s' for durations, 'transfer_speed_gbps', 'transfer_total_mb'}; None otherwise."""
    m = _LINE.search(line)
    if not m:
        return None
    out: dict = {"type": m.group(5), "rid": m.group(1), "input_len": int(m.group(2)),
                 "cached_input_len": int(m.group(3)), "output_len": int(m.group(4))}
    for name, value, unit in _FIELD.findall(m.group(6)):
        if unit == "ms":
            out[name.removesuffix("_duration") + "_s"] = float(value) / 1e3
        elif unit == "GB/s":
            out[name + "_gbps"] = float(value)
        elif unit == "MB":
            out[name + "_mb"] = float(value)
        elif name == "entry_time":  # wall clock (s): requests of one batch share a start
            out["entry_time"] = float(value)
    return out


def parse_lines(lines) -> list[dict]:
    """The ReqTimeStats records among `lines` (parse_line's dicts)."""
    return [r for r in map(parse_line, lines) if r is not None]


def summarize_records(records: list[dict]) -> dict:
    """{role: {'requests': n, field: {'p50', 'p90', 'mean'}}} over parsed records."""
    by: dict[str, list[dict]] = {}
    for rec in records:
        by.setdefault(rec["type"], []).append(rec)
    out: dict = {}
    for role, recs in by.items():
        fields = sorted({k for r in recs for k in r} - {"type", "rid", "entry_time"})
        out[role] = {"requests": len(recs)}
        for f in fields:
            xs = [r[f] for r in recs if f in r]
            out[role][f] = {"p50": round(percentile(xs, 0.5), 4),
                            "p90": round(percentile(xs, 0.9), 4),
                            "mean": round(sum(xs) / len(xs), 4)}
    return out


def summarize(lines) -> dict:
    """summarize_records over the ReqTimeStats lines among `lines`."""
    return summarize_records(parse_lines(lines))


class LogCursor:
    """Reads what a growing log file gained since the cursor was made."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def new_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        return data.decode("utf-8", "replace").splitlines()
