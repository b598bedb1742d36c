"""Any of SGLang's zero-copy L3 backends (hf3fs, mooncake, nixl, eic, simm, mori), wrapped in the
DualPath storage-NIC meter and cap (checked against SGLang 0.5.17).

Production keeps its distributed store; the scheduler still gets each node's read queue and
bytes, and a single host can still emulate per-node NIC caps:

    --enable-hierarchical-cache --hicache-mem-layout page_first
    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config
      '{"backend_name": "dualpath-metered", "module_path": "dualpath.sglang_plugin.metered_backend",
        "class_name": "MeteredStorage", "interface_v1": 1, "inner_backend": "hf3fs",
        "node": "node0", "snic_gbps": 25}'

The inner backend is built through SGLang's own `StorageBackendFactory` once the host pool is
known (SGLang builds a `dynamic` backend before it has the pool, while mooncake and hf3fs need
it at construction), with the same storage config (its extra_config minus our keys, plus
`inner_extra_config`). Every `batch_get_v1` / `batch_set_v1` is metered as one transfer of the
batch's page bytes (reads queue on the node's read queue while in flight); `batch_exists`
and everything else pass through unmetered (metadata).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Any

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from dualpath.sglang_plugin.agent import node_nic

log = logging.getLogger("dualpath.metered_backend")
OURS = {"backend_name", "module_path", "class_name", "inner_backend", "inner_extra_config",
        "node", "snic_gbps"}
ZERO_COPY = ("hf3fs", "mooncake", "eic", "nixl", "simm", "mori")


class MeteredStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None):
        extra = dict(storage_config.extra_config or {})
        self.inner_name = extra.get("inner_backend")
        if self.inner_name not in ZERO_COPY:
            raise ValueError(f"inner_backend must be one of SGLang's zero-copy backends "
                             f"{list(ZERO_COPY)}, got {self.inner_name!r}")
        self.node = extra.get("node") or socket.gethostname()
        cap = extra.get("snic_gbps")
        self.nic = node_nic(self.node, float(cap) if cap else None)
        inner_extra = {k: v for k, v in extra.items() if k not in OURS}
        inner_extra.update(extra.get("inner_extra_config") or {})
        self.inner_config = dataclasses.replace(storage_config, extra_config=inner_extra)
        self.inner: HiCacheStorage | None = None
        self.page_bytes = 0
        self.page_tokens = 0

    def register_mem_pool_host(self, mem_pool_host) -> None:
        from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

        self.inner = StorageBackendFactory.create_backend(self.inner_name, self.inner_config,
                                                          mem_pool_host)
        self.inner.register_mem_pool_host(mem_pool_host)
        self.mem_pool_host = mem_pool_host
        self.page_tokens = mem_pool_host.page_size
        self.page_bytes = mem_pool_host.get_size_per_token() * mem_pool_host.page_size
        log.info("metered %s backend: node %s, NIC cap %s GB/s, %d bytes per page",
                 self.inner_name, self.node, self.nic.cap_gbps or "none", self.page_bytes)

    def _metered(self, op: str, n_pages: int, call):
        nbytes, tokens = n_pages * self.page_bytes, n_pages * self.page_tokens
        if op == "read":
            self.nic.submit_read(nbytes, tokens)
        with self.nic.transfer(op, nbytes, tokens, queued=op == "read"):
            return call()

    def batch_get_v1(self, keys: list[str], host_indices, extra_info=None) -> list[bool]:
        return self._metered("read", len(keys),
                             lambda: self.inner.batch_get_v1(keys, host_indices, extra_info))

    def batch_set_v1(self, keys: list[str], host_indices, extra_info=None) -> list[bool]:
        return self._metered("write", len(keys),
                             lambda: self.inner.batch_set_v1(keys, host_indices, extra_info))

    def batch_exists(self, keys: list[str], extra_info=None) -> int:
        return self.inner.batch_exists(keys, extra_info)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def get(self, key, target_location=None, target_sizes=None):
        return self.inner.get(key, target_location, target_sizes)

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        return self.inner.batch_get(keys, target_locations, target_sizes)

    def set(self, key, value=None, target_location=None, target_sizes=None):
        return self.inner.set(key, value, target_location, target_sizes)

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None):
        return self.inner.batch_set(keys, values, target_locations, target_sizes)

    def clear(self) -> None:
        if self.inner is not None:
            self.inner.clear()

    def get_stats(self):
        return {"nic": dataclasses.asdict(self.nic.snapshot()),
                "inner": self.inner.get_stats() if self.inner is not None else None}
