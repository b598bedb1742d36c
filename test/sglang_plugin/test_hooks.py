"""The plugin's hooks: every target exists in the pinned SGLang with the parameters the hook
assumes (needs SGLang importable: CI installs the wheel without its GPU dependencies), and the
hook functions do what they say on stand-in objects."""

import inspect
import pkgutil
from types import SimpleNamespace

import pytest

from dualpath.sglang_plugin import hooks
from dualpath.sglang_plugin.plan import PlanTable, ReadPlan

# parameters each target must take, in order (beyond self)
PARAMS = {
    "_page_get_zero_copy": ["self", "operation", "hash_values", "host_indices", "extra_info"],
    "_build_decode_prefix_match": ["self", "req", "result"],
    "init_disaggregation": ["self"],
    "prefetch_io_aux_func": ["self"],
    "load": ["self", "host_indices"],
    "_page_transfer": ["self", "operation"],
    "prefetch_from_storage": ["self", "req_id", "last_host_node", "new_input_tokens",
                              "last_hash", "prefix_keys"],
    "check_prefetch_progress": ["self", "req_id"],
    "check_hicache_events": ["self"],
    "add_transfer_request": ["self", "bootstrap_room", "kv_indices", "index_slice",
                             "is_last_chunk"],
    "update_status": ["self", "bootstrap_room", "status"],
    "write_backup_storage": ["self", "node", "backup_len"],
    "process_batch_result_disagg_prefill": ["self", "batch", "result"],
    "send_kv_chunk": ["self", "req", "last_chunk", "end_idx"],
    "kv_to_page_indices": ["kv_indices", "page_size"],
    "insert": ["self", "params"],
    "_sync_hicache_ready_counts": ["self"],
    "loading_check": ["self", "finish_count"],
    "release_aborted_request": ["self", "rid"],
    "reset": ["self"],
    "init_load_back": ["self", "params"],
    "cache_unfinished_req": ["self", "req"],
    "cache_finished_req": ["self", "req"],
    "load_to_device_per_layer": ["self", "device_pool", "host_indices", "device_indices",
                                 "layer_id", "io_backend"],
    "poll_and_all_reduce": ["pollers", "gloo_group", "decode_reqs", "metadata_buffers",
                            "server_args"],
    "poll_and_all_reduce_attn_cp_tp_group": ["pollers", "attn_cp_cpu_group",
                                             "attn_tp_cpu_group"],
    "_send_kvcache_generic": ["self", "mooncake_session_id", "src_data_ptrs", "dst_data_ptrs",
                              "item_lens", "prefill_data_indices", "dst_data_indices",
                              "executor", "state_type", "force_flat", "src_layer_ids",
                              "dst_layer_ids", "dst_device_data_indices",
                              "dst_device_data_ptrs"],
}
ALL_HOOKS = (hooks.LAUNCHER_HOOKS + hooks.PREFETCH_QUEUE_HOOKS + hooks.PD_ENGINE_HOOKS
             + hooks.H2D_HOOKS + hooks.PAGE_INDEX_HOOKS + hooks.HOOKS)


def test_every_hook_names_a_version_and_a_reason():
    assert hooks.HOOKS and hooks.LAUNCHER_HOOKS
    for h in ALL_HOOKS:
        assert h.checked == "0.5.17" and h.why
        assert h.kind in ("BEFORE", "AFTER", "AROUND", "REPLACE")


@pytest.mark.parametrize("hook", ALL_HOOKS, ids=lambda h: h.target.rsplit(".", 1)[-1])
def test_targets_exist_in_the_pinned_sglang(hook):
    sglang = pytest.importorskip("sglang")
    assert sglang.__version__ == hook.checked
    obj_path, attr = hook.target.rsplit(".", 1)
    obj = pkgutil.resolve_name(obj_path)
    fn = getattr(obj, attr)
    assert callable(fn)
    if attr in PARAMS:
        assert list(inspect.signature(fn).parameters)[:len(PARAMS[attr])] == PARAMS[attr]


