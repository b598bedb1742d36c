"""Move pages between SGLang's `page_first` host KV pool and layer-major Full Blocks.

In SGLang's page_first host pool ([2, slots, layers, heads, dim]) a page is two regions (K and
V), each ``page_size x num_layers x row_bytes`` bytes, token-major. A Full Block is layer-major:
for each layer, K then V, each ``page_size x row_bytes``. Pages are addressed by the raw host
addresses SGLang hands out (`get_page_buffer_meta`), so this module needs no SGLang import and
is tested on its own; `dualpath.sglang_plugin.storage_backend` wires it into HiCache.

Reads land in a per-thread staging block, are verified there (checksum), and only then are
transposed into the page: a damaged block never reaches the pool. The native reader
(`dualpath._C.read_blocks_page_first`, default; env DUALPATH_NATIVE_IO=0 for this module's
Python one) does the same for a share of a batch (up to SHARE_PAGES pages) in one call
without the GIL: the SGLang scheduler thread of the same process then wins the GIL back once per
share, not ~7 times per 8 MiB block. Writes likewise (`_C.write_page_block`: BlockStore.put's
claim, checks, gather, checksum, temp file and rename in one call per block, ~15 hand-overs
before).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dualpath import env
from dualpath.storage.block_file import (
    DIGEST_OFFSET,
    FIXED_BYTES,
    HEADER_BYTES,
    RESERVED_OFFSET,
    encode_header,
)
from dualpath.storage.nic import BatchTransfer
from dualpath.storage.ordered_pool import OrderedPool
from dualpath.storage.store import CLAIM_STALE_S, BlockStore

log = logging.getLogger(__name__)
ORDER_KEPT = 4096  # requests whose read order a node remembers
SHARE_PAGES = 4  # pages per native read call at most (32 MiB for an 8B-shaped model at page 64)
OK, MISS, INVALID, IO_ERROR = 0, 1, 2, 3  # _C.read_blocks_page_first's statuses
WRITTEN, EXISTS, CLAIMED, WRITE_ERROR = 0, 1, 2, 3  # _C.write_page_block's


def native_reader():
    """`dualpath._C.read_blocks_page_first`, or None where the module lacks it."""
    return _native("read_blocks_page_first")


def native_writer():
    """`dualpath._C.write_page_block`, or None where the module lacks it."""
    return _native("write_page_block")


def _native(name: str):
    try:
        from dualpath import _C
    except ImportError:
        return None
    return getattr(_C, name, None)


def host_view(addr: int, nbytes: int) -> np.ndarray:
    """A uint8 numpy view of `nbytes` of host memory at `addr` (no copy)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(addr))


