"""The vectorised policies agree with a literal transcription of the paper's pseudo-code on random
inputs, and keep its invariants (no engine over beta, FIFO prefix, room for the KV)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpath.scheduler import (
    EngineSpec,
    EngineTable,
    Request,
    schedule_decode_group,
    schedule_prefill,
)


def ref_algorithm1(lens, tok, node_of, read_q, alpha, beta):
    tok = list(tok)
    out = []
    for n in lens:
        c2 = [e for e in range(len(tok)) if read_q[node_of[e]] <= alpha and tok[e] <= beta]
        c3 = [e for e in range(len(tok)) if read_q[node_of[e]] > alpha and tok[e] <= beta]
        pool = c2 or c3
        if not pool:
            break
        e = min(pool, key=lambda i: (tok[i], i))
        tok[e] += n
        out.append(e)
    return out


def ref_de_phase2(lens, kvs, tok, seq, free, factor):
    tok, seq, free = list(tok), list(seq), list(free)
    room, len_r = sum(free), 0
    for n, kv in zip(lens, kvs, strict=True):
        if kv > room:
            break
        room -= kv
        len_r += n
    z = factor * (len_r + sum(tok)) / len(tok)
    out = []
    for n, kv in zip(lens, kvs, strict=True):
        fits = [e for e in range(len(tok)) if free[e] >= kv]
        if not fits:
            break
        low = [e for e in fits if tok[e] + n <= z]
        e = (min(low, key=lambda i: (seq[i], tok[i], i)) if low
             else min(fits, key=lambda i: (tok[i], i)))
        tok[e] += n
        seq[e] += 1
        free[e] -= kv
        out.append(e)
    return out


engines = st.integers(1, 12)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=engines, n_nodes=st.integers(1, 4))
def test_prefill_matches_reference(data, n, n_nodes):
    node_of = [data.draw(st.integers(0, n_nodes - 1)) for _ in range(n)]
    tok = data.draw(st.lists(st.integers(0, 20_000), min_size=n, max_size=n))
    read_q = data.draw(st.lists(st.integers(0, 5000), min_size=n_nodes, max_size=n_nodes))
    lens = data.draw(st.lists(st.integers(1, 8000), max_size=20))
    alpha = data.draw(st.integers(0, 5000))
    beta = data.draw(st.integers(0, 20_000))
    t = EngineTable.build([EngineSpec(f"e{i}", f"n{node_of[i]}", f"g{node_of[i]}")
                           for i in range(n)])
    # build() sorts node names; map our node ids to its indices
    read_q_t = np.array([read_q[int(name[1:])] for name in t.node_names], dtype=np.int64)
    t.tok[:] = tok
    got = schedule_prefill([Request(f"r{i}", x) for i, x in enumerate(lens)], t, read_q_t,
                           alpha, beta)
    assert got == ref_algorithm1(lens, tok, node_of, read_q, alpha, beta)
    cur = list(tok)  # invariants, checked independently of the reference
    for x, e in zip(lens, got, strict=False):
        assert cur[e] <= beta, "an engine over beta was chosen"
        cur[e] += x
    if len(got) < len(lens):
        assert all(c > beta for c in cur), "stopped although an engine was still under beta"


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=engines)
def test_decode_group_matches_reference(data, n):
    tok = data.draw(st.lists(st.integers(0, 20_000), min_size=n, max_size=n))
    seq = data.draw(st.lists(st.integers(0, 30), min_size=n, max_size=n))
    free = data.draw(st.lists(st.integers(0, 30_000), min_size=n, max_size=n))
    lens = data.draw(st.lists(st.integers(1, 8000), max_size=20))
    outs = data.draw(st.lists(st.integers(0, 2000), min_size=len(lens), max_size=len(lens)))
    t = EngineTable.build([EngineSpec(f"d{i}", f"n{i}", "g") for i in range(n)])
    t.tok[:], t.seq[:], t.free_kv[:] = tok, seq, free
    queue = [Request(f"r{i}", x, max_new_tokens=o) for i, (x, o) in enumerate(zip(lens, outs,
                                                                                 strict=True))]
    got = schedule_decode_group(queue, t, np.arange(n))
    assert got == ref_de_phase2(lens, [r.kv_tokens for r in queue], tok, seq, free, 1.05)
    room = list(free)
    for r, e in zip(queue, got, strict=False):
        assert room[e] >= r.kv_tokens, "a decode engine without room for the KV was chosen"
        room[e] -= r.kv_tokens