def test_hicache_extra_info_has_a_dict_field():
    hs = pytest.importorskip("sglang.srt.mem_cache.hicache_storage")
    info = hs.HiCacheStorageExtraInfo(prefix_keys=None)
    info.extra_info = {"a": 1}  # tag_prefetch_rid writes this field
    assert info.extra_info == {"a": 1}


def test_tag_prefetch_rid_passes_the_request_id():
    seen = {}

    def original(self, op, hashes, idx, extra_info=None):
        seen.update(extra_info.extra_info)
        return "ok"

    info = SimpleNamespace(prefix_keys=None, extra_info={"keep": 1})
    out = hooks.tag_prefetch_rid(original, None, SimpleNamespace(request_id="r9"), [], [], info)
    assert out == "ok" and seen == {"keep": 1, "rid": "r9"}


@pytest.mark.parametrize("side,kept", [("de", True), ("split", False), ("pe", False),
                                       (None, False)])
def test_decode_keeps_its_storage_hit_only_for_de_plans(monkeypatch, side, kept):
    from dualpath.sglang_plugin import agent as agent_mod

    plans = PlanTable()
    if side is not None:
        frac = {"de": 1.0, "split": 0.5, "pe": 0.0}[side]
        plans.put(ReadPlan("r1", frac, de_agent="http://127.0.0.1:1"))
    monkeypatch.setattr(agent_mod, "_AGENT", SimpleNamespace(plans=plans))

    def original(self, req, result):
        return SimpleNamespace(l3_storage_hit_length=256, last_host_node="node")

    m = hooks.decode_prefix_by_plan(original, None, SimpleNamespace(rid="r1"), None)
    assert (m.l3_storage_hit_length, m.last_host_node) == ((256, "node") if kept else (0, None))


def test_load_registers_by_flag(monkeypatch):
    from dualpath import sglang_plugin

    monkeypatch.delenv("DUALPATH_PLUGIN_CONFIG", raising=False)
    called = []
    monkeypatch.setattr(hooks, "register_all",
                        lambda dual_path, prefetch_queue_on, pd_engine, h2d_ours, async_pages:
                        called.append((dual_path, prefetch_queue_on)))
    sglang_plugin.load()
    assert called == [], "not started by our launcher: SGLang stays untouched"
    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"enable_dual_path": false}')
    sglang_plugin.load()
    assert called == [(False, True)], "baseline: launcher hooks (+ prefetch queue) only"
    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"enable_dual_path": true, "role": "decode"}')
    sglang_plugin.load()
    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"prefetch_queue": false}')
    sglang_plugin.load()
    assert called == [(False, True), (True, True), (False, False)]
    got = []
    monkeypatch.setattr(hooks, "register_all", lambda **kw: got.append(kw["async_pages"]))
    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"async_page_indices": true}')
    sglang_plugin.load()
    assert got == [True]


def test_prefetch_io_runs_on_several_threads(monkeypatch):
    import threading
    import time

    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", '{"prefetch_io_threads": 3}')
    seen, lock = [], threading.Lock()

    def original(self):
        with lock:
            seen.append((self, threading.current_thread().name))
        time.sleep(0.05)

    hooks.parallel_prefetch_io(original, "ctl")
    time.sleep(0.1)
    assert len(seen) == 3 and {s for s, _ in seen} == {"ctl"}
    assert len({n for _, n in seen}) == 3


def test_h2d_loads_are_counted(monkeypatch):
    from dualpath.sglang_plugin import agent as agent_mod

    seen = []
    monkeypatch.setattr(agent_mod, "_AGENT", SimpleNamespace(count_h2d=seen.append))
    ctl = SimpleNamespace(mem_pool_host=SimpleNamespace(get_size_per_token=lambda: 1000))
    assert hooks.count_h2d("dev", ctl, [1, 2, 3]) == "dev"
    assert hooks.count_h2d(None, ctl, [1, 2, 3]) is None  # no device room: nothing loaded
    assert seen == [3000]


