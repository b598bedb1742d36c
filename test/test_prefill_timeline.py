"""The prefill timeline from SGLang ReqTimeStats lines."""

import lzma

import pytest

from dualpath.bench import prefill_timeline as pt


def line(entry, boot_ms, queue_ms, fwd_ms, n=1000):
    return (f"[x] ReqTimeStats(rid=r{entry}, bootstrap_room=5, input_len={n}, cached_input_len=0, "
            f"output_len=1, attempts=0, type=prefill): bootstrap_duration={boot_ms:.2f}ms, "
            f"queue_duration={queue_ms:.2f}ms, forward_duration={fwd_ms:.2f}ms, "
            f"entry_time={entry:.3f}, transfer_speed=1.00 GB/s, transfer_total=10.00 MB\n")


def test_stages_batches_and_idle_share(tmp_path):
    # two requests batched at t=1.0 (forward 1 s), one alone at t=3.0; nothing in forward
    # from 2.0 to 3.0; a warm-up request (4 tokens) is ignored
    text = (line(0.0, 0, 1000, 1000) + line(0.5, 0, 500, 1000) + line(2.0, 0, 1000, 1000)
            + line(0.1, 0, 0, 50, n=4))
    p = tmp_path / "prefill.log.xz"
    with lzma.open(p, "wt") as f:
        f.write(text)
    t = pt.timeline(pt.read_log(p))
    assert t["requests"] == 3 and t["batches"] == 2 and t["requests_per_batch"] == 1.5
    assert t["span_s"] == 4.0 and t["no_forward_share"] == pytest.approx(0.5, abs=0.01)
    assert t["mean_in_forward"] == pytest.approx(0.75, abs=0.01)  # (2 x 1 s + 1 s) / 4 s
    assert t["queue_s_mean"] == pytest.approx(0.833, abs=0.001)
    with pytest.raises(ValueError, match="entry times"):
        pt.timeline([])
    assert pt.main([str(p)]) == 0


def test_turn_breakdown_joins_turns_and_prefill_records_by_request_id():
    turns = [{"rid": "x-a0-t0", "start_s": 1.0, "ttft_s": 3.0},
             {"rid": "x-a0-t1", "start_s": 5.0, "ttft_s": None},  # failed: left out
             {"rid": "x-a1-t0", "start_s": 2.0, "ttft_s": 2.0}]
    recs = [{"type": "prefill", "rid": "x-a0-t0", "entry_time": 101.5, "bootstrap_s": 0.1,
             "queue_s": 0.4, "forward_s": 0.5},
            {"type": "prefill", "rid": "x-a1-t0", "entry_time": 102.5, "bootstrap_s": 0.0,
             "queue_s": 0.5, "forward_s": 0.5},
            {"type": "decode", "rid": "x-a0-t0", "entry_time": 101.0}]
    b = pt.turn_breakdown(turns, recs, t0_wall=100.0)
    assert b["turns"] == 2 and b["to_prefill_s"] == 0.5 and b["pe_queue_s"] == 0.45
    assert b["after_prefill_s"] == 1.0 and b["ttft_s"] == 2.5  # (3-0.5-1 + 2-0.5-1) / 2
    assert pt.turn_breakdown(turns, [], 100.0) is None