class PageFirstAdapter:
    def __init__(self, store: BlockStore, io_threads: int = 8, native: bool | None = None):
        """native: None = the native reader and writer where built, unless
        DUALPATH_NATIVE_IO=0; True requires them; False = the Python ones."""
        g = store.geometry
        if g.kv_parts != 2:
            raise ValueError("page_first pages of MLA models are not supported yet")
        self.store = store
        self.g = g
        self.row_bytes = g.part_bytes // g.page_size  # one token of one layer's K (or V)
        self.region_bytes = g.num_layers * g.part_bytes  # a page's K (or V) region
        self._local = threading.local()
        self._io_threads = io_threads
        self._native = native_reader() if native is not False else None
        self._native_write = native_writer() if native is not False else None
        if native and (self._native is None or self._native_write is None):
            raise RuntimeError("the native block I/O is not in this build of dualpath._C")
        if native is None and not env.NATIVE_IO.get():
            self._native = self._native_write = None
        # reads: oldest request first (ordered_pool.py says why), in the order each request
        # first asked this node for pages; a read without a request id queues as a new one
        self._pool = OrderedPool(io_threads, "dualpath-pagefirst")
        self._order: OrderedDict = OrderedDict()
        self._order_lock = threading.Lock()
        self._order_seq = itertools.count()
        # writes have threads of their own: a NIC's two directions are independent, and in one
        # shared FIFO pool SGLang's storage backups queued behind the prefetch reads, which hold
        # their threads for the read's line-rate time (2x H100, 25ccd4e: the backup thread was
        # 95% busy and a write finished ~2.9 s after its turn, so the next turn found it unstored)
        self._write_pool = ThreadPoolExecutor(io_threads,
                                              thread_name_prefix="dualpath-pagefirst-write")
        self.write_errors = 0  # pages whose write raised (set_pages: False, not an exception)
        self._write_error_logged: dict[int | None, float] = {}
        self._write_error_lock = threading.Lock()

    def _staging(self) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = np.empty(self.g.payload_bytes, dtype=np.uint8)
        return buf

    def _regions(self, k_ptr: int, v_ptr: int) -> tuple[np.ndarray, np.ndarray]:
        g = self.g
        shape = (g.page_size, g.num_layers, self.row_bytes)  # token-major rows
        return (host_view(k_ptr, self.region_bytes).reshape(shape),
                host_view(v_ptr, self.region_bytes).reshape(shape))

    def _block_view(self, buf: np.ndarray) -> np.ndarray:
        g = self.g
        return buf.reshape(g.num_layers, 2, g.page_size, self.row_bytes)

    def _get_one(self, key: str, k_ptr: int, v_ptr: int, queued: bool = False) -> bool:
        buf = self._staging()
        if not self.store.get_into(key, buf, _queued=queued):
            return False
        block = self._block_view(buf)
        k, v = self._regions(k_ptr, v_ptr)
        k[...] = block[:, 0].transpose(1, 0, 2)
        v[...] = block[:, 1].transpose(1, 0, 2)
        return True

    def _set_one(self, key: str, k_ptr: int, v_ptr: int) -> bool:
        if self._native_write is not None:
            return self._set_native(key, k_ptr, v_ptr)
        if self.store.exists_prefix([key]):
            return True
        buf = self._staging()
        block = self._block_view(buf)
        k, v = self._regions(k_ptr, v_ptr)
        block[:, 0] = k.transpose(1, 0, 2)
        block[:, 1] = v.transpose(1, 0, 2)
        self.store.put(key, buf)
        return True

    def _set_native(self, key: str, k_ptr: int, v_ptr: int) -> bool:
        """`_set_one` in one native call (GIL released); an I/O error raises OSError as
        BlockStore.put does, leaving no temp file or claim."""
        store, g = self.store, self.g
        path = store.path(key)
        header = encode_header(key, store.fp, g, g.payload_bytes, 0)
        status, err, started = self._native_write(
            path, header, k_ptr, v_ptr, g.num_layers, g.page_size, self.row_bytes, HEADER_BYTES,
            DIGEST_OFFSET, CLAIM_STALE_S)
        if status == WRITE_ERROR:
            raise OSError(err, f"storing block {key}: {os.strerror(err)}", path)
        if status == WRITTEN:
            store.wrote(started_at=started)
        return True

    def read_order(self, rid: str | None) -> int:
        """This node's rank of a request: when it first asked for pages (None: now)."""
        with self._order_lock:
            if rid is None:
                return next(self._order_seq)
            got = self._order.get(rid)
            if got is None:
                got = self._order[rid] = next(self._order_seq)
                while len(self._order) > ORDER_KEPT:  # long gone: oldest first
                    self._order.popitem(last=False)
            return got

    def get_pages(self, keys: Sequence[str], k_ptrs: Sequence[int],
                  v_ptrs: Sequence[int], rid: str | None = None) -> list[bool]:
        """Fill each page (K at k_ptrs[i], V at v_ptrs[i]) from its block; False = miss. The
        reads of the request that first asked this node (`rid`) go before those of later
        requests still queued."""
        self._check(keys, k_ptrs, v_ptrs)
        order = self.read_order(rid)
        for k in keys:
            self.store.path(k)  # validate every key before anything is queued
        nic = self.store.nic
        if nic is not None:  # the reads queue on the node's storage NIC from now on
            for _ in keys:
                nic.submit_read(self.store.block_bytes, self.g.page_size)
        def unread(n: int) -> None:  # cancelled after an error: never leaves the queue else
            if nic is not None:
                nic._retire_read(n * self.store.block_bytes, n * self.g.page_size)
        if self._native is None:
            return self._pool.map(order, self._get_one, keys, k_ptrs, v_ptrs,
                                  [nic is not None] * len(keys),
                                  on_cancel=lambda *_: unread(1))
        n = len(keys)
        # small contiguous shares: a share reserves its blocks' line-rate time on the NIC when
        # it starts, so the pool's threads commit at most io_threads x SHARE_PAGES blocks ahead,
        # and an older request's next batch overtakes a newer one's within that much
        step = max(1, min(SHARE_PAGES, -(-n // self._io_threads)))
        shares = [range(i, min(i + step, n)) for i in range(0, n, step)]
        got = [False] * n
        for share, ok in zip(shares, self._pool.map(
                order, lambda r: self._get_native([keys[i] for i in r], [k_ptrs[i] for i in r],
                                                  [v_ptrs[i] for i in r]), shares,
                on_cancel=lambda r: unread(len(r))), strict=True):
            for i, hit in zip(share, ok, strict=True):
                got[i] = hit
        return got

    def _get_native(self, keys: list[str], k_ptrs: list[int], v_ptrs: list[int]) -> list[bool]:
        """A share of a batch in one native call (GIL released throughout). A block
        the native check rejects is read again by the Python reader, which says why in the log
        and removes it (or, should the native check be the stricter, uses it)."""
        store, g = self.store, self.g
        paths = [store.path(k) for k in keys]
        headers = b"".join(encode_header(k, store.fp, g, g.payload_bytes, 0) for k in keys)
        nic = store.nic
        with (nic.transfers("read", len(keys), store.block_bytes, g.page_size, queued=True)
              if nic is not None else contextlib.nullcontext(BatchTransfer(len(keys)))) as batch:
            status, errnos = self._native(
                paths, headers, k_ptrs, v_ptrs, batch.ends or [], g.num_layers, g.page_size,
                self.row_bytes, HEADER_BYTES, DIGEST_OFFSET, RESERVED_OFFSET, FIXED_BYTES)
            batch.ok = status.count(OK)
        out = []
        for key, path, kp, vp, st, err in zip(keys, paths, k_ptrs, v_ptrs, status, errnos,
                                              strict=True):
            if st == INVALID:
                out.append(self._get_one(key, kp, vp))
                continue
            if st == IO_ERROR:
                log.warning("block %s unreadable, treated as a miss: %s", key, os.strerror(err))
            elif st == OK and store.capacity_bytes:
                try:
                    os.utime(path)  # recency for the LRU evictor, as BlockStore.get_into
                except OSError:
                    pass
            out.append(st == OK)
        return out

    def set_pages(self, keys: Sequence[str], k_ptrs: Sequence[int],
                  v_ptrs: Sequence[int]) -> list[bool]:
        """Store each page as a Full Block (already stored keys are skipped). A page whose
        write fails (a full or read-only store: ENOSPC, EROFS, EIO) is False, logged at most
        once a minute per error; the others are still written."""
        self._check(keys, k_ptrs, v_ptrs)
        return list(self._write_pool.map(self._set_or_fail, keys, k_ptrs, v_ptrs))

    def _set_or_fail(self, key: str, k_ptr: int, v_ptr: int) -> bool:
        try:
            return self._set_one(key, k_ptr, v_ptr)
        except OSError as e:
            now = time.monotonic()
            with self._write_error_lock:  # the write pool's threads fail together
                self.write_errors += 1
                say = now - self._write_error_logged.get(e.errno, -60.0) >= 60.0
                if say:
                    self._write_error_logged[e.errno] = now
            if say:
                log.error("storing blocks in %s fails (%s; %d failed so far): those pages are "
                          "not stored, later turns recompute them", self.store.root, e,
                          self.write_errors)
            return False

    @staticmethod
    def _check(keys, k_ptrs, v_ptrs) -> None:
        if not len(keys) == len(k_ptrs) == len(v_ptrs):
            raise ValueError(f"{len(keys)} keys for {len(k_ptrs)} K and {len(v_ptrs)} V pages")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._write_pool.shutdown(wait=True)

