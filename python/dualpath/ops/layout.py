"""Paged-KV layouts described as data, so one copy op serves every pair of layouts.

A layout says where each *row* lives: the bytes of one token's K (or V) for one layer, all heads
(``row_bytes = num_kv_heads * head_dim * element_size``, contiguous in every layout here):

    address(layer l, part c, page p, token t) = base[l, c] + p * page_stride + t * token_stride

``base`` is an int64 table of byte addresses ([num_layers, kv_parts]; part 0 = K, 1 = V; MLA has
one part); strides are in bytes. Builders below cover SGLang's device pool (per-layer K/V
buffers, NHD), SGLang's host pool in ``page_first`` layout, the DE buffer's slots, Full Blocks
([block, layer, part, token, head, dim]: each layer's slice contiguous) and Layer Blocks (one
layer).

A layout keeps the tensors its addresses point into alive (``tensors``) and records, per base,
which tensor and byte offset it came from (``origin``), so the pure-torch reference can address
the same bytes through tensor views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class KVLayout:
    kind: str
    base: torch.Tensor  # int64 [num_layers, kv_parts], byte addresses (on the CPU)
    origin: tuple[tuple[tuple[int, int], ...], ...]  # [l][c] -> (tensor index, byte offset)
    tensors: tuple[torch.Tensor, ...]
    page_size: int
    num_pages: int
    row_bytes: int
    page_stride: int
    token_stride: int
    _tables: dict = field(default_factory=dict, repr=False)

    def rows_table(self, layers: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """int64 [len(layers) * kv_parts] base addresses of the given layers, on `device`.
        Cached: after the first call no host-to-device copy happens (CUDA-graph capturable)."""
        key = (layers, str(device))
        table = self._tables.get(key)
        if table is None:
            table = self.base[list(layers)].reshape(-1).to(device)
            self._tables[key] = table
        return table

    def alignment(self, layers: tuple[int, ...]) -> int:
        """gcd of the row bytes, strides and the given layers' base addresses: every access of
        a copy may be as wide as the largest power of two dividing it. Cached."""
        key = ("align", layers)
        g = self._tables.get(key)
        if g is None:
            g = math.gcd(self.row_bytes, self.page_stride, self.token_stride,
                         *(int(x) for x in self.base[list(layers)].reshape(-1).tolist()))
            self._tables[key] = g
        return g

    @property
    def num_layers(self) -> int:
        return self.base.shape[0]

    @property
    def kv_parts(self) -> int:
        return self.base.shape[1]

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def tensor_of(self, layer: int, part: int) -> torch.Tensor:
        """The tensor that (layer, part) lives in (e.g. a device pool's K buffer of a layer)."""
        return self.tensors[self.origin[layer][part][0]]


def _row_bytes(t: torch.Tensor, head_dims: int) -> int:
    """Bytes of the trailing `head_dims` dims, which must be contiguous."""
    shape, stride = t.shape[-head_dims:], t.stride()[-head_dims:]
    expect = 1
    for size, st in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and st != expect:
            raise ValueError(f"the head/dim dims of a {tuple(t.shape)} tensor with strides "
                             f"{t.stride()} are not contiguous")
        expect *= size
    return expect * t.element_size()


def _make(kind, bases, tensors, page_size, num_pages, row_bytes, page_stride, token_stride):
    addr = [[tensors[ti].data_ptr() + off for ti, off in layer] for layer in bases]
    return KVLayout(kind, torch.tensor(addr, dtype=torch.int64),
                    tuple(tuple(layer) for layer in bases), tuple(tensors), page_size,
                    num_pages, row_bytes, page_stride, token_stride)


def device_pool(k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor] | None,
                page_size: int) -> KVLayout:
    """SGLang's device KV pool: per layer a K (and V) buffer [slots, heads, dim]; slot = page *
    page_size + token. `v_buffers=None` for MLA (one latent buffer per layer)."""
    parts = [list(k_buffers)] + ([list(v_buffers)] if v_buffers is not None else [])
    if any(len(p) != len(parts[0]) for p in parts) or not parts[0]:
        raise ValueError("need one K (and V) buffer per layer")
    ref = parts[0][0]
    tensors, bases = [], []
    for layer in range(len(parts[0])):
        row = []
        for p in parts:
            t = p[layer]
            if t.shape != ref.shape or t.stride() != ref.stride() or t.dtype != ref.dtype:
                raise ValueError("all layer buffers must share shape, strides and dtype")
            tensors.append(t)
            row.append((len(tensors) - 1, 0))
        bases.append(row)
    token_stride = ref.stride(0) * ref.element_size()
    return _make("device_pool", bases, tensors, page_size, ref.shape[0] // page_size,
                 _row_bytes(ref, 2), page_size * token_stride, token_stride)


