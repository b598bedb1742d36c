"""GlobalScheduler: the request lifecycle, admission control, read side and bookkeeping."""

import numpy as np
import pytest

from dualpath.config import SchedulerConfig
from dualpath.scheduler import EngineSpec, GlobalScheduler, PairScheduler, Request
from dualpath.scheduler.de import group_tokens

PE = [EngineSpec("p0", "pnode0", "pg0"), EngineSpec("p1", "pnode1", "pg1")]
DE = [EngineSpec("d0", "dnode0", "dg0", kv_capacity=100_000),
      EngineSpec("d1", "dnode1", "dg1", kv_capacity=100_000)]


def sched(**cfg):
    return GlobalScheduler(PE, DE, SchedulerConfig(**cfg))


def test_plans_spread_and_bookkeeping_returns_to_zero():
    s = sched()
    for i in range(4):
        s.submit(Request(f"r{i}", 1000, hit_len=900, max_new_tokens=100))
    plans = s.schedule()
    assert [p.rid for p in plans] == ["r0", "r1", "r2", "r3"]
    assert sorted(p.prefill for p in plans) == ["p0", "p0", "p1", "p1"]
    assert sorted(p.decode for p in plans) == ["d0", "d0", "d1", "d1"]
    assert list(s.de.free_kv) == [97_800, 97_800]
    assert list(s._de_group_tok) == list(group_tokens(s.de)) == [2000, 2000]
    for p in plans:
        s.read_done(p.rid)
        s.prefill_done(p.rid)
        s.finish(p.rid)
    assert not s.queue and not s.running
    assert s.pe.tok.sum() == s.pe.seq.sum() == s.de.tok.sum() == s.de.seq.sum() == 0
    assert list(s.de.free_kv) == [100_000, 100_000]
    assert s.pe_read_q.sum() == s.de_read_q.sum() == 0
    assert list(s._de_group_tok) == [0, 0]


def test_read_goes_to_the_shorter_queue():
    s = sched()
    s.report_read("prefill", "pnode0", queue_tokens=50_000)
    s.report_read("prefill", "pnode1", queue_tokens=50_000)
    s.submit(Request("r", 4096, hit_len=4032))
    (plan,) = s.schedule()
    assert plan.read_side == "de" and plan.de_read_tokens == 4032
    assert s.de_read_q.sum() == 4032


def test_pe_only_mode_is_the_basic_read_path():
    s = sched(read_side="pe")
    s.report_read("prefill", "pnode0", queue_tokens=50_000)
    s.submit(Request("r", 4096, hit_len=4032))
    assert s.schedule()[0].read_side == "pe"


def test_split_mode_divides_by_expected_finish_time():
    s = sched(read_side="split")
    s.submit(Request("r", 8192, hit_len=8192))
    (plan,) = s.schedule()
    assert plan.read_side == "split" and plan.pe_read_tokens == plan.de_read_tokens == 4096


def test_admission_control_holds_requests_until_prefill_frees_tokens():
    # beta = 5 s x 1000 tok/s = 5000 tokens per PE
    s = sched(initial_prefill_tokens_per_s=1000.0)
    for i in range(3):
        s.submit(Request(f"r{i}", 6000))
    plans = s.schedule()
    assert [p.rid for p in plans] == ["r0", "r1"] and [r.rid for r in s.queue] == ["r2"]
    assert s.schedule() == []
    s.prefill_done("r0")
    assert [p.rid for p in s.schedule()] == ["r2"]


def test_decode_without_room_keeps_request_queued_and_pe_free():
    s = GlobalScheduler(PE, [EngineSpec("d0", "dn", "dg", kv_capacity=1000)])
    s.submit(Request("big", 2000))
    assert s.schedule() == []
    assert s.pe.tok.sum() == 0 and [r.rid for r in s.queue] == ["big"]
    s.report_decode("d0", free_kv=5000)
    assert [p.rid for p in s.schedule()] == ["big"]


def test_measured_rates_move_alpha_and_beta():
    s = sched(rate_ewma=1.0)
    s.report_read("prefill", "pnode0", tokens_total=0, busy_s_total=0)
    s.report_read("prefill", "pnode0", tokens_total=50_000, busy_s_total=1.0)
    assert s.alpha[0] == pytest.approx(150_000) and s.alpha[1] == pytest.approx(300_000)
    s.report_prefill_rate("p1", 0, 0)
    s.report_prefill_rate("p1", 30_000, 2.0)  # 15k tok/s -> beta 75k
    assert list(s.beta) == pytest.approx([100_000, 75_000])
    s.report_prefill_rate("p1", 30_000, 2.0)  # no busy time passed: no new sample
    s.report_prefill_rate("p1", 10, 0.5)  # counters went back (engine restart): start over
    assert s.beta[1] == pytest.approx(75_000)
    s.report_prefill_rate("p1", 20_010, 1.5)  # 20k tokens in 1 s from the new base
    assert s.beta[1] == pytest.approx(100_000)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="both prefill and decode"):
        GlobalScheduler([EngineSpec("p", "n", "g")], [EngineSpec("d", "n", "g2")])
    with pytest.raises(ValueError, match="must share a group"):
        GlobalScheduler([EngineSpec("p0", "n", "g0"), EngineSpec("p1", "n", "g1")], DE)
    s = sched()
    s.submit(Request("r", 10))
    with pytest.raises(ValueError, match="already queued"):
        s.submit(Request("r", 10))
    with pytest.raises(KeyError, match="not running"):
        s.finish("nope")
    with pytest.raises(ValueError, match="hit_len"):
        Request("x", 10, hit_len=11)
    with pytest.raises(ValueError, match="rate_ewma"):
        SchedulerConfig(rate_ewma=0)


