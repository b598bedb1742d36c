"""Every change DualPath makes to SGLang's behaviour, registered through SGLang's HookRegistry.

Each hook names its target and the SGLang version it was checked against; test/sglang_plugin
asserts that every target exists (with the signature assumed here) in the pinned release. Servers
started by `python -m dualpath.launch_server` get LAUNCHER_HOOKS (flag on or off: the baseline
and DualPath differ only in the read path) and, unless --dualpath-prefetch-queue off,
PREFETCH_QUEUE_HOOKS; HOOKS only with --enable-dual-path. Other servers are left untouched.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from dualpath.sglang_plugin import (
    h2d_load,
    hicache_sync,
    page_indices,
    pd_poll,
    pd_send,
    prefetch_queue,
    write_wait,
)

log = logging.getLogger("dualpath.hooks")
_IO_ERRORS_LOCK = threading.Lock()
CHECKED_VERSION = "0.5.17"


@dataclass(frozen=True)
class Hook:
    target: str
    kind: str  # HookType name: BEFORE | AFTER | AROUND | REPLACE
    fn: Callable
    why: str
    checked: str = CHECKED_VERSION


# ---- the hook functions ----
def tag_prefetch_rid(original, self, operation, hash_values, host_indices, extra_info=None):
    """Hand the request id of a storage prefetch to the L3 backend, so that `batch_get_v1` can
    look up the request's read plan (stock passes only the page keys)."""
    if extra_info is not None:
        extra_info.extra_info = {**(extra_info.extra_info or {}), "rid": operation.request_id}
    return original(self, operation, hash_values, host_indices, extra_info)


def decode_prefix_by_plan(original, self, req, result):
    """On a decode, count the stored prefix as this decode's own (restored locally, so the prefill
    sends only the missed tokens' KV) only when the request's plan has the decode side read all
    of it; otherwise the prefill sends everything, as in stock PD."""
    match = original(self, req, result)
    from dualpath.sglang_plugin.agent import get_agent

    agent = get_agent()
    plan = agent.plans.get(req.rid) if agent is not None else None
    if match.l3_storage_hit_length > 0 and (plan is None or plan.side != "de"):
        match.l3_storage_hit_length = 0
        match.last_host_node = None
    return match


def parallel_prefetch_io(original, self):
    """SGLang 0.5.17 runs one prefetch IO thread per server, so one request's storage load at a
    time: with per-request read sides, at most one node's storage NIC is ever busy. Run the same
    loop on `prefetch_io_threads` threads over the same queue (operations are independent;
    each one's batches stay in order on its thread). Applied with the flag off too, so the
    baseline differs from DualPath only in the read path."""
    import threading

    from dualpath.sglang_plugin import launcher_config

    cfg = launcher_config()
    n = cfg.prefetch_io_threads if cfg is not None else 1
    for i in range(1, n):
        threading.Thread(target=original, args=(self,), daemon=True,
                         name=f"dualpath-prefetch-io-{i}").start()
    return original(self)


def guard_page_transfer(original, self, operation):
    """A storage prefetch that raises (anywhere in SGLang's batch loop, our hooks or a backend)
    ends as terminated: its request loads what arrived and recomputes the rest. Stock lets the
    exception kill the prefetch IO thread; under `wait_complete` the operation then never
    completes and its request, and every request whose prefetch that thread would have run,
    waits forever."""
    try:
        return original(self, operation)
    except Exception:
        log.exception("dualpath: storage prefetch for %s failed after %d tokens; the rest is "
                      "recomputed", getattr(operation, "request_id", "?"),
                      getattr(operation, "completed_tokens", 0))
        with _IO_ERRORS_LOCK:  # the prefetch IO threads, not the scheduler thread
            prefetch_queue.STATS["pf_io_errors"] += 1
        operation.mark_terminate()
        return None


def count_prefilled(result, self, req, *args, **kwargs):
    """AFTER RadixCache.cache_finished_req: a prefill engine finished a request (its KV is
    cached once sent); its prompt tokens feed the router's measured prefill rate. Only a
    request that finished well counts: SGLang also releases through here a transfer or
    bootstrap failure and an optimistic requeue (no finish reason yet) and an abort."""
    from dualpath.sglang_plugin.agent import get_agent

    reason = getattr(req, "finished_reason", None)
    if (reason is None or kwargs.get("is_insert", True) is False
            or any(c.__name__ == "FINISH_ABORT" for c in type(reason).__mro__)):
        return result
    agent = get_agent()
    if agent is not None and agent.role == "prefill":
        ids = getattr(req, "origin_input_ids", None)
        agent.count_prefilled(len(ids) if ids is not None else 0)
    return result


