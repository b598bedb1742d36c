"""The vectorised Mooncake sender (sglang_plugin/pd_send.py) hands our engine exactly the
descriptors stock SGLang 0.5.17 builds, in the same order, and leaves other cases to stock."""

import types

import numpy as np
import pytest

from dualpath.sglang_plugin import pd_send
from dualpath.sglang_plugin.pd_send import contiguous_runs, send_kvcache_arrays

conn = pytest.importorskip("sglang.srt.disaggregation.mooncake.conn")
common = pytest.importorskip("sglang.srt.disaggregation.common.conn")
STOCK = conn.MooncakeKVManager._send_kvcache_generic


class Recorder:
    def __init__(self, arrays):
        self.accepts_arrays = arrays
        self.calls = []

    def batch_transfer_sync(self, session, src, dst, lengths):
        self.calls.append((session, [int(x) for x in src], [int(x) for x in dst],
                           [int(x) for x in lengths]))
        return 0


def manager(arrays, mla=False, custom_pool=False, start_layer=0):
    m = types.SimpleNamespace(engine=Recorder(arrays), is_mla_backend=mla,
                              is_hybrid_mla_backend=False, enable_custom_mem_pool=custom_pool,
                              kv_args=types.SimpleNamespace(prefill_start_layer=start_layer))
    m.get_mha_kv_ptrs_with_pp = types.MethodType(common.CommonKVManager.get_mha_kv_ptrs_with_pp,
                                                 m)
    m._transfer_data = types.MethodType(conn.MooncakeKVManager._transfer_data, m)
    return m


def kv_args(layers, rng):
    src = [int(x) for x in rng.integers(1 << 30, 1 << 40, 2 * layers)]
    dst = [int(x) for x in rng.integers(1 << 30, 1 << 40, 2 * layers)]
    lens = [131072] * layers + [65536] * layers  # K and V rows may differ
    return src, dst, lens


def test_runs_equal_sglangs_groups():
    from sglang.srt.disaggregation.common.utils import group_concurrent_contiguous

    rng = np.random.default_rng(0)
    src = np.sort(rng.choice(4000, 300, replace=False)).astype(np.int32)
    dst = rng.permutation(4000)[:300].astype(np.int32)
    dst[50:120] = np.arange(900, 970)  # a long run on both sides where src also steps by 1
    src[50:120] = np.arange(2000, 2070)
    s0, d0, n = contiguous_runs(src.astype(np.int64), dst.astype(np.int64))
    gs, gd = group_concurrent_contiguous(src, dst)
    assert [g[0] for g in gs] == s0.tolist() and [g[0] for g in gd] == d0.tolist()
    assert [len(g) for g in gs] == n.tolist()


@pytest.mark.parametrize("scattered", [False, True])
def test_same_descriptors_as_stock(scattered):
    rng = np.random.default_rng(1)
    src_ptrs, dst_ptrs, lens = kv_args(4, rng)
    n = 97
    src = np.arange(10, 10 + n, dtype=np.int32)
    dst = (rng.permutation(500)[:n] if scattered else np.arange(300, 300 + n)).astype(np.int32)
    stock, ours = manager(False), manager(True)
    kw = {"mooncake_session_id": "peer:1", "src_data_ptrs": src_ptrs, "dst_data_ptrs": dst_ptrs,
          "item_lens": lens, "prefill_data_indices": src, "dst_data_indices": dst,
          "executor": None}
    assert STOCK(stock, **kw) == 0
    assert send_kvcache_arrays(STOCK, ours, **kw) == 0
    assert ours.engine.calls == stock.engine.calls
    assert len(ours.engine.calls[0][1]) == 8 * (n if scattered else 1)


def test_other_cases_go_to_stock():
    rng = np.random.default_rng(2)
    src_ptrs, dst_ptrs, lens = kv_args(2, rng)
    idx = np.arange(5, dtype=np.int32)
    calls = []

    def original(*args):
        calls.append(args)
        return 7

    for m in (manager(False), manager(True, mla=True), manager(True, custom_pool=True)):
        assert send_kvcache_arrays(original, m, "p", src_ptrs, dst_ptrs, lens, idx, idx,
                                   None) == 7
        assert m.engine.calls == []
    assert len(calls) == 3
    m = manager(True)  # empty request: nothing to send, like stock
    assert send_kvcache_arrays(original, m, "p", src_ptrs, dst_ptrs, lens, idx[:0], idx[:0],
                               None) == 0 and m.engine.calls == []