def test_pd_engine_replaces_mooncakes_class_with_the_same_surface():
    mte = pytest.importorskip(
        "sglang.srt.distributed.device_communicators.mooncake_transfer_engine")
    ours = hooks.pd_engine_class()
    stock = mte.MooncakeTransferEngine
    public = {n for n in vars(stock) if not n.startswith("_")}
    assert public <= {n for n in dir(ours) if not n.startswith("_")}, public - set(dir(ours))
    assert list(inspect.signature(ours.__init__).parameters)[:4] == list(
        inspect.signature(stock.__init__).parameters)[:4]
    for name in ("batch_transfer_sync", "transfer_sync", "batch_register", "register"):
        assert list(inspect.signature(getattr(ours, name)).parameters)[:2] == list(
            inspect.signature(getattr(stock, name)).parameters)[:2]


def test_a_prefetch_that_raises_is_terminated_not_its_io_thread():
    """SGLang's own _page_transfer with a page read that raises: the hook returns, the
    operation is terminated (so SGLang's can_terminate_prefetch lets the request go on with
    what arrived), the error is counted; the IO thread's loop would go on."""
    import threading

    ccm = pytest.importorskip("sglang.srt.managers.cache_controller")
    from dualpath.sglang_plugin import prefetch_queue

    op = ccm.PrefetchOperation("r1", list(range(256)))
    op.hash_value, op.host_indices = ["a", "b", "c", "d"], list(range(256))
    calls = []

    def page_get(operation, hashes, idx, extra_info):
        calls.append(hashes)
        if len(calls) == 2:
            raise OSError("disk gone")
        operation.increment(len(hashes) * 64)

    ctl = SimpleNamespace(page_size=64, has_draft=False, page_get_func=page_get)
    before = prefetch_queue.STATS["pf_io_errors"]
    orig = ccm.HiCacheController._page_transfer
    old_batch = ccm.STORAGE_BATCH_SIZE
    ccm.STORAGE_BATCH_SIZE = 2  # two batches: the second raises
    try:
        assert hooks.guard_page_transfer(orig, ctl, op) is None
    finally:
        ccm.STORAGE_BATCH_SIZE = old_batch
    assert op.is_terminated() and op.completed_tokens == 128 and len(calls) == 2
    assert prefetch_queue.STATS["pf_io_errors"] == before + 1
    assert threading.current_thread().is_alive()
    with pytest.raises(OSError):  # stock: the exception reaches the IO thread's loop
        op2 = ccm.PrefetchOperation("r2", list(range(128)))
        op2.hash_value, op2.host_indices = ["a", "b"], list(range(128))
        calls.clear()
        calls.append("first")
        orig(ctl, op2)


def test_busy_meter_counts_intervals_with_work_at_either_end():
    from dualpath.sglang_plugin.engine_stats import BusyMeter

    m = BusyMeter()
    assert m.observe(0, 10.0) == 0.0  # first look: nothing to count yet
    assert m.observe(0, 11.0) == 0.0  # idle throughout
    assert m.observe(3, 12.0) == 0.5  # work arrived in the interval: half of it
    assert m.observe(2, 13.0) == 1.5  # busy throughout
    assert m.observe(0, 14.0) == 2.0  # and left in this one
    assert m.observe(2, 12.0) == 2.0, "a clock going back counts nothing"


