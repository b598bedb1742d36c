"""HiCache's host -> GPU prefix load on our kernel (`--dualpath-h2d-kernel ours`).

SGLang 0.5.17 loads a prefix from its host pool one layer at a time, all layers queued on the
load stream when the load starts (`HiCacheController.start_loading`), each through
`MHATokenToKVPoolHost.load_to_device_per_layer`: with a page_first host pool, a strided gather
of each token's row. This runs the same move as `dualpath.ops.copy_kv` (host page_first ->
device pool, one layer), which measured 1.6-1.8x sgl_kernel's `transfer_kv_per_layer_pf_lf` on
an H100 (benchmark/results, session 14); a 0.5.17 server runs SGLang's JIT HiCache kernel here,
which bench_copy_kv now also times. Only for what both cover: an MHA pool, page_first host
layout, the "kernel" I/O backend, pages of more than one token (SGLang allocates whole pages,
so every page's tokens are consecutive on both sides), a pinned host pool and no draft pool
difference (the draft pool goes through the same hook with its own buffers). Anything else
runs SGLang's path. The layouts are built once per host pool; the page lists once per load
(all layers of a load get the same index tensors).
"""

from __future__ import annotations

import logging

log = logging.getLogger("dualpath.h2d_load")
LAYOUTS = "_dualpath_h2d_layouts"
PAGES = "_dualpath_h2d_pages"
PINNED = "_dualpath_h2d_pinned"
STATS = {"h2d_ours_calls": 0, "h2d_stock_calls": 0}


def _usable(host, device_pool, io_backend) -> bool:
    k, v = getattr(device_pool, "k_buffer", None), getattr(device_pool, "v_buffer", None)
    return (io_backend == "kernel" and getattr(host, "layout", None) == "page_first"
            and getattr(host, "page_size", 1) > 1
            and isinstance(k, list) and isinstance(v, list) and len(k) == len(v) > 0
            # [slots, heads, dim] per layer (not SGLang's page-major or HND variants)
            and all(t.dim() == 3 and t.stride(-1) == 1 for t in (k[0], v[0]))
            and getattr(host, "kv_buffer", None) is not None and host.kv_buffer.dim() == 5)


def _layouts(host, device_pool):
    """(host layout, device layout) of these pools, built once; None when our layouts cannot
    describe them (SGLang's path then, with a warning once)."""
    got = getattr(host, LAYOUTS, None)
    if got is None or got[0] is not device_pool:
        from dualpath.ops import layout as L

        try:
            src = L.host_page_first(host.kv_buffer, host.page_size)
            dst = L.device_pool(device_pool.k_buffer, device_pool.v_buffer, host.page_size)
            L.compatible(src, dst)
            got = (device_pool, src, dst)
        except ValueError as e:
            log.warning("HiCache loads stay on SGLang's kernel: %s", e)
            got = (device_pool, None, None)
        setattr(host, LAYOUTS, got)
    return (got[1], got[2]) if got[1] is not None else None


def _pages(host, host_indices, device_indices):
    """First-token indices -> page numbers, once per load (the same tensors for every layer)."""
    got = getattr(host, PAGES, None)
    if got is not None and got[0] is host_indices and got[1] is device_indices:
        return got[2], got[3]
    import torch

    ps = host.page_size
    src = (host_indices[::ps] // ps).to(torch.int64)
    dst = (device_indices[::ps] // ps).to(torch.int64)
    setattr(host, PAGES, (host_indices, device_indices, src, dst))
    return src, dst


def _reachable(host, host_indices) -> bool:
    """A GPU kernel reads the host pool in place only if it is pinned (or registered with
    CUDA); asked once per pool."""
    if not host_indices.is_cuda:
        return True  # a CPU copy (tests, the interpreter)
    got = getattr(host, PINNED, None)
    if got is None:
        got = bool(host.kv_buffer.is_pinned())
        setattr(host, PINNED, got)
        if not got:
            log.warning("host KV pool is not pinned: HiCache loads stay on SGLang's kernel")
    return got


def load_to_device_per_layer(original, host, device_pool, host_indices, device_indices,
                             layer_id, io_backend="kernel"):
    """AROUND MHATokenToKVPoolHost.load_to_device_per_layer (see the module docstring)."""
    layouts = None
    if (_usable(host, device_pool, io_backend) and len(host_indices) > 0
            and _reachable(host, host_indices)):
        layouts = _layouts(host, device_pool)
    if layouts is None:
        STATS["h2d_stock_calls"] += 1
        return original(host, device_pool, host_indices, device_indices, layer_id, io_backend)
    from dualpath.ops.kv_copy import copy_kv

    src, dst = layouts
    sp, dp = _pages(host, host_indices, device_indices)
    copy_kv(src, dst, sp, dp, src_layers=[layer_id], dst_layers=[layer_id])  # impl auto
    STATS["h2d_ours_calls"] += 1
    return None
