"""Stand-ins for SGLang 0.5.17's HiRadixCache and HiCacheController that the prefetch-queue
tests drive through the plugin's hooks (a real HiRadixCache needs GPU memory pools). Imported by
test_prefetch_queue.py and test_refetch.py; needs SGLang importable, as CI installs it."""

import types

import pytest

hrc = pytest.importorskip("sglang.srt.mem_cache.hiradix_cache")
ccm = pytest.importorskip("sglang.srt.managers.cache_controller")
from sglang.srt.mem_cache.utils import get_hash_str  # noqa: E402

from dualpath.sglang_plugin import prefetch_queue as pq  # noqa: E402

PAGE = 64
HRC, HCC = hrc.HiRadixCache, ccm.HiCacheController


class Node:
    def __init__(self):
        self.key = types.SimpleNamespace(extra_key=None)
        self.protected = 0

    def protect_host(self):
        self.protected += 1

    def release_host(self):
        self.protected -= 1


class Storage:
    def __init__(self, keys=()):
        self.keys, self.asked = set(keys), []

    def batch_exists(self, keys, extra_info=None):
        self.asked.append(list(keys))
        n = 0
        for k in keys:
            if k not in self.keys:
                break
            n += 1
        return n


def make_cache(stored_tokens=None, capacity=1000):
    cc = types.SimpleNamespace(prefetch_tokens_occupied=0, prefetch_capacity_limit=capacity,
                               page_size=PAGE, get_hash_str=get_hash_str, started=[])
    cc.prefetch_rate_limited = types.MethodType(HCC.prefetch_rate_limited, cc)

    def prefetch(req_id, key, last_hash, prefix_keys):
        cc.started.append((req_id, len(key)))
        return types.SimpleNamespace(request_id=req_id)
    cc.prefetch = prefetch
    keys = get_hash_str(list(stored_tokens), None, page_size=PAGE) if stored_tokens else ()
    cc.storage_backend = Storage(keys)
    cache = types.SimpleNamespace(
        enable_storage=True, page_size=PAGE, prefetch_threshold=PAGE, is_eagle=False,
        cache_controller=cc, ongoing_prefetch={}, prefetch_loaded_tokens_by_reqid={},
        _get_extra_pools=lambda: {}, can_terminate_prefetch=lambda op: False)

    # the hooked methods, as HookRegistry installs them (AROUND the real functions)
    cache.prefetch_from_storage = lambda *a: pq.prefetch(
        lambda c, *b: HRC.prefetch_from_storage(c, *b), cache, *a)
    cache.check = lambda rid: pq.check(HRC.check_prefetch_progress, cache, rid)
    return cache


def _real_tree(cache):
    """Give a stand-in cache SGLang's own host-tree methods (insert, split, evict_host) and an
    empty tree; returns (root, freed: sizes evict_host freed)."""
    import torch
    from sglang.srt.mem_cache.evict_policy import LRUStrategy
    from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode

    for name in ("_insert_helper_host", "_split_node", "_update_host_leaf_status",
                 "_update_leaf_status", "evict_host"):
        setattr(cache, name, types.MethodType(getattr(HRC, name), cache))
    cache._record_store_event = cache._record_remove_event = lambda *a, **k: None
    cache._replace_pending_write_through_node = lambda *a, **k: None
    cache.evictable_host_leaves, cache.evictable_leaves = set(), set()
    cache.eviction_strategy = LRUStrategy()
    freed = []
    cache.cache_controller.evict_host = lambda hv: freed.append(len(hv)) or len(hv)
    root = TreeNode()
    root.key, root.value = RadixKey([]), torch.zeros(0)
    cache.root_node = root
    return root, freed


def _reread_config(cache):
    for k in [k for k in vars(cache) if k.startswith("_dualpath")]:
        delattr(cache, k)
