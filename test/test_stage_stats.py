"""Stage times parsed from SGLang's ReqTimeStats log lines (the format of sglang 0.5.17)."""

from dualpath.bench.stage_stats import LogCursor, parse_line, summarize

PRE = ("[2026-11-27 15:36:01 TP0] ReqTimeStats(rid=a1, bootstrap_room=77, input_len=10240, "
       "cached_input_len=10176, output_len=1, attempts=1, type=prefill): "
       "bootstrap_duration=1.20ms, queue_duration=85.10ms, forward_duration=310.00ms, "
       "entry_time=1764257761.123, transfer_speed=4.31 GB/s, transfer_total=1310.72 MB")
DEC = ("[2026-11-27 15:36:02 TP0] ReqTimeStats(rid=a1, bootstrap_room=77, input_len=10240, "
       "cached_input_len=0, output_len=42, attempts=1, type=decode): "
       "bootstrap_duration=0.50ms, alloc_wait_duration=2.00ms, transfer_duration=300.00ms, "
       "queue_duration=1.00ms, forward_duration=1500.00ms, entry_time=1764257761.2")


def test_parse_prefill_and_decode_lines():
    p = parse_line(PRE)
    assert p["type"] == "prefill" and p["input_len"] == 10240 and p["cached_input_len"] == 10176
    assert p["queue_s"] == 0.0851 and p["forward_s"] == 0.31 and p["bootstrap_s"] == 0.0012
    assert p["transfer_speed_gbps"] == 4.31 and p["transfer_total_mb"] == 1310.72
    assert "entry_time_s" not in p and p["entry_time"] == 1764257761.123
    d = parse_line(DEC)
    assert d["type"] == "decode" and d["transfer_s"] == 0.3 and d["alloc_wait_s"] == 0.002
    assert parse_line("Prefill batch, #new-seq: 1") is None


def test_summarize_percentiles_per_role():
    lines = [PRE.replace("310.00ms", f"{100 * i}.00ms") for i in range(1, 11)] + [DEC, "x"]
    s = summarize(lines)
    assert s["prefill"]["requests"] == 10 and s["decode"]["requests"] == 1
    fwd = s["prefill"]["forward_s"]
    assert fwd["p50"] in (0.5, 0.6) and fwd["p90"] == 0.9
    assert s["decode"]["forward_s"]["mean"] == 1.5


def test_cursor_reads_only_new_lines(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("old\n")
    c = LogCursor(log)
    with open(log, "a") as f:
        f.write(PRE + "\n")
    assert c.new_lines() == [PRE]
    assert LogCursor(tmp_path / "none.log").new_lines() == []
