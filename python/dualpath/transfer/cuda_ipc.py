"""CUDA IPC for the `cuda` transfer backend: export a device-memory range in one process, open
it in another, register it there as a 'device' region (CUDA calls through cuda-python's
`cuda.bindings`).

    # owner (e.g. the prefill, for its KV pool)
    desc = export(tensor.data_ptr(), tensor.nbytes)        # IpcRange: send it to the peer
    # peer (e.g. the decode's agent)
    mem = open_range(desc)                                  # OpenRange: .ptr valid here
    region = engine.register(mem.ptr, desc.length, "device")
    ...
    engine.deregister(region); mem.close()

A handle names a whole cudaMalloc allocation (PyTorch's caching allocator hands out pieces of
larger segments), so an IpcRange carries the allocation's handle plus the range's offset in it.
The memory stays valid in the peer until it closes the range; the owner must not free it
before (CUDA's rule). A process cannot open its own handles.
"""

from __future__ import annotations

import base64
import ctypes
from dataclasses import dataclass

HANDLE_BYTES = 64  # CUDA_IPC_HANDLE_SIZE


class CudaIpcError(RuntimeError):
    pass


def _rt():
    try:
        from cuda.bindings import driver, runtime
    except ImportError as e:  # pragma: no cover - depends on the install
        raise CudaIpcError("CUDA IPC needs cuda-python (pip install cuda-bindings)") from e
    return runtime, driver


def _call(fn, *args, what: str):
    """Call a cuda.bindings function; CudaIpcError on a CUDA error or a missing driver. Returns
    the results after the error code."""
    runtime, driver = _rt()
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001  (no driver library, bad argument types)
        raise CudaIpcError(f"{what}: {type(e).__name__}: {e}") from e
    err, rest = out[0], out[1:]
    if err not in (runtime.cudaError_t.cudaSuccess, driver.CUresult.CUDA_SUCCESS):
        raise CudaIpcError(f"{what}: {err!r}")
    return rest


@dataclass(frozen=True)
class IpcRange:
    """What the owner sends: the allocation's IPC handle, the range's offset and length."""

    handle: bytes
    offset: int
    length: int

    def __post_init__(self) -> None:
        if len(self.handle) != HANDLE_BYTES:
            raise ValueError(f"a CUDA IPC handle has {HANDLE_BYTES} bytes, got "
                             f"{len(self.handle)}")
        if self.offset < 0 or self.length < 0:
            raise ValueError("offset and length must be >= 0")

    def to_dict(self) -> dict:
        return {"handle": base64.b64encode(self.handle).decode(), "offset": self.offset,
                "length": self.length}

    @classmethod
    def from_dict(cls, d: dict) -> IpcRange:
        return cls(base64.b64decode(d["handle"]), int(d["offset"]), int(d["length"]))


def handle_to_bytes(handle) -> bytes:
    """The 64 bytes of a cudaIpcMemHandle_t (opaque in cuda.bindings 13)."""
    return ctypes.string_at(handle.getPtr(), HANDLE_BYTES)


def handle_from_bytes(raw: bytes):
    runtime, _ = _rt()
    if len(raw) != HANDLE_BYTES:
        raise ValueError(f"a CUDA IPC handle has {HANDLE_BYTES} bytes, got {len(raw)}")
    h = runtime.cudaIpcMemHandle_t()
    ctypes.memmove(h.getPtr(), raw, HANDLE_BYTES)
    return h


def export(ptr: int, length: int) -> IpcRange:
    """Export [ptr, ptr + length) of this process's device memory."""
    runtime, driver = _rt()
    base, size = _call(driver.cuMemGetAddressRange, driver.CUdeviceptr(ptr),
                       what="cuMemGetAddressRange")
    base, size = int(base), int(size)
    if ptr + length > base + size:
        raise CudaIpcError(f"range [{ptr:#x}, +{length}) runs past its allocation "
                           f"[{base:#x}, +{size})")
    (handle,) = _call(runtime.cudaIpcGetMemHandle, base, what="cudaIpcGetMemHandle")
    return IpcRange(handle_to_bytes(handle), ptr - base, length)


class OpenRange:
    """Another process's device memory mapped here; `ptr` is the range's start."""

    def __init__(self, base: int, desc: IpcRange):
        self.base, self.desc = base, desc
        self.ptr = base + desc.offset

    def close(self) -> None:
        if self.base:
            runtime, _ = _rt()
            base, self.base = self.base, 0
            _call(runtime.cudaIpcCloseMemHandle, base, what="cudaIpcCloseMemHandle")

    def __enter__(self) -> OpenRange:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_range(desc: IpcRange, device: int | None = None) -> OpenRange:
    """Map an exported range into this process, in the context of `device` (default: the
    calling thread's current device): kernels on that GPU reach it (peer access to the owner's
    GPU is enabled as needed), so open it on the GPU that will write into it."""
    runtime, _ = _rt()
    prev = None
    if device is not None:
        (prev,) = _call(runtime.cudaGetDevice, what="cudaGetDevice")
        _call(runtime.cudaSetDevice, device, what="cudaSetDevice")
    try:
        (base,) = _call(runtime.cudaIpcOpenMemHandle, handle_from_bytes(desc.handle),
                        runtime.cudaIpcMemLazyEnablePeerAccess, what="cudaIpcOpenMemHandle")
    finally:
        if prev is not None and prev != device:
            _call(runtime.cudaSetDevice, prev, what="cudaSetDevice")
    return OpenRange(int(base), desc)