def count_h2d(result, self, host_indices, *args, **kwargs):
    """Meter the host -> GPU loads HiCache queues (restored prefixes), per node: the third path
    next to storage reads and DE -> PE forwards."""
    if result is not None:
        from dualpath.sglang_plugin.agent import get_agent

        agent = get_agent()
        if agent is not None:
            agent.count_h2d(len(host_indices) * self.mem_pool_host.get_size_per_token())
    return result


def start_stack_sampler(result, self, *args, **kwargs):
    """With --dualpath-stack-sample: sample this (the scheduler's) thread from now on."""
    from dualpath.sglang_plugin import launcher_config

    cfg = launcher_config()
    if cfg is not None and cfg.stack_sample:
        from dualpath.sglang_plugin.stack_sampler import start_for_current_thread

        start_for_current_thread(cfg.stack_sample, cfg.stack_sample_hz)
    return result


def start_gil_monitor(result, self, *args, **kwargs):
    """With --dualpath-gil-monitor: time this process's GIL hand-overs, watching this (the
    scheduler's) thread."""
    from dualpath.sglang_plugin import launcher_config

    cfg = launcher_config()
    if cfg is not None and cfg.gil_monitor:
        from dualpath.sglang_plugin.gil_monitor import start_for_current_thread

        start_for_current_thread()
    return result


def attach_scheduler(result, self, *args, **kwargs):
    """Let the agent read the scheduler's queues and free KV for the router's stats."""
    from dualpath.sglang_plugin.agent import attach_scheduler as attach

    attach(self)
    return result


def set_switch_interval(result, self, *args, **kwargs):
    """The scheduler process's GIL switch interval from the launcher's config (its storage-read
    and transfer threads wait up to this long for the GIL after each syscall)."""
    import sys

    from dualpath.sglang_plugin import launcher_config

    cfg = launcher_config()
    if cfg is not None:
        sys.setswitchinterval(cfg.switch_interval_ms / 1e3)
        log.info("dualpath: GIL switch interval %.2f ms", cfg.switch_interval_ms)
    return result


def add_http_routes(*args, **kwargs):
    """Serve GET /dualpath/stats on the server's own port (proxied to the agent), so the router
    needs only the server URL."""
    from dualpath.sglang_plugin.http_routes import install

    install()


