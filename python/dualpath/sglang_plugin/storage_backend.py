"""SGLang HiCache L3 backend on the DualPath block store (checked against SGLang 0.5.17).

Use it with a stock server:

    --enable-hierarchical-cache --hicache-mem-layout page_first
    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config
      '{"backend_name": "dualpath", "module_path": "dualpath.sglang_plugin.storage_backend",
        "class_name": "DualPathStorage", "interface_v1": 1,
        "root": "/dev/shm/dualpath-kv", "node": "node0", "snic_gbps": 25}'

Lifecycle (SGLang's HiCacheController, in each scheduler process, one instance per TP rank):
`DualPathStorage(storage_config, kwargs)` at start, then `register_mem_pool_host(pool)` (where the
store is opened: the geometry is only known from the host pool, and an incompatible store
directory stops the server here with StoreMismatch), then from SGLang's prefetch / backup
threads `batch_exists`, `batch_get_v1`, `batch_set_v1` (zero-copy: host-pool page addresses).
Each TP rank uses its own subdirectory, so servers with the same model and TP split share
blocks (prefill, decode, later turns) and anything else is refused.

With the dual path on (`python -m dualpath.launch_server --enable-dual-path`, which sets
DUALPATH_PLUGIN_CONFIG) the backend also starts the process's agent and serves the two read
paths: on a prefill, pages whose plan gives them to the decode side are pulled from the decode's
agent (`dualpath.sglang_plugin.de_path`); on a decode, the pages of its own prefix restore come
from the DE buffer the agent filled while forwarding (one storage read for both uses).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from dualpath import env
from dualpath.config import PluginConfig
from dualpath.sglang_plugin import de_path
from dualpath.sglang_plugin.agent import ensure_agent, node_nic
from dualpath.storage import BlockGeometry, BlockStore, fingerprint
from dualpath.storage.page_first import PageFirstAdapter

log = logging.getLogger("dualpath.storage_backend")
DEFAULT_ROOT = "/dev/shm/dualpath-kv"


class DualPathStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None):
        self.config = storage_config
        extra = dict(storage_config.extra_config or {})
        self.root = extra.get("root", DEFAULT_ROOT)
        self.node = extra.get("node") or socket.gethostname()
        cap = extra.get("snic_gbps")
        self.nic = node_nic(self.node, float(cap) if cap else None)
        raw = env.PLUGIN_CONFIG.get()
        self.plugin = PluginConfig.from_json(raw) if raw else None
        self.agent = None
        self.io_threads = int(extra.get("io_threads", 8))
        self.capacity_bytes = int(float(extra.get("capacity_gb", 0)) * 2**30)
        self.oracle = bool(extra.get("oracle", False))  # benchmark ceiling: reads skipped
        if self.oracle:
            log.warning("dualpath storage: ORACLE mode: stored pages are reported loaded "
                        "without reading them; outputs are meaningless (timing ceiling only)")
        self.store: BlockStore | None = None
        self.adapter: PageFirstAdapter | None = None
        self.mem_pool_host = None
        if storage_config.is_mla_model:
            raise NotImplementedError("the dualpath storage backend supports MHA models only")

    def register_mem_pool_host(self, mem_pool_host) -> None:
        layout = getattr(mem_pool_host, "layout", None)
        if layout != "page_first":
            raise ValueError(f"the dualpath storage backend needs --hicache-mem-layout "
                             f"page_first (the host pool is {layout!r})")
        p, c = mem_pool_host, self.config
        g = BlockGeometry(num_layers=p.layer_num, page_size=p.page_size,
                          num_kv_heads=p.head_num, head_dim=p.head_dim,
                          dtype_bytes=p.dtype.itemsize)
        split = {"tp_rank": c.tp_rank, "tp_size": c.tp_size, "pp_rank": c.pp_rank,
                 "pp_size": c.pp_size, "dtype": str(p.dtype)}
        root = os.path.join(self.root, f"tp{c.tp_rank}of{c.tp_size}_pp{c.pp_rank}of{c.pp_size}")
        self.store = BlockStore(root, g, fingerprint(c.model_name or "", g, **split),
                                description={"model": c.model_name or "", **split},
                                capacity_bytes=self.capacity_bytes,
                                io_threads=self.io_threads, nic=self.nic)
        self.adapter = PageFirstAdapter(self.store, io_threads=self.io_threads)
        self.mem_pool_host = mem_pool_host
        single = c.tp_size == 1 and c.pp_size == 1
        if self.plugin is not None and self.plugin.enable_dual_path and not single:
            raise NotImplementedError("the dual path supports TP=1, PP=1 servers for now")
        if self.plugin is not None and single:  # launched by dualpath.launch_server: the
            # agent serves stats (and, with the dual path on, plans and pulls)
            self.agent = ensure_agent(self.plugin, self.plugin.role, self.node,
                                      self.plugin.agent_port)
            self.agent.attach_store(self.adapter)
        log.info("dualpath storage: %s (node %s, NIC cap %s GB/s, geometry %s)", root, self.node,
                 self.nic.cap_gbps or "none", g)

    # ---- the zero-copy interface SGLang uses with interface_v1 ----
    def _pages(self, host_indices) -> tuple[list[int], list[int]]:
        ptrs, _ = self.mem_pool_host.get_page_buffer_meta(host_indices)
        return ptrs[0::2], ptrs[1::2]  # K, V address of each page

    def batch_exists(self, keys: list[str], extra_info=None) -> int:
        return self.store.exists_prefix(keys)

    def batch_get_v1(self, keys: list[str], host_indices, extra_info=None) -> list[bool]:
        # SGLang calls this from its one prefetch IO thread, which dies on an exception and
        # leaves every later prefetch waiting: a failure here is a miss, logged, never raised
        try:
            return self._get_v1(keys, host_indices, extra_info)
        except Exception:
            log.exception("dualpath storage: reading %d pages failed; treated as misses",
                          len(keys))
            return [False] * len(keys)

    def _get_v1(self, keys: list[str], host_indices, extra_info) -> list[bool]:
        if self.oracle:
            return [True] * len(keys)
        k_ptrs, v_ptrs = self._pages(host_indices)
        # the request (hooks.tag_prefetch_rid): its reads go in the order requests first asked
        rid = ((extra_info.extra_info or {}).get("rid") if extra_info is not None
               and getattr(extra_info, "extra_info", None) else None)
        # read plans are DualPath's (flag off: the prefill always reads, whatever arrives)
        plan = (self.agent.plans.get(rid) if self.agent is not None and self.plugin is not None
                and self.plugin.enable_dual_path else None)
        if plan is None or plan.de_fraction <= 0:
            return self.adapter.get_pages(keys, k_ptrs, v_ptrs, rid)
        if self.agent.role == "prefill":
            return de_path.prefill_get(self.agent, self.adapter, self.mem_pool_host, plan,
                                       keys, k_ptrs, v_ptrs)
        return de_path.decode_restore(self.agent, self.adapter, keys, k_ptrs, v_ptrs, plan.rid)

    def batch_set_v1(self, keys: list[str], host_indices, extra_info=None) -> list[bool]:
        # SGLang's backup thread calls this and dies on an exception (0.5.17 catches only
        # queue.Empty there): no later backup would be done or acknowledged. A failure is a
        # page not stored, logged; SGLang then stops that request's backup at the batch
        try:
            return self.adapter.set_pages(keys, *self._pages(host_indices))
        except Exception:
            log.exception("dualpath storage: storing %d pages failed; reported not stored",
                          len(keys))
            return [False] * len(keys)

    def exists(self, key: str) -> bool:
        return self.store.exists_prefix([key]) == 1

    # ---- the copy-based interface: not used with interface_v1 ----
    def _v1_only(self, *args, **kwargs):
        raise NotImplementedError("the dualpath backend serves the zero-copy interface: pass "
                                  '"interface_v1": 1 in --hicache-storage-backend-extra-config')

    get = batch_get = set = batch_set = _v1_only

    def clear(self) -> None:
        log.warning("dualpath storage: clear() leaves %s as it is; remove the directory to "
                    "drop stored KV", self.root)

    def get_stats(self):
        return self.nic.snapshot()