def test_the_sender_logs_its_time_from_the_last_chunk_queued_to_success(caplog):
    """add_transfer_request stamps a room's chunks; update_status(Success) logs the time since
    the last chunk was queued, once; a failed or unknown room logs nothing."""
    import logging
    import types

    from sglang.srt.disaggregation.base.conn import KVPoll

    mgr, queued, statuses = types.SimpleNamespace(), [], []
    add = lambda self, room, idx, sl, last, *a, **k: queued.append((room, last))  # noqa: E731
    upd = lambda self, room, status: statuses.append((room, status))  # noqa: E731
    pd_send.stamp_enqueue(add, mgr, 5, [1], slice(0, 1), False)
    pd_send.stamp_enqueue(add, mgr, 5, [2], slice(1, 2), True, aux_index=0)
    pd_send.stamp_enqueue(add, mgr, 6, [3], slice(0, 1), True, aux_index=1)
    assert queued == [(5, False), (5, True), (6, True)]
    with caplog.at_level(logging.INFO, logger="dualpath.pd_send"):
        pd_send.report_send(upd, mgr, 5, KVPoll.Transferring)
        pd_send.report_send(upd, mgr, 5, KVPoll.Success)
        pd_send.report_send(upd, mgr, 5, KVPoll.Success)  # once
        pd_send.report_send(upd, mgr, 6, KVPoll.Failed)
        pd_send.report_send(upd, mgr, 7, KVPoll.Success)  # never stamped (a decode's)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("pd send room 5: ")
    assert "from the last chunk queued to success" in lines[0]
    assert len(statuses) == 5 and not getattr(mgr, pd_send.STAMPS)


def test_the_sender_log_splits_wait_kv_send_and_after(caplog, monkeypatch):
    """The last chunk's KV send on the reporting thread splits the sender's time into the wait
    for the transfer thread, the send and what followed; a send from before the chunk was
    queued (an earlier request's) adds nothing."""
    import logging
    import types

    from sglang.srt.disaggregation.base.conn import KVPoll

    from dualpath.bench import pd_transfer

    clock = iter([10.0, 10.004, 10.010, 10.030]).__next__  # queued, send start/end, success
    monkeypatch.setattr(pd_send.time, "perf_counter", clock)
    mgr = types.SimpleNamespace(engine=types.SimpleNamespace(accepts_arrays=False))
    pd_send.stamp_enqueue(lambda *a, **k: None, mgr, 9, [1], slice(0, 1), True, aux_index=0)
    sent = []
    original = lambda *a: sent.append(a) or 0  # noqa: E731  (stock path: not vectorisable)
    idx = np.arange(2, dtype=np.int64)
    assert send_kvcache_arrays(original, mgr, "p", [1], [2], [8], idx, idx, None) == 0
    with caplog.at_level(logging.INFO, logger="dualpath.pd_send"):
        pd_send.report_send(lambda *a: None, mgr, 9, KVPoll.Success)
    line = caplog.records[-1].getMessage()
    assert line.endswith("; wait 4.00 ms, kv send 6.00 ms, after 20.00 ms"), line
    got = pd_transfer.engine_times([line])
    assert got == {"sender_ms": 30.0, "sender_wait_ms": 4.0, "sender_kv_ms": 6.0,
                   "sender_after_ms": 20.0}
    clock = iter([15.0, 15.1, 15.2]).__next__  # a state send (SWA etc.) is not the KV's
    monkeypatch.setattr(pd_send.time, "perf_counter", clock)
    pd_send.stamp_enqueue(lambda *a, **k: None, mgr, 11, [1], slice(0, 1), True, aux_index=0)
    send_kvcache_arrays(original, mgr, "p", [1], [2], [8], idx, idx, None, state_type="swa")
    with caplog.at_level(logging.INFO, logger="dualpath.pd_send"):
        pd_send.report_send(lambda *a: None, mgr, 11, KVPoll.Success)
    assert caplog.records[-1].getMessage().endswith("(200.00 ms from the first)")  # no split
    clock = iter([20.0, 20.5]).__next__  # the next room: this thread's send is older
    monkeypatch.setattr(pd_send.time, "perf_counter", clock)
    pd_send.stamp_enqueue(lambda *a, **k: None, mgr, 10, [1], slice(0, 1), True, aux_index=0)
    with caplog.at_level(logging.INFO, logger="dualpath.pd_send"):
        pd_send.report_send(lambda *a: None, mgr, 10, KVPoll.Success)
    assert caplog.records[-1].getMessage().endswith("(500.00 ms from the first)")