# registered whenever the server was started by dualpath.launch_server (flag on or off)
LAUNCHER_HOOKS: tuple[Hook, ...] = (
    Hook("sglang.srt.managers.cache_controller.HiCacheController.prefetch_io_aux_func",
         "AROUND", parallel_prefetch_io, "several storage loads in flight, not one"),
    Hook("sglang.srt.managers.cache_controller.HiCacheController._page_get_zero_copy",
         "AROUND", tag_prefetch_rid, "the L3 backend learns which request a page read is for: "
         "its read plan (flag on), and its place in the node's read order (both arms)"),
    Hook("sglang.srt.managers.cache_controller.HiCacheController._page_transfer", "AROUND",
         guard_page_transfer, "a prefetch that raises is terminated, not its IO thread (a dead "
         "thread leaves wait_complete prefetches waiting forever)"),
    # the router schedules both arms from the same engine numbers (read only: queues, free KV,
    # prompt tokens finished); without them it keeps its own bookkeeping and initial rates
    Hook("sglang.srt.managers.scheduler.Scheduler.init_disaggregation", "AFTER",
         attach_scheduler, "engine stats (queues, free KV) for the router, flag on and off"),
    Hook("sglang.srt.managers.scheduler.Scheduler.init_disaggregation", "AFTER",
         set_switch_interval, "--dualpath-switch-interval-ms: storage-read threads win the "
         "GIL back from the scheduler thread sooner (both arms)"),
    Hook("sglang.srt.entrypoints.http_server.launch_server", "BEFORE", add_http_routes,
         "GET /dualpath/stats on the server port, flag on and off"),
    Hook("sglang.srt.mem_cache.radix_cache.RadixCache.cache_finished_req", "AFTER",
         count_prefilled, "prompt tokens a prefill finished: the router's measured prefill "
         "rate (beta), flag on and off"),
    Hook("sglang.srt.managers.cache_controller.HiCacheController.load", "AFTER", count_h2d,
         "H2D bytes per node (host pool -> GPU loads)"),
    Hook("sglang.srt.managers.scheduler.Scheduler.init_disaggregation", "AFTER",
         start_stack_sampler, "--dualpath-stack-sample: profile the scheduler thread (the "
         "thread that builds the scheduler runs its event loop)"),
    Hook("sglang.srt.managers.scheduler.Scheduler.init_disaggregation", "AFTER",
         start_gil_monitor, "--dualpath-gil-monitor: how long the server's threads wait for "
         "the GIL"),
    Hook("sglang.srt.mem_cache.hiradix_cache.HiRadixCache.init_load_back", "AROUND",
         prefetch_queue.count_load_back,
         "count host-pool hits the GPU had no room to load (recomputed instead)"),
    Hook("sglang.srt.mem_cache.hiradix_cache.HiRadixCache.write_backup", "AFTER",
         prefetch_queue.count_write_backup,
         "count write-through copies the host pool had no room for (not backed up to storage)"),
    Hook("sglang.srt.disaggregation.utils.poll_and_all_reduce", "AROUND",
         pd_poll.poll_and_all_reduce,
         "PD transfer polls without a one-rank gloo all_reduce (11% of the prefill's thread)"),
    Hook("sglang.srt.disaggregation.utils.poll_and_all_reduce_attn_cp_tp_group", "AROUND",
         pd_poll.poll_and_all_reduce_attn_cp_tp_group,
         "the same for the prefill's TP-then-CP poll"),
    Hook("sglang.srt.mem_cache.hiradix_cache.HiRadixCache._sync_hicache_ready_counts",
         "AROUND", hicache_sync.sync_ready_counts,
         "HiCache's per-pass ready counts without a tensor when one rank (6-8% of the prefill "
         "scheduler thread)"),
    Hook("sglang.srt.mem_cache.hiradix_cache.HiRadixCache.loading_check", "AROUND",
         hicache_sync.loading_check,
         "the decode's per-request load check without a tensor when one rank (9% of its "
         "thread with dual path on)"),
)

# registered with the launcher's --dualpath-prefetch-queue on (the default), flag on or off
_HRC = "sglang.srt.mem_cache.hiradix_cache.HiRadixCache."
PREFETCH_QUEUE_HOOKS: tuple[Hook, ...] = (
    Hook(_HRC + "prefetch_from_storage", "AROUND", prefetch_queue.prefetch,
         "a prefetch that finds the budget taken is queued, not dropped (stock recomputes)"),
    Hook(_HRC + "check_prefetch_progress", "AROUND", prefetch_queue.check,
         "a queued prefetch starts when the budget frees; its request waits for it"),
    Hook(_HRC + "release_aborted_request", "BEFORE", prefetch_queue.release,
         "an aborted request leaves the prefetch queue"),
    Hook(_HRC + "reset", "AFTER", prefetch_queue.reset,
         "a flushed cache forgets queued prefetches (their nodes are gone)"),
    Hook(_HRC + "check_hicache_events", "AFTER", prefetch_queue.after_events,
         "--dualpath-device-cache-tokens / --dualpath-host-cache-tokens: the prefill's GPU "
         "and host pools stage rather than cache (both arms)"),
    Hook(_HRC + "write_backup_storage", "AFTER", write_wait.noted_backup,
         "--dualpath-refetch-host-hits: which page hashes a storage write in flight holds (a "
         "refetch of them waits for it)"),
    Hook(_HRC + "evict", "AFTER", prefetch_queue.evicted,
         "tokens the GPU eviction freed (pf_gpu_evicted_tokens)"),
    Hook("sglang.srt.mem_cache.radix_cache.RadixCache.cache_unfinished_req", "AFTER",
         prefetch_queue.cached, "a request that ran releases the hold on its prefetched prefix"),
    Hook("sglang.srt.mem_cache.radix_cache.RadixCache.cache_finished_req", "AFTER",
         prefetch_queue.cached, "a request that ran releases the hold on its prefetched prefix"),
)

def pd_engine_class():
    from dualpath.transfer.mooncake_compat import DualPathPDEngine

    return DualPathPDEngine


