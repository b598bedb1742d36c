"""`copy_kv`: one op for every paged-KV move between layouts (see layout.py).

For each page pair i, each selected layer pair j and each part c (K, V) it copies the
page_size rows of `row_bytes` bytes at src (src_layers[j], c, src_pages[i]) to dst
(dst_layers[j], c, dst_pages[i]). One launch per call, whatever the number of pieces.

Implementations: "triton" (GPU; also runs on CPU tensors under TRITON_INTERPRET=1, which is how
CI tests it), "cuda" (csrc/ops/kv_copy.cu in dualpath._C, 16-byte accesses where aligned;
launched on torch's current stream) and "reference" (pure torch). Host memory is read or
written in place by the GPU kernels when it is pinned (its device mapping), which beats the copy
engine for many small rows.
Registered as the torch op ``dualpath::copy_kv`` declaring that it writes the destination tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from dualpath.ops.layout import KVLayout, compatible
from dualpath.ops.reference import copy_kv_ref


@triton.jit
def _copy_kv_kernel(src_base, dst_base, src_pages, dst_pages, n_pairs, n_tblocks,
                    src_page_stride, src_token_stride, dst_page_stride, dst_token_stride,
                    page_size, row_elems,
                    WIDTH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (r, j): block of tokens tb = r % n_tblocks ([tb * BLOCK_T, +BLOCK_T)) of (layer,
    part) row lc = r // n_tblocks of the base tables, for page pairs j, j + grid[1], ...; one
    [BLOCK_T, BLOCK_R] tile per BLOCK_R elements of the row, every load of a tile issued before
    its stores (a whole tile in flight: what reading pinned host memory over PCIe needs).
    Programs launched together cover every layer of the same pages, which page_first host
    memory keeps side by side."""
    r = tl.program_id(0)
    lc = r // n_tblocks  # (layer pair, part) row of the base tables
    tb = r % n_tblocks  # block of tokens within the page
    if WIDTH == 8:
        elem = tl.int64
    elif WIDTH == 4:
        elem = tl.int32
    elif WIDTH == 2:
        elem = tl.int16
    else:
        elem = tl.int8
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < page_size
    t64 = t.to(tl.int64)
    s_row0 = tl.load(src_base + lc)
    d_row0 = tl.load(dst_base + lc)
    for i in range(tl.program_id(1), n_pairs, tl.num_programs(1)):
        sp = tl.load(src_pages + i).to(tl.int64)
        dp = tl.load(dst_pages + i).to(tl.int64)
        # byte addresses of the tile's tokens of this page in this (layer, part), each side
        s_rows = (s_row0 + sp * src_page_stride + t64 * src_token_stride).to(
            tl.pointer_type(elem))
        d_rows = (d_row0 + dp * dst_page_stride + t64 * dst_token_stride).to(
            tl.pointer_type(elem))
        for off in range(0, row_elems, BLOCK_R):
            c = off + tl.arange(0, BLOCK_R)
            mask = t_mask[:, None] & (c < row_elems)[None, :]
            vals = tl.load(s_rows[:, None] + c[None, :], mask=mask)
            tl.store(d_rows[:, None] + c[None, :], vals, mask=mask)


_TILE_ELEMS = 2048  # elements per Triton tile (16 KiB at 8 bytes): 4 warps, 128 B a thread