def host_page_first(buf: torch.Tensor, page_size: int) -> KVLayout:
    """SGLang's host pool, page_first: [parts, slots, layers, heads, dim] (parts = 2 for MHA's K
    and V, 1 for MLA)."""
    if buf.dim() != 5:
        raise ValueError("page_first host buffer must be [parts, slots, layers, heads, dim]")
    e = buf.element_size()
    bases = [[(0, c * buf.stride(0) * e + layer * buf.stride(2) * e)
              for c in range(buf.shape[0])] for layer in range(buf.shape[2])]
    token_stride = buf.stride(1) * e
    return _make("host_page_first", bases, [buf], page_size, buf.shape[1] // page_size,
                 _row_bytes(buf, 2), page_size * token_stride, token_stride)


def page_first_slots(buf: torch.Tensor) -> KVLayout:
    """Pages that each hold their K region, then their V region, each token-major like a
    page_first host page ([tokens, layers, heads, dim]): [slots, parts, tokens, layers, heads,
    dim]. The decode agent's DE buffer keeps forwarded pages so (sglang_plugin/block_buffer.py),
    and a slot's K (V) region is byte-for-byte a page_first host page's K (V) region."""
    if buf.dim() != 6:
        raise ValueError("slot buffer must be [slots, parts, tokens, layers, heads, dim]")
    e = buf.element_size()
    bases = [[(0, c * buf.stride(1) * e + layer * buf.stride(3) * e)
              for c in range(buf.shape[1])] for layer in range(buf.shape[3])]
    return _make("page_first_slots", bases, [buf], buf.shape[2], buf.shape[0],
                 _row_bytes(buf, 2), buf.stride(0) * e, buf.stride(2) * e)


def full_blocks(buf: torch.Tensor) -> KVLayout:
    """Full Blocks: [blocks, layers, parts, page_size, heads, dim]; a block is a page."""
    if buf.dim() != 6:
        raise ValueError("Full Block buffer must be [blocks, layers, parts, tokens, heads, dim]")
    e = buf.element_size()
    bases = [[(0, layer * buf.stride(1) * e + c * buf.stride(2) * e)
              for c in range(buf.shape[2])] for layer in range(buf.shape[1])]
    return _make("full_blocks", bases, [buf], buf.shape[3], buf.shape[0], _row_bytes(buf, 2),
                 buf.stride(0) * e, buf.stride(3) * e)


def layer_blocks(buf: torch.Tensor) -> KVLayout:
    """Layer Blocks: [blocks, parts, page_size, heads, dim], one layer of a Full Block each."""
    if buf.dim() != 5:
        raise ValueError("Layer Block buffer must be [blocks, parts, tokens, heads, dim]")
    return full_blocks(buf.unsqueeze(1))


def compatible(src: KVLayout, dst: KVLayout) -> None:
    if (src.row_bytes, src.page_size, src.kv_parts) != (dst.row_bytes, dst.page_size,
                                                        dst.kv_parts):
        raise ValueError(f"layouts differ in row bytes / page size / parts: "
                         f"{(src.row_bytes, src.page_size, src.kv_parts)} vs "
                         f"{(dst.row_bytes, dst.page_size, dst.kv_parts)}")
