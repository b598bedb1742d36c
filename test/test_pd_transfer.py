"""pd_transfer's per-backend loop (bench/pd_transfer.py) against a fake cluster: cold then warm
requests per length, the servers' stage lines parsed, and with --gil-monitor each request's
GIL stalls per server."""

import argparse
import types
from pathlib import Path

from dualpath.bench import pd_transfer


def test_each_request_gets_its_stages_and_gil_stalls(monkeypatch, tmp_path):
    specs, snaps = [], iter(range(1000))

    class Proc:
        def __init__(self, port):
            self.port, self.log_path = port, tmp_path / f"{port}.log"
            self.log_path.write_text("")

    class FakeCluster:
        def __init__(self, spec, out, timeout):
            specs.append(spec)
            self.pre, self.dec, self.url, self.startup_s = Proc(1), Proc(2), "http://x", 0.1

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def generate(url, ids, n):
        with open(tmp_path / "1.log", "a") as f:
            f.write("... pd send room 7: 30.00 ms from the last chunk queued to success "
                    "(40.00 ms from the first); wait 1.00 ms, kv send 9.00 ms, after 20.00 ms\n")
        return types.SimpleNamespace(ttft_s=0.1, output_ids=[1] * n)

    def gil(ports):  # cumulative: each call adds one stall of >= 5 ms to each server
        k = next(snaps)
        return {r: {"ticks": 10 * k, "tick_ms": 5.0, "stalls_ge_ms": {"5": k}, "stalled_s": k / 100,
                    "stalls_in_gc": 0, "max_ms": 9.0, "gc": {}, "sites": []} for r in ports}

    monkeypatch.setattr(pd_transfer, "PDCluster", FakeCluster)
    monkeypatch.setattr(pd_transfer.client, "generate", generate)
    monkeypatch.setattr(pd_transfer, "gil_snapshots", gil)
    monkeypatch.setattr(pd_transfer.time, "sleep", lambda s: None)
    args = argparse.Namespace(store_dir=str(tmp_path / "kv"), model=Path("m"),
                              max_total_tokens=1024, stack_sample=False, gil_monitor=True,
                              health_timeout=1, lengths=[64], repeats=2, cold_repeats=None,
                              warm=True, output_len=4)
    res = pd_transfer.run_backend("dualpath", args, tmp_path)
    assert specs[0].gil_monitor and [(r["phase"], r["repeat"]) for r in res["requests"]] == [
        ("cold", 0), ("cold", 1), ("warm", 0), ("warm", 1)]
    r = res["requests"][0]
    assert r["sender_ms"] == 30.0 and r["sender_after_ms"] == 20.0
    assert r["gil"]["pe"]["stalls_ge_ms"] == {"5": 1} and r["gil"]["de"]["ticks"] == 10
    args.gil_monitor = False
    assert pd_transfer.run_backend("nixl", args, tmp_path)["requests"][0]["gil"] is None
