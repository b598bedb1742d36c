"""A content-addressed store of Full Blocks in a directory of a (shared) file system.

One store directory serves one model/layout fingerprint: `STORE.json` records it and opening
the directory with another raises `StoreMismatch`. Blocks live at `<root>/<k[0:2]>/<k[2:4]>/<key>`.
Keys are SGLang's per-page hash chain (hex), so prefill, decode and later turns agree.

Thread-safe; several processes (prefill and decode servers, on one host or many) may share a
directory: writes are atomic renames and blocks are immutable, so the worst race is two writers
producing the same bytes. Reads go straight into caller buffers (e.g. pinned host memory),
several in flight. A damaged, truncated or foreign file is a logged miss, never data.

Eviction (optional `capacity_bytes`): when the store grows past the cap, the least recently used
blocks (file mtime, refreshed on every hit) are deleted down to `low_watermark` of the cap.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from dualpath.storage.block_file import (
    HEADER_BYTES,
    BlockError,
    BlockGeometry,
    read_block_into,
    write_block,
)
from dualpath.storage.nic import StorageNic

log = logging.getLogger(__name__)
_KEY = re.compile(r"^[0-9A-Za-z_-]{4,200}$")
DESCRIPTOR = "STORE.json"
CLAIM_STALE_S = 60.0  # a write claim this old belongs to a writer that died


class StoreMismatch(RuntimeError):
    """The directory belongs to a store with another fingerprint (model, layout or geometry)."""


class BlockStore:
    def __init__(self, root: str, geometry: BlockGeometry, fp: bytes, *, description: dict,
                 capacity_bytes: int = 0, low_watermark: float = 0.9, io_threads: int = 8,
                 nic: StorageNic | None = None):
        if capacity_bytes < 0 or not 0 < low_watermark <= 1 or io_threads < 1:
            raise ValueError("capacity_bytes >= 0, 0 < low_watermark <= 1, io_threads >= 1")
        self.root, self.geometry, self.fp = root, geometry, fp
        self.block_bytes = HEADER_BYTES + geometry.payload_bytes
        self.capacity_bytes, self.low_watermark = capacity_bytes, low_watermark
        self.nic = nic  # meters (and optionally caps) every block read and write
        os.makedirs(root, exist_ok=True)
        self._claim(description)
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="dualpath-store")
        self._lock = threading.Lock()
        self._evicting = threading.Lock()
        self._used = self._scan_bytes() if capacity_bytes else 0

    # ---- directory ownership ----
    def _claim(self, description: dict) -> None:
        desc = {"fingerprint": self.fp.hex(), "geometry": asdict(self.geometry), **description}
        path = os.path.join(self.root, DESCRIPTOR)
        tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        with open(tmp, "w") as f:
            json.dump(desc, f, indent=1, sort_keys=True)
        try:
            os.link(tmp, path)  # atomic create-if-absent: the first opener defines the store
        except FileExistsError:
            pass
        except OSError:  # file systems without hard links: exclusive create (brief window)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "w") as f:
                    json.dump(desc, f, indent=1, sort_keys=True)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
        with open(path) as f:
            have = json.load(f)
        if have.get("fingerprint") != desc["fingerprint"]:
            diff = {k: (have.get(k), v) for k, v in desc.items() if have.get(k) != v}
            raise StoreMismatch(
                f"{self.root} holds KV of another model/layout; refusing to share it. "
                f"Differences (store, this server): {diff}. Use another directory.")

    def path(self, key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"invalid block key {key!r}")
        return os.path.join(self.root, key[0:2], key[2:4], key)

    def _metered(self, op: str, queued: bool = False):
        """The NIC's accounting (and cap) around one block transfer, if the store has a NIC."""
        if self.nic is None:
            return contextlib.nullcontext()
        return self.nic.transfer(op, self.block_bytes, self.geometry.page_size if op == "read"
                                 else 0, queued=queued)

    # ---- single block ----
    def put(self, key: str, payload) -> bool:
        """Store a block unless it is already there or another writer (any process, any
        engine) is writing it; return True if this call wrote it. The writer claims the key
        first (`<block>.claim`, exclusive create), so two engines backing up the same page at
        once move its bytes over the storage NIC once. A claim older than `CLAIM_STALE_S` is a
        writer that died: it is taken over."""
        path = self.path(key)
        if os.path.exists(path):
            return False
        os.makedirs(os.path.dirname(path), exist_ok=True)
        claim = path + ".claim"
        if not self._claim_key(claim):
            return False
        try:
            if os.path.exists(path):  # finished by another writer between the checks
                return False
            with self._metered("write"):
                write_block(path, key, self.fp, self.geometry, payload)
        finally:
            try:
                os.unlink(claim)
            except FileNotFoundError:
                pass
        self._account_put()
        return True

    def wrote(self, started_at: float) -> None:
        """Account a block that a native writer stored (claim, write, rename: `put`'s steps)
        since `started_at` (time.monotonic): the NIC's meters and line rate, then the capacity
        accounting."""
        if self.nic is not None:
            with self.nic.transfer("write", self.block_bytes, started_at=started_at):
                pass
        self._account_put()

    def _account_put(self) -> None:
        if self.capacity_bytes:
            with self._lock:
                self._used += self.block_bytes
                over = self._used > self.capacity_bytes
            if over and self._evicting.acquire(blocking=False):  # one evictor per process
                try:  # puts made meanwhile were counted: evict again while still over the cap
                    for _ in range(4):
                        if not self.evict():
                            break
                        with self._lock:
                            if self._used <= self.capacity_bytes:
                                break
                finally:
                    self._evicting.release()

    @staticmethod
    def _claim_key(claim: str) -> bool:
        for _ in range(2):
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return True
            except FileExistsError:
                try:
                    if time.time() - os.stat(claim).st_mtime < CLAIM_STALE_S:
                        return False  # someone is writing it now
                    os.unlink(claim)  # its writer died: take over
                except FileNotFoundError:
                    pass  # released meanwhile: try again
        return False

    def get_into(self, key: str, out, _queued: bool = False) -> bool:
        """Read a block into `out` (payload_bytes long). False on a miss (`out` then undefined)."""
        path = self.path(key)
        try:
            with self._metered("read", queued=_queued):
                read_block_into(path, key, self.fp, self.geometry, out)
        except FileNotFoundError:
            return False
        except BlockError as e:
            # remove it, or exists_prefix would keep reporting it and put() keep skipping it
            log.warning("block %s unusable, treated as a miss and removed: %s", key, e)
            try:
                os.unlink(path)
            except OSError:
                pass
            return False
        except OSError as e:  # EIO, ESTALE on NFS, EACCES, ...: a miss, never an exception
            log.warning("block %s unreadable, treated as a miss: %s", key, e)
            return False
        if self.capacity_bytes:
            try:
                os.utime(path)  # recency for the LRU evictor (only when one runs)
            except OSError:
                pass
        return True

    def exists_prefix(self, keys: Sequence[str]) -> int:
        """How many leading keys are stored (SGLang's batch_exists semantics)."""
        for i, key in enumerate(keys):
            if not os.path.exists(self.path(key)):
                return i
        return len(keys)

    # ---- batches: several reads/writes in flight ----
    def batch_get_into(self, keys: Sequence[str], outs: Sequence) -> list[bool]:
        if len(keys) != len(outs):
            raise ValueError(f"{len(keys)} keys for {len(outs)} buffers")
        if self.nic is None:
            return list(self._pool.map(self.get_into, keys, outs))
        for k in keys:
            self.path(k)  # validate every key before anything is queued
        for _ in keys:  # queued from now until each read ends: the scheduler's read_q
            self.nic.submit_read(self.block_bytes, self.geometry.page_size)
        return list(self._pool.map(lambda k, o: self.get_into(k, o, _queued=True), keys, outs))

    def batch_put(self, keys: Sequence[str], payloads: Sequence) -> list[bool]:
        return list(self._pool.map(self.put, keys, payloads))

    # ---- eviction ----
    def _blocks(self) -> list[tuple[float, int, str]]:
        """(mtime, size, path) of every block; temp files of writers that died over an hour
        ago are removed on the way."""
        out, now = [], time.time()
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                p = os.path.join(dirpath, name)
                try:
                    st = os.stat(p)
                    if name.endswith((".tmp", ".claim")):
                        if now - st.st_mtime > 3600:
                            os.unlink(p)
                        continue
                except FileNotFoundError:
                    continue
                if name != DESCRIPTOR:
                    out.append((st.st_mtime, st.st_size, p))
        return out

    def _scan_bytes(self) -> int:
        return sum(size for _, size, _ in self._blocks())

    def evict(self) -> int:
        """Delete least recently used blocks down to the low watermark; return bytes freed.
        Rescans the directory, so blocks written by other processes count too; one evictor at
        a time across processes (an flock on the directory), and temp files of writers that died
        more than an hour ago are removed."""
        lock_fd = os.open(os.path.join(self.root, DESCRIPTOR), os.O_RDONLY)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another process is evicting
            with self._lock:
                before = self._used
            entries = self._blocks()
            used = sum(e[1] for e in entries)
            target = int(self.capacity_bytes * self.low_watermark)
            freed = 0
            for _, size, p in sorted(entries):
                if used - freed <= target:
                    break
                try:
                    os.unlink(p)
                    freed += size
                except FileNotFoundError:
                    pass
        finally:
            os.close(lock_fd)
        with self._lock:  # the scan is the truth as of its start; keep later puts' increments
            self._used = (used - freed) + (self._used - before)
        if freed:
            log.info("evicted %.1f MiB from %s (cap %.1f MiB)", freed / 2**20, self.root,
                     self.capacity_bytes / 2**20)
        return freed

    def close(self) -> None:
        self._pool.shutdown(wait=True)