def test_finished_prefills_feed_the_routers_prefill_rate(monkeypatch):
    """count_prefilled adds a finished request's prompt tokens on a prefill's agent (not on a
    decode's); the agent reports them with its busy time in the router's contract."""
    from dualpath.config import PluginConfig
    from dualpath.router.contract import EngineStats
    from dualpath.sglang_plugin import agent as agent_mod

    pre = agent_mod.Agent(PluginConfig(), "prefill", "n0", 0)
    monkeypatch.setattr(agent_mod, "_AGENT", pre)
    ok = type("FINISH_LENGTH", (), {})()
    req = SimpleNamespace(origin_input_ids=list(range(700)), finished_reason=ok)
    assert hooks.count_prefilled("r", None, req) == "r"
    hooks.count_prefilled(None, None, req)
    # released but not finished well: a failed transfer or bootstrap or an optimistic requeue
    # (no reason yet), an abort, a release without insert
    hooks.count_prefilled(None, None, SimpleNamespace(origin_input_ids=[1] * 9,
                                                      finished_reason=None))
    aborted = SimpleNamespace(origin_input_ids=[1] * 9,
                              finished_reason=type("FINISH_ABORT", (), {})())
    hooks.count_prefilled(None, None, aborted)
    hooks.count_prefilled(None, None, req, is_insert=False)
    s = EngineStats.decode(pre.stats())
    assert s.prefill_tokens_total == 1400 and s.prefill_busy_s_total == 0.0
    dec = agent_mod.Agent(PluginConfig(), "decode", "n1", 0)
    monkeypatch.setattr(agent_mod, "_AGENT", dec)
    hooks.count_prefilled(None, None, req)
    assert dec.prefilled_tokens == 0 and EngineStats.decode(dec.stats()).prefill_tokens_total == 0


def test_both_arms_give_the_router_the_same_engine_numbers(monkeypatch):
    """register_all without the flag registers what the router's scheduler reads (the stats
    route, the scheduler attach, finished prefill tokens) and what keeps the comparison fair
    (PD polls, the prefetch guard); only the read path's hooks need the flag."""
    hr = pytest.importorskip("sglang.srt.plugins.hook_registry")
    got = []
    monkeypatch.setattr(hr.HookRegistry, "register",
                        classmethod(lambda cls, target, fn, kind: got.append(target)))
    hooks.register_all(dual_path=False, prefetch_queue_on=True)
    off = set(got)
    got.clear()
    hooks.register_all(dual_path=True, prefetch_queue_on=True)
    on = set(got)
    for t in ("sglang.srt.entrypoints.http_server.launch_server",
              "sglang.srt.managers.scheduler.Scheduler.init_disaggregation",
              "sglang.srt.mem_cache.radix_cache.RadixCache.cache_finished_req",
              "sglang.srt.disaggregation.utils.poll_and_all_reduce",
              "sglang.srt.managers.cache_controller.HiCacheController._page_transfer",
              # the request id reaches the storage backend: both arms read oldest request first
              "sglang.srt.managers.cache_controller.HiCacheController._page_get_zero_copy"):
        assert t in off and t in on, t
    assert on - off == {h.target for h in hooks.HOOKS} - off
    assert ("sglang.srt.disaggregation.decode_hicache_mixin.DecodeHiCachePreallocMixin."
            "_build_decode_prefix_match") in on - off


def test_both_arms_set_the_gil_switch_interval(monkeypatch):
    """A launcher-started server sets its GIL switch interval from the config (flag on or
    off: a launcher hook); a process without the launcher's config keeps Python's."""
    import sys

    from dualpath.config import PluginConfig

    before = sys.getswitchinterval()
    try:
        monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", PluginConfig(switch_interval_ms=0.3).to_json())
        assert hooks.set_switch_interval("r", None) == "r"
        assert sys.getswitchinterval() == pytest.approx(0.0003)
        sys.setswitchinterval(before)
        monkeypatch.delenv("DUALPATH_PLUGIN_CONFIG")
        hooks.set_switch_interval(None, None)
        assert sys.getswitchinterval() == pytest.approx(before)
    finally:
        sys.setswitchinterval(before)
    assert any(h.fn is hooks.set_switch_interval for h in hooks.LAUNCHER_HOOKS)
