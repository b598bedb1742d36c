"""Shared host memory between server processes on one host.

A prefill server started with the shared-memory host pool (SGLang's `shm` allocator: a memfd)
describes it with `describe_region`; a decode agent on the same host maps the very same pages
with `PeerRegions.map`, through `/proc/<pid>/fd/<fd>`, and copies KV into them: the one-host
form of a one-sided write into a peer's registered memory (RDMA on a cluster). The inode and
size are checked so that a recycled pid or fd cannot map someone else's memory.
"""

from __future__ import annotations

import mmap
import os
import socket
import threading
from dataclasses import asdict, dataclass

import numpy as np


class PeerMemoryError(RuntimeError):
    pass


@dataclass(frozen=True)
class RegionDesc:
    host: str
    pid: int
    fd: int
    ino: int
    nbytes: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RegionDesc:
        return cls(host=str(d["host"]), pid=int(d["pid"]), fd=int(d["fd"]), ino=int(d["ino"]),
                   nbytes=int(d["nbytes"]))


def describe_region(fd: int, nbytes: int) -> RegionDesc:
    st = os.fstat(fd)
    if st.st_size < nbytes:
        raise PeerMemoryError(f"fd {fd} holds {st.st_size} bytes, fewer than {nbytes}")
    return RegionDesc(socket.gethostname(), os.getpid(), fd, st.st_ino, nbytes)


class PeerRegions:
    """Mappings of peers' shared regions, made once per region and kept."""

    def __init__(self):
        self._maps: dict[tuple, tuple[mmap.mmap, np.ndarray]] = {}
        self._lock = threading.Lock()

    def map(self, desc: RegionDesc) -> np.ndarray:
        """A writeable uint8 view of the peer's region (raises PeerMemoryError)."""
        key = (desc.host, desc.pid, desc.fd, desc.ino)
        with self._lock:
            hit = self._maps.get(key)
            if hit is not None:
                return hit[1]
            if desc.host != socket.gethostname():
                raise PeerMemoryError(f"region of {desc.host}:{desc.pid} is on another host")
            path = f"/proc/{desc.pid}/fd/{desc.fd}"
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError as e:
                raise PeerMemoryError(f"cannot open {path}: {e}") from None
            try:
                st = os.fstat(fd)
                if st.st_ino != desc.ino or st.st_size < desc.nbytes:
                    raise PeerMemoryError(f"{path} is not the described region (inode "
                                          f"{st.st_ino} vs {desc.ino}, {st.st_size} bytes)")
                mm = mmap.mmap(fd, desc.nbytes, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            arr = np.frombuffer(mm, dtype=np.uint8)
            self._maps[key] = (mm, arr)
            return arr

    def prune(self) -> list[tuple]:
        """Drop the mappings of peers that exited (a restarted prefill gets a new pid): a kept
        mapping would hold the dead server's whole host pool in memory. Returns their keys."""
        with self._lock:
            gone = [k for k in self._maps if not os.path.exists(f"/proc/{k[1]}")]
            for k in gone:
                del self._maps[k]  # unmapped once the last view of it is dropped
            return gone