def test_failed_request_releases_everything_via_finish():
    s = sched()
    s.submit(Request("r", 1000, hit_len=512, max_new_tokens=10))
    s.schedule()
    s.finish("r")  # failed before read/prefill completed
    assert s.pe.tok.sum() == 0 and s.pe_read_q.sum() + s.de_read_q.sum() == 0
    assert list(s.de.free_kv) == [100_000, 100_000]


@pytest.mark.parametrize("policy", ["round_robin", "random"])
def test_baselines_read_on_the_prefill_side(policy):
    b = PairScheduler(PE, DE, policy=policy)
    for i in range(4):
        b.submit(Request(f"r{i}", 100, hit_len=64))
    plans = b.schedule()
    assert len(plans) == 4 and all(p.read_side == "pe" for p in plans)
    if policy == "round_robin":
        assert [p.prefill for p in plans] == ["p0", "p1", "p0", "p1"]
    assert np.all([p.pe_read_tokens == 64 for p in plans])


def test_unavailable_engines_are_skipped_and_come_back():
    s = sched()
    s.set_available("p0", False)
    s.set_available("d1", False)
    for i in range(3):
        s.submit(Request(f"r{i}", 100))
    plans = s.schedule()
    assert {(p.prefill, p.decode) for p in plans} == {("p1", "d0")} and len(plans) == 3
    s.set_available("d0", False)
    s.submit(Request("r9", 100))
    assert s.schedule() == [] and [r.rid for r in s.queue] == ["r9"]
    s.set_available("d1", True)
    assert [p.decode for p in s.schedule()] == ["d1"]
    with pytest.raises(KeyError):
        s.set_available("nope", False)


def test_cancel_removes_a_waiting_request():
    s = GlobalScheduler(PE, [EngineSpec("d0", "dn", "dg", kv_capacity=10)])
    s.submit(Request("big", 100))
    assert s.schedule() == []
    assert s.cancel("big") is True and not s.queue and s.cancel("big") is False
    s.submit(Request("big", 5))  # the id is free again
    assert [p.rid for p in s.schedule()] == ["big"]


def test_rebuilt_keeps_state_of_surviving_engines():
    s = sched(read_side="pe")
    for i in range(4):
        s.submit(Request(f"r{i}", 1000, hit_len=512, max_new_tokens=24))
    plans = {p.rid: p for p in s.schedule()}
    s.prefill_done("r0")
    new = s.rebuilt(PE, DE[:1] + [EngineSpec("d2", "dnode2", "dg2", kv_capacity=5000)])
    survivors = [r for r, p in plans.items() if p.decode == "d0"]
    assert sorted(new.running) == sorted(survivors)
    assert new.de.names == ["d0", "d2"]
    assert new.de.tok[0] == 1000 * len(survivors) and new.de.free_kv[1] == 5000
    # requests that were on d1 released their PE tokens and read queue entries
    assert new.pe.tok.sum() == 1000 * sum(1 for r in survivors if r != "r0")
    assert new.pe_read_q.sum() == 512 * len(survivors)
    for rid in survivors:
        new.finish(rid)
    assert new.pe.tok.sum() == new.de.tok.sum() == new.pe_read_q.sum() == 0
    assert list(new.de.free_kv) == [100_000, 5000]


def test_rebuilt_releases_read_queue_of_a_removed_engine_on_a_surviving_node():
    pe = [EngineSpec("p0", "pn", "pg"), EngineSpec("p1", "pn", "pg")]
    s = GlobalScheduler(pe, DE, SchedulerConfig(read_side="pe"))
    s.submit(Request("r0", 1000, hit_len=512))
    s.submit(Request("r1", 1000, hit_len=512))
    plans = {p.rid: p for p in s.schedule()}
    gone = plans["r1"].prefill
    keep = [spec for spec in pe if spec.name != gone]
    new = s.rebuilt(keep, DE)
    assert list(new.pe_read_q) == [512], "only the surviving request's read remains queued"
    new.finish("r0")
    assert list(new.pe_read_q) == [0] and new.de.tok.sum() == 0
