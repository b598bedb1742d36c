"""Hand-computed cases of the paper's rules (§6.2-6.4)."""

import numpy as np
import pytest

from dualpath.scheduler import (
    EngineSpec,
    EngineTable,
    Request,
    assign_groups,
    schedule_decode_group,
    schedule_prefill,
    shorter_side,
    split_read,
)
from dualpath.scheduler.de import high_token_threshold


def table(toks, nodes=None, seqs=None, free=None):
    nodes = nodes or [f"n{i}" for i in range(len(toks))]
    t = EngineTable.build([EngineSpec(f"e{i}", n, "g") for i, n in enumerate(nodes)])
    t.tok[:] = toks
    if seqs is not None:
        t.seq[:] = seqs
    if free is not None:
        t.free_kv[:] = free
    return t


def reqs(*lens, kv_extra=0):
    return [Request(f"r{i}", n, max_new_tokens=kv_extra) for i, n in enumerate(lens)]


# ---- PE: Algorithm 1 ----
def test_short_read_queue_beats_fewer_tokens():
    t = table([100, 50])  # e0 on n0 (read queue 0), e1 on n1 (read queue 1000)
    assert schedule_prefill(reqs(10), t, np.array([0, 1000]), alpha=500, beta=10_000) == [0]


def test_long_queue_engines_used_when_no_short_one_qualifies():
    t = table([6000, 50])  # e0 short queue but over beta
    assert schedule_prefill(reqs(10), t, np.array([0, 1000]), alpha=500, beta=5000) == [1]


def test_tokens_grow_within_a_call_and_ties_take_lowest_index():
    t = table([0, 0])
    assert schedule_prefill(reqs(6000, 10, 10), t, np.array([0, 0]), 500, 5000) == [0, 1, 1]
    assert list(t.tok) == [0, 0], "the input table is not modified"


def test_stops_at_first_request_no_engine_takes():
    t = table([4990])
    # r0 fits (4990 <= beta), then e0 has 5090 > beta: r1 waits and so does r2 behind it (FIFO)
    assert schedule_prefill(reqs(100, 1, 1), t, np.array([0]), 500, 5000) == [0]
    assert schedule_prefill(reqs(1), table([5001]), np.array([0]), 500, 5000) == []


def test_per_node_alpha_and_per_engine_beta():
    t = table([10, 20, 30], nodes=["a", "b", "c"])
    read_q = np.array([300, 300, 0])
    # node a's alpha (400) makes it short; b's (200) does not; c short but over its beta (20)
    out = schedule_prefill(reqs(5), t, read_q, alpha=np.array([400, 200, 100]),
                           beta=np.array([1000, 1000, 20]))
    assert out == [0]


# ---- DE: two phases ----
def test_groups_take_requests_by_least_total_tokens():
    t = EngineTable.build([EngineSpec("d0", "n0", "g0"), EngineSpec("d1", "n1", "g1")])
    t.tok[:] = [100, 50]
    assert assign_groups(reqs(100, 10, 10), t) == [1, 0, 0]  # 50->150; then g0 100->110->120


def test_high_token_threshold_counts_the_prefix_that_fits():
    q = reqs(50, 80, 10, kv_extra=10)  # kv 60, 90, 20; total free 100 -> R = [r0]
    assert high_token_threshold(q, np.array([100, 0]), np.array([50, 50]), 1.05) == \
        pytest.approx(1.05 * (50 + 100) / 2)


def test_de_prefers_engines_staying_under_z():
    t = table([100, 0], seqs=[1, 2], free=[1000, 1000])
    # Z = 1.05 * (50 + 100) / 2 = 78.75: d0 would reach 150 > Z, d1 50 <= Z
    assert schedule_decode_group(reqs(50, kv_extra=10), t, np.array([0, 1])) == [1]


def test_de_under_z_picks_fewest_requests_then_fewest_tokens():
    t = table([0, 10, 5], seqs=[3, 1, 1], free=[10**6] * 3)
    # Z = 1.05 * (1 + 1000 + 15) / 3 = 355.6: all three stay under it for r0
    assert schedule_decode_group(reqs(1, 1000), t, np.array([0, 1, 2]))[0] == 2  # seq 1, tok 5


def test_de_all_over_z_picks_fewest_tokens():
    t = table([500, 400], seqs=[0, 9], free=[10**6, 10**6])
    z = high_token_threshold(reqs(1000), t.tok, t.free_kv, 1.05)
    assert 400 + 1000 > z and 500 + 1000 > z
    assert schedule_decode_group(reqs(1000), t, np.array([0, 1])) == [1]


def test_de_stops_when_no_engine_has_room():
    t = table([0, 0], free=[100, 150])
    out = schedule_decode_group(reqs(120, 10, kv_extra=0), t, np.array([0, 1]))
    # r0 fits only on d1; r1 fits on both, Z = 1.05 * 130 / 2 = 68.25 keeps it off d1 (130)
    assert out == [1, 0]
    out = schedule_decode_group(reqs(200, 1), t, np.array([0, 1]))
    assert out == [], "head-of-queue request that fits nowhere ends the fetch"


def test_de_member_indices_map_back_to_the_table():
    t = table([0, 0, 0], free=[10, 10, 10])
    assert schedule_decode_group(reqs(5), t, np.array([2])) == [2]


# ---- read side ----
def test_shorter_side_and_tie():
    assert shorter_side(10, 5) == "de"
    assert shorter_side(5, 10) == "pe"
    assert shorter_side(7, 7) == "pe"


@pytest.mark.parametrize("hit,pq,dq,pr,dr,block,expected", [
    (1024, 0, 0, 1.0, 1.0, 64, (512, 512)),
    (1024, 0, 0, 3.0, 1.0, 64, (768, 256)),
    (1024, 10**6, 0, 1.0, 1.0, 64, (0, 1024)),
    (1024, 0, 10**6, 1.0, 1.0, 64, (1024, 0)),
    (1000, 0, 0, 1.0, 1.0, 64, (552, 448)),  # 960 in blocks: 512/448; 40-token tail on the PE
    (0, 5, 5, 1.0, 1.0, 64, (0, 0)),
])
def test_split_read_equalises_finish_times(hit, pq, dq, pr, dr, block, expected):
    pe, de = split_read(hit, pq, dq, pr, dr, block)
    assert (pe, de) == expected and pe + de == hit
