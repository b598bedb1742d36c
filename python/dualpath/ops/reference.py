"""Pure-torch references of the ops, on the same layout descriptors (tests, benchmark baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dualpath.ops.layout import KVLayout, compatible


def rows_view(layout: KVLayout, layer: int, part: int) -> torch.Tensor:
    """uint8 view [num_pages, page_size, row_bytes] of one (layer, part) of a layout."""
    ti, off = layout.origin[layer][part]
    t = layout.tensors[ti]
    storage = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
    return torch.as_strided(storage, (layout.num_pages, layout.page_size, layout.row_bytes),
                            (layout.page_stride, layout.token_stride, 1),
                            t.storage_offset() * t.element_size() + off)


def copy_kv_ref(src: KVLayout, dst: KVLayout, src_pages: torch.Tensor, dst_pages: torch.Tensor,
                src_layers: Sequence[int] | None = None,
                dst_layers: Sequence[int] | None = None) -> None:
    """dst[dst_layers[j], c, dst_pages[i]] = src[src_layers[j], c, src_pages[i]] for all j, c, i."""
    compatible(src, dst)
    src_layers = list(range(src.num_layers)) if src_layers is None else list(src_layers)
    dst_layers = list(range(dst.num_layers)) if dst_layers is None else list(dst_layers)
    for ls, ld in zip(src_layers, dst_layers, strict=True):
        for c in range(src.kv_parts):
            d, s = rows_view(dst, ld, c), rows_view(src, ls, c)  # may live on other devices
            d[dst_pages.to(d.device)] = s[src_pages.to(s.device)].to(d.device)