# registered with the launcher's --dualpath-pd-engine
PD_ENGINE_HOOKS: tuple[Hook, ...] = (
    Hook("sglang.srt.distributed.device_communicators.mooncake_transfer_engine."
         "MooncakeTransferEngine", "REPLACE", pd_engine_class,
         "SGLang's Mooncake PD backend moves KV with our engine (CUDA IPC + cuda/tcp backends)"),
    Hook("sglang.srt.disaggregation.mooncake.conn.MooncakeKVManager._send_kvcache_generic",
         "AROUND", pd_send.send_kvcache_arrays,
         "a request's KV descriptors built with numpy and passed as arrays (stock: one Python "
         "tuple per layer and page run)"),
    Hook("sglang.srt.disaggregation.mooncake.conn.MooncakeKVManager.add_transfer_request",
         "AROUND", pd_send.stamp_enqueue, "when a request's chunks were queued for sending"),
    Hook("sglang.srt.disaggregation.mooncake.conn.MooncakeKVManager.update_status",
         "AROUND", pd_send.report_send,
         "log the sender's time from the last chunk queued to success (issue 3: where forward "
         "+ send goes beyond our engine's copy)"),
)

# registered only with --dualpath-h2d-kernel ours
H2D_HOOKS: tuple[Hook, ...] = (
    Hook("sglang.srt.mem_cache.pool_host.mha.MHATokenToKVPoolHost.load_to_device_per_layer",
         "AROUND", h2d_load.load_to_device_per_layer,
         "HiCache's one-layer host -> GPU load through dualpath.ops.copy_kv (page_first pools)"),
)

# registered only with --dualpath-async-page-indices (flag on or off)
_PMX = "sglang.srt.disaggregation.prefill.SchedulerDisaggregationPrefillMixin."
PAGE_INDEX_HOOKS: tuple[Hook, ...] = (
    Hook(_PMX + "process_batch_result_disagg_prefill", "AROUND",
         page_indices.in_result_processing,
         "marks result processing, after the batch's results (copy_done) were waited for"),
    Hook("sglang.srt.mem_cache.radix_cache.RadixCache.cache_unfinished_req", "AROUND",
         page_indices.cache_unfinished_req,
         "notes whether the request's row is rewritten with other pages (insert dedup)"),
    Hook("sglang.srt.mem_cache.radix_cache.RadixCache.insert", "AROUND", page_indices.insert,
         "the prefix length the insert found"),
    Hook("sglang.srt.mem_cache.hiradix_cache.HiRadixCache.insert", "AROUND",
         page_indices.insert, "the same for HiCache's insert"),
    Hook(_PMX + "send_kv_chunk", "AROUND", page_indices.send_kv_chunk,
         "marks a last chunk sent from result processing whose row is final"),
    Hook("sglang.srt.disaggregation.prefill.kv_to_page_indices", "AROUND",
         page_indices.kv_to_page_indices,
         "such a chunk's page indices copied on a side stream: no wait for the next forward"),
    Hook(_PMX + "maybe_send_cached_prefix_chunk", "AROUND", page_indices.early_send,
         "the early send of a cached prefix deferred until its side-stream index copy is done"),
    Hook(_PMX + "process_disagg_prefill_inflight_queue", "AFTER",
         page_indices.after_inflight_queue,
         "deferred early sends whose copies are done go out every loop iteration"),
)

# registered only with --enable-dual-path
HOOKS: tuple[Hook, ...] = (
    Hook("sglang.srt.disaggregation.decode_hicache_mixin.DecodeHiCachePreallocMixin."
         "_build_decode_prefix_match", "AROUND", decode_prefix_by_plan,
         "miss-only return only for requests whose plan reads on the decode side"),
)


def register_all(dual_path: bool = True, prefetch_queue_on: bool = True,
                 pd_engine: bool = False, h2d_ours: bool = False,
                 async_pages: bool = False) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hooks = (LAUNCHER_HOOKS + (PREFETCH_QUEUE_HOOKS if prefetch_queue_on else ())
             + (PD_ENGINE_HOOKS if pd_engine else ()) + (H2D_HOOKS if h2d_ours else ())
             + (PAGE_INDEX_HOOKS if async_pages else ())
             + (HOOKS if dual_path else ()))
    for h in hooks:
        # a REPLACE hook's fn returns the replacement class (imported only when registered)
        fn = h.fn() if h.kind == "REPLACE" else h.fn
        HookRegistry.register(h.target, fn, HookType[h.kind])
    log.info("dualpath: registered %d SGLang hooks (checked against %s)", len(hooks),
             CHECKED_VERSION)