def _tiles(page_size: int, row_elems: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_R): a tile spans whole rows (up to _TILE_ELEMS) and as many tokens of
    the page as fit."""
    block_r = min(_TILE_ELEMS, triton.next_power_of_2(row_elems))
    block_t = max(1, min(_TILE_ELEMS // block_r, triton.next_power_of_2(page_size)))
    return block_t, block_r


def _width(widest: int, *values: int) -> int:
    """Widest access (<= `widest` bytes) that divides every address, stride and length."""
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    w = widest
    while w > 1 and g % w:
        w //= 2
    return w


def _launch(src_base: torch.Tensor, dst_base: torch.Tensor, src_pages: torch.Tensor,
            dst_pages: torch.Tensor, src_page_stride: int, src_token_stride: int,
            dst_page_stride: int, dst_token_stride: int, page_size: int, row_bytes: int,
            width: int, impl: str) -> None:
    # No host syncs or host-to-device copies in here: capturable in a CUDA graph.
    n_pairs, n_rows = src_pages.numel(), src_base.numel()
    if n_pairs == 0 or n_rows == 0:
        return
    if impl == "cuda":
        from dualpath import _C

        _C.copy_kv(src_base.data_ptr(), dst_base.data_ptr(), src_pages.data_ptr(),
                   dst_pages.data_ptr(), n_pairs, n_rows, src_page_stride, src_token_stride,
                   dst_page_stride, dst_token_stride, page_size, row_bytes, width,
                   torch.cuda.current_stream(src_pages.device).cuda_stream)
        return
    width = min(width, 8)  # Triton's widest integer element
    row_elems = row_bytes // width
    block_t, block_r = _tiles(page_size, row_elems)
    n_tblocks = triton.cdiv(page_size, block_t)
    _copy_kv_kernel[(n_rows * n_tblocks, min(n_pairs, 65535))](
        src_base, dst_base, src_pages, dst_pages, n_pairs, n_tblocks, src_page_stride,
        src_token_stride, dst_page_stride, dst_token_stride, page_size, row_elems, WIDTH=width,
        BLOCK_T=block_t, BLOCK_R=block_r)


@torch.library.custom_op("dualpath::copy_kv", mutates_args=("dst_tensors",))
def _copy_kv_op(src_tensors: list[torch.Tensor], dst_tensors: list[torch.Tensor],
                src_base: torch.Tensor, dst_base: torch.Tensor, src_pages: torch.Tensor,
                dst_pages: torch.Tensor, src_page_stride: int, src_token_stride: int,
                dst_page_stride: int, dst_token_stride: int, page_size: int,
                row_bytes: int, width: int, impl: str) -> None:
    """The op torch.compile sees (it declares the destination tensors written). Eager calls
    go straight to _launch: the dispatcher's round trip costs more than a launch (~185 us per
    call measured on the CPU VM)."""
    _launch(src_base, dst_base, src_pages, dst_pages, src_page_stride, src_token_stride,
            dst_page_stride, dst_token_stride, page_size, row_bytes, width, impl)


@_copy_kv_op.register_fake
def _(src_tensors, dst_tensors, src_base, dst_base, src_pages, dst_pages, src_page_stride,
      src_token_stride, dst_page_stride, dst_token_stride, page_size, row_bytes, width,
      impl) -> None:
    return None


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """True when dualpath._C was built with the CUDA kernels and a GPU is visible (asked once
    per process)."""
    try:
        from dualpath import _C
    except ImportError:
        return False
    return bool(_C.build_info()["with_cuda"]) and torch.cuda.is_available()


def copy_kv(src: KVLayout, dst: KVLayout, src_pages: torch.Tensor, dst_pages: torch.Tensor, *,
            src_layers: Sequence[int] | None = None, dst_layers: Sequence[int] | None = None,
            impl: str = "auto") -> None:
    """Copy pages of paged KV from one layout to another.

    Parameters
    ----------
    src, dst : KVLayout (layout.py); same row bytes, page size and parts.
    src_pages, dst_pages : int64 [n] page indices (on the kernel's device for "triton");
        destination pages must not repeat (sources may).
    src_layers, dst_layers : layer indices of equal length (default: all layers of each, which
        must then be equally many). E.g. src_layers=[5], dst_layers=[0] moves layer 5 into a
        Layer Block.
    impl : "auto" (default: "cuda" where dualpath._C has the CUDA kernels and the page indices
        are on a GPU, else "triton"; the CUDA launch costs a few us from Python, Triton's tens),
        "triton", "cuda" (dualpath._C built with CUDA) or "reference".

    Note: page indices on the CPU are bounds-checked; on a GPU they are not (no sync).
    """
    compatible(src, dst)
    src_layers = list(range(src.num_layers)) if src_layers is None else list(src_layers)
    dst_layers = list(range(dst.num_layers)) if dst_layers is None else list(dst_layers)
    if len(src_layers) != len(dst_layers):
        raise ValueError(f"{len(src_layers)} source layers for {len(dst_layers)} destination")
    for name, layers, lay in (("src", src_layers, src), ("dst", dst_layers, dst)):
        if any(not 0 <= x < lay.num_layers for x in layers):
            raise IndexError(f"{name}_layers {layers} out of range [0, {lay.num_layers})")
    if src_pages.shape != dst_pages.shape or src_pages.dim() != 1:
        raise ValueError("src_pages and dst_pages must be 1-D and of equal length")
    for name, pages, lay in (("src", src_pages, src), ("dst", dst_pages, dst)):
        if pages.dtype != torch.int64:
            raise TypeError(f"{name}_pages must be int64, got {pages.dtype}")
        if pages.device.type == "cpu" and pages.numel() and (
                int(pages.min()) < 0 or int(pages.max()) >= lay.num_pages):
            raise IndexError(f"{name}_pages out of range [0, {lay.num_pages})")
    if impl == "reference":
        copy_kv_ref(src, dst, src_pages, dst_pages, src_layers, dst_layers)
        return
    if src_pages.device.type == "cuda":  # the kernel dereferences every address on the GPU
        for lay in (src, dst):
            for t in lay.tensors:
                if not (t.is_cuda or t.is_pinned()):
                    raise ValueError(f"{lay.kind}: a GPU copy can reach host memory only when it "
                                     "is pinned (tensor.pin_memory())")
    if impl == "auto":
        impl = ("cuda" if src_pages.device.type == "cuda" and dst_pages.device.type == "cuda"
                and cuda_available() else "triton")
    if impl not in ("triton", "cuda"):
        raise ValueError(f"unknown impl {impl!r}: use 'auto', 'triton', 'cuda' or 'reference'")
    if impl == "cuda":
        if not cuda_available():
            raise RuntimeError("impl='cuda' needs dualpath._C built with CUDA "
                               "(DUALPATH_BUILD_CUDA) and a visible GPU")
        if src_pages.device.type != "cuda" or dst_pages.device.type != "cuda":
            raise ValueError("impl='cuda' needs the page indices on the GPU")
    dev = src_pages.device
    src_base = src.rows_table(tuple(src_layers), dev)
    dst_base = dst.rows_table(tuple(dst_layers), dev)
    # widest access every address and stride allows (host-side data, cached: no device sync)
    width = _width(16, src.alignment(tuple(src_layers)), dst.alignment(tuple(dst_layers)))
    nvtx = src_pages.device.type == "cuda"
    if nvtx:
        torch.cuda.nvtx.range_push(f"dualpath.copy_kv {src.kind}->{dst.kind} "
                                   f"pages={src_pages.numel()} layers={len(src_layers)}")
    try:
        args = (src_base, dst_base, src_pages, dst_pages, src.page_stride, src.token_stride,
                dst.page_stride, dst.token_stride, src.page_size, src.row_bytes, width, impl)
        if torch.compiler.is_compiling():
            _copy_kv_op(list(src.tensors), list(dst.tensors), *args)
        else:
            _launch(*args)
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()
