"""Python face of the C++ transfer engine (`dualpath._C.TransferEngine`); the contract is in
csrc/transfer/engine.h. Backends: `host` (memcpy between registered regions), `tcp` (the same
locally, plus one-sided writes/reads into another engine's regions: `listen` on one side,
`register_remote` on the other) and `cuda` (host and CUDA device memory, including another
process's device memory opened through CUDA IPC: cuda_ipc.py; built when dualpath._C has CUDA).

    eng = TransferEngine("host")
    a, b = eng.register_array(src), eng.register_array(dst)
    h = eng.submit(TransferBatch.of(a, src_offsets, b, dst_offsets, lengths), priority="bulk")
    eng.wait(h)  # "done" | "failed" | "canceled" ("pending" on timeout)

A batch is a struct of int64 arrays (one entry per descriptor), not a list of objects: submitting
65,536 descriptors costs one array conversion, not 65,536 Python calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dualpath import _C

Handle = _C.TransferHandle


@dataclass(frozen=True)
class TransferBatch:
    src_region: np.ndarray
    src_offset: np.ndarray
    dst_region: np.ndarray
    dst_offset: np.ndarray
    length: np.ndarray

    @classmethod
    def of(cls, src_region, src_offset, dst_region, dst_offset, length) -> TransferBatch:
        """Build from scalars or arrays; scalars are broadcast to the longest array."""
        arrs = [np.asarray(x, dtype=np.int64) for x in (src_region, src_offset, dst_region,
                                                        dst_offset, length)]
        n = max((a.size for a in arrs if a.ndim), default=1)
        return cls(*(np.ascontiguousarray(np.broadcast_to(a, (n,))) for a in arrs))

    def __len__(self) -> int:
        return int(self.length.size)


class TransferEngine:
    def __init__(self, backend: str = "host", num_workers: int = 4, slice_bytes: int = 1 << 20):
        self._e = _C.TransferEngine(backend, num_workers, slice_bytes)
        self._keep: dict[int, object] = {}  # region -> the object whose memory it is

    @property
    def backend(self) -> str:
        return self._e.backend

    def register(self, addr: int, nbytes: int, kind: str = "host") -> int:
        return self._e.register_region(addr, nbytes, kind)

    def register_array(self, arr) -> int:
        """Register a numpy array or a torch tensor (kept alive until deregistered). A CUDA
        tensor is a 'device' region (the cuda backends only: cuda, cuda:memcpy, cuda:kernel)."""
        if hasattr(arr, "data_ptr"):  # torch
            if arr.device.type not in ("cpu", "cuda"):
                raise ValueError(f"cannot register {arr.device.type} memory")
            if arr.device.type == "cuda" and not self.backend.startswith("cuda"):
                raise ValueError(f"the {self.backend} backend registers host memory only; "
                                 "CUDA tensors need TransferEngine('cuda')")
            if not arr.is_contiguous():  # an expanded/strided view spans other memory
                raise ValueError("register a contiguous tensor")
            region = self.register(arr.data_ptr(), arr.numel() * arr.element_size(),
                                   "device" if arr.device.type == "cuda" else "host")
            keep = arr
        else:
            if not isinstance(arr, np.ndarray):  # np.asarray would register a temporary copy
                raise TypeError("register a numpy array or a torch tensor")
            if not arr.flags.c_contiguous or not arr.flags.writeable:
                raise ValueError("register a contiguous, writeable array")
            region = self.register(arr.ctypes.data, arr.nbytes)
            keep = arr
        self._keep[region] = keep
        return region

    def listen(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve this engine's regions to peer engines (tcp backend); returns the port."""
        return self._e.listen(host, port)

    def register_remote(self, address: str, remote_region: int, nbytes: int,
                        connections: int = 4) -> int:
        """A region of the engine listening at `address` ("host:port"), usable here as the
        destination (one-sided write) or source (one-sided read) of descriptors (tcp backend).
        `connections` sockets carry the batches to that peer."""
        return self._e.register_remote(address, remote_region, nbytes, connections)

    def deregister(self, region: int) -> None:
        self._e.deregister_region(region)
        self._keep.pop(region, None)

    def submit(self, batch: TransferBatch, priority: str = "bulk") -> Handle:
        return self._e.submit(batch.src_region, batch.src_offset, batch.dst_region,
                              batch.dst_offset, batch.length, priority)

    def poll(self, handle: Handle) -> str:
        return self._e.poll(handle)

    def wait(self, handle: Handle, timeout_s: float | None = None) -> str:
        """Block until the batch ends or `timeout_s` passes (None or inf: no limit)."""
        if timeout_s is not None and timeout_s != timeout_s:
            raise ValueError("timeout_s is NaN")
        unbounded = timeout_s is None or timeout_s > 1e9
        return self._e.wait(handle, -1.0 if unbounded else timeout_s)

    def cancel(self, handle: Handle) -> None:
        self._e.cancel(handle)
