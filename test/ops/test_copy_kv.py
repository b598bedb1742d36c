"""copy_kv (Triton, run by the interpreter on CPU tensors here) equals the pure-torch reference
byte for byte, for every pair of layouts, odd sizes, several dtypes and strided buffers."""

import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # CI has no GPU: run the kernels on the CPU

import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dualpath.ops import layout as L  # noqa: E402
from dualpath.ops.kv_copy import copy_kv, cuda_available  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
IMPLS = ["triton"] + (["cuda"] if DEVICE == "cuda" and cuda_available() else [])


def rand_like(shape, dtype, gen):
    t = torch.randint(0, 256, (*shape[:-1], shape[-1] * torch.empty((), dtype=dtype)
                                .element_size()), dtype=torch.uint8, generator=gen)
    return t.view(dtype).to(DEVICE)


def build(kind, layers, parts, pages, ps, heads, dim, dtype, gen, strided):
    """A layout of `kind` with random contents; strided=True makes non-contiguous buffers."""
    extra = 3 if strided else 0  # extra heads sliced away -> token stride > row bytes
    if kind == "device_pool":
        bufs = [rand_like((pages * ps + ps, heads + extra, dim), dtype, gen)[:, :heads]
                for _ in range(layers * parts)]
        return L.device_pool(bufs[:layers], bufs[layers:] if parts == 2 else None, ps)
    if kind == "host_page_first":
        buf = rand_like((parts, pages * ps, layers, heads + extra, dim), dtype, gen)
        return L.host_page_first(buf[:, :, :, :heads], ps)
    if kind == "full_blocks":
        buf = rand_like((pages, layers, parts, ps, heads + extra, dim), dtype, gen)
        return L.full_blocks(buf[..., :heads, :])
    buf = rand_like((pages * layers, parts, ps, heads + extra, dim), dtype, gen)
    return L.layer_blocks(buf[..., :heads, :])


KINDS = ["device_pool", "host_page_first", "full_blocks"]
DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn]


def snapshot(layout):
    return [t.clone() for t in layout.tensors]


def bytes_equal(a, b):
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b,
                                                                                      strict=True))


SIZES = [(1, 1, 1, False), (17, 16, 3, True), (5, 3, 2, False)]
if DEVICE == "cuda":  # the interpreter is too slow for these; the GPU host runs them
    SIZES += [(97, 64, 61, True), (1024, 16, 3, False), (1024, 1, 1, True),
              (70001, 1, 1, False)]  # more page pairs than a grid dimension holds


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("src_kind", KINDS)
@pytest.mark.parametrize("dst_kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pages,ps,layers,strided", SIZES)
def test_matches_reference(impl, src_kind, dst_kind, dtype, pages, ps, layers, strided):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((src_kind, dst_kind, pages, ps)).encode()))
    heads, dim, parts = 2, 24, 2
    src = build(src_kind, layers, parts, pages + 4, ps, heads, dim, dtype, gen, strided)
    dst_k = build(dst_kind, layers, parts, pages + 3, ps, heads, dim, dtype, gen, strided)
    dst_r_tensors = snapshot(dst_k)
    dst_r = build(dst_kind, layers, parts, pages + 3, ps, heads, dim, dtype, gen, strided)
    for t, s in zip(dst_r.tensors, dst_r_tensors, strict=True):
        t.copy_(s)  # identical starting contents for kernel and reference
    src_pages = torch.randint(0, pages + 4, (pages,), generator=gen).to(DEVICE)  # may repeat
    dst_pages = torch.randperm(pages + 3, generator=gen)[:pages].to(DEVICE)  # never repeats
    copy_kv(src, dst_k, src_pages, dst_pages, impl=impl)
    copy_kv(src, dst_r, src_pages, dst_pages, impl="reference")
    assert bytes_equal(dst_k.tensors, dst_r.tensors), f"{impl} {src_kind}->{dst_kind} {dtype} " \
        f"pages={pages} ps={ps} layers={layers} strided={strided}"
    assert not bytes_equal(dst_r.tensors, dst_r_tensors), "the copy changed nothing"


def test_single_layer_into_layer_blocks_and_mla():
    gen = torch.Generator().manual_seed(1)
    src = build("device_pool", 3, 2, 6, 4, 2, 8, torch.bfloat16, gen, False)
    dst = build("layer_blocks", 1, 2, 5, 4, 2, 8, torch.bfloat16, gen, False)
    ref = build("layer_blocks", 1, 2, 5, 4, 2, 8, torch.bfloat16, gen, False)
    ref.tensors[0].copy_(dst.tensors[0])
    sp, dp = torch.tensor([5, 0, 2], device=DEVICE), torch.tensor([4, 1, 0], device=DEVICE)
    copy_kv(src, dst, sp, dp, src_layers=[2], dst_layers=[0])
    copy_kv(src, ref, sp, dp, src_layers=[2], dst_layers=[0], impl="reference")
    assert bytes_equal(dst.tensors, ref.tensors)
    # MLA: one part per layer, 576-wide latent rows
    mla_src = L.device_pool([rand_like((12, 1, 576), torch.bfloat16, gen) for _ in range(2)],
                            None, 4)
    mla_dst = L.full_blocks(torch.zeros(3, 2, 1, 4, 1, 576, dtype=torch.bfloat16, device=DEVICE))
    copy_kv(mla_src, mla_dst, torch.tensor([2, 0], device=DEVICE),
            torch.tensor([0, 2], device=DEVICE))
    want = mla_src.tensors[1][8:12]  # layer 1, page 2
    assert torch.equal(mla_dst.tensors[0][0, 1, 0].view(torch.uint8),
                       want.reshape(4, 1, 576).view(torch.uint8))


def test_bad_arguments_are_refused():
    gen = torch.Generator().manual_seed(2)
    a = build("full_blocks", 2, 2, 4, 4, 2, 8, torch.float16, gen, False)
    b = build("full_blocks", 2, 2, 4, 8, 2, 8, torch.float16, gen, False)
    with pytest.raises(ValueError, match="page size"):
        copy_kv(a, b, torch.tensor([0]), torch.tensor([0]))
    c = build("full_blocks", 2, 2, 4, 4, 2, 8, torch.float16, gen, False)
    with pytest.raises(IndexError, match="dst_pages"):
        copy_kv(a, c, torch.tensor([0]), torch.tensor([4]))
    with pytest.raises(TypeError, match="int64"):
        copy_kv(a, c, torch.tensor([0], dtype=torch.int32), torch.tensor([0]))
    with pytest.raises(IndexError, match="src_layers"):
        copy_kv(a, c, torch.tensor([0]), torch.tensor([0]), src_layers=[2], dst_layers=[0])
    with pytest.raises(ValueError, match="not contiguous"):
        L.full_blocks(torch.zeros(2, 2, 2, 4, 8, 2)[..., ::2, :].transpose(-1, -2))


def test_cuda_impl_refuses_without_cuda():
    if cuda_available():
        pytest.skip("this machine has the CUDA kernels")
    gen = torch.Generator().manual_seed(3)
    a = build("full_blocks", 1, 2, 2, 4, 2, 8, torch.float16, gen, False)
    b = build("full_blocks", 1, 2, 2, 4, 2, 8, torch.float16, gen, False)
    with pytest.raises(RuntimeError, match="built with CUDA"):
        copy_kv(a, b, torch.tensor([0]), torch.tensor([1]), impl="cuda")


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("impl", IMPLS)
def test_captured_in_a_cuda_graph(impl):
    """Decode-path use: capture once, replay with new page indices written in place."""
    gen = torch.Generator().manual_seed(4)
    src = build("device_pool", 4, 2, 40, 16, 2, 64, torch.bfloat16, gen, False)
    dst = build("full_blocks", 4, 2, 40, 16, 2, 64, torch.bfloat16, gen, False)
    sp = torch.randperm(40, generator=gen)[:8].cuda()
    dp = torch.randperm(40, generator=gen)[:8].cuda()
    copy_kv(src, dst, sp, dp, impl=impl)  # warm-up: compiles, stages the base tables
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        copy_kv(src, dst, sp, dp, impl=impl)
    for _ in range(3):
        sp.copy_(torch.randperm(40, generator=gen)[:8])
        dp.copy_(torch.randperm(40, generator=gen)[:8])
        ref = build("full_blocks", 4, 2, 40, 16, 2, 64, torch.bfloat16, gen, False)
        ref.tensors[0].copy_(dst.tensors[0])
        g.replay()
        copy_kv(src, ref, sp, dp, impl="reference")
        torch.cuda.synchronize()
        assert bytes_equal(dst.tensors, ref.tensors)


def test_op_is_registered_with_declared_mutation():
    op = torch.ops.dualpath.copy_kv.default
    mutated = [a.name for a in op._schema.arguments if a.alias_info and a.alias_info.is_write]
    assert mutated == ["dst_tensors"]


def test_op_called_through_the_dispatcher_copies():
    """Eager copy_kv skips the dispatcher; torch.compile calls the op: it must copy the same."""
    from dualpath.ops.kv_copy import _width

    gen = torch.Generator().manual_seed(7)
    src = build("device_pool", 3, 2, 9, 16, 2, 64, torch.bfloat16, gen, True)
    dst = build("full_blocks", 3, 2, 5, 16, 2, 64, torch.bfloat16, gen, False)
    ref = build("full_blocks", 3, 2, 5, 16, 2, 64, torch.bfloat16, gen, False)
    ref.tensors[0].copy_(dst.tensors[0])
    before = snapshot(dst)
    sp = torch.tensor([8, 0, 3], dtype=torch.int64, device=DEVICE)
    dp = torch.tensor([4, 1, 0], dtype=torch.int64, device=DEVICE)
    layers = (0, 1, 2)
    width = _width(16, src.alignment(layers), dst.alignment(layers))
    torch.ops.dualpath.copy_kv(list(src.tensors), list(dst.tensors),
                               src.rows_table(layers, sp.device), dst.rows_table(layers, sp.device),
                               sp, dp, src.page_stride, src.token_stride, dst.page_stride,
                               dst.token_stride, 16, src.row_bytes, width, IMPLS[-1])
    copy_kv(src, ref, sp, dp, impl="reference")
    assert bytes_equal(dst.tensors, ref.tensors)
    assert not bytes_equal(dst.tensors, before)


def test_auto_impl_picks_triton_without_gpu_pages():
    """impl='auto' (the default) runs the CUDA kernels only for GPU page indices with
    dualpath._C's CUDA build; CPU indices (the interpreter here) take Triton."""
    gen = torch.Generator().manual_seed(5)
    a = build("full_blocks", 2, 2, 3, 4, 2, 8, torch.float16, gen, False)
    b = build("device_pool", 2, 2, 3, 4, 2, 8, torch.float16, gen, False)
    ref = build("device_pool", 2, 2, 3, 4, 2, 8, torch.float16, gen, False)
    for t, r in zip(b.tensors, ref.tensors, strict=True):
        r.copy_(t)
    sp = torch.tensor([2, 0], dtype=torch.int64, device=DEVICE)
    dp = torch.tensor([1, 2], dtype=torch.int64, device=DEVICE)
    copy_kv(a, b, sp, dp)
    copy_kv(a, ref, sp, dp, impl="reference")
    assert bytes_equal(b.tensors, ref.tensors)


@pytest.mark.parametrize("impl", IMPLS)
def test_de_buffer_slots_are_page_first_regions(impl):
    """A DE buffer slot's K (V) region is byte-for-byte a page_first host page's K (V) region:
    the region copies the decode agent makes into a prefill's host pool (agent._write) and
    copy_kv between the two layouts move the same bytes (the direct-to-GPU forward relies on
    the layout; benchmark/transfer/bench_de_forward.py)."""
    gen = torch.Generator().manual_seed(7)
    slots, pages, ps, layers, heads, dim = 5, 7, 16, 3, 2, 24
    buf = rand_like((slots, 2, ps, layers, heads, dim), torch.bfloat16, gen)
    src = L.page_first_slots(buf)
    host = torch.zeros((2, pages * ps, layers, heads, dim), dtype=torch.bfloat16, device=DEVICE)
    region = ps * layers * heads * dim * 2  # bytes of one page's K (or V) region
    src_pages = torch.tensor([3, 0, 4], dtype=torch.int64)
    dst_pages = torch.tensor([6, 2, 5], dtype=torch.int64)
    expect = torch.zeros_like(host).view(torch.uint8).reshape(2, pages, region)
    slot_bytes = buf.view(torch.uint8).reshape(slots, 2, region)
    for s, p in zip(src_pages.tolist(), dst_pages.tolist(), strict=True):
        expect[:, p] = slot_bytes[s]  # what agent._write's two descriptors per page move
    copy_kv(src, L.host_page_first(host, ps), src_pages.to(DEVICE), dst_pages.to(DEVICE),
            impl=impl)
    assert torch.equal(host.view(torch.uint8).reshape(2, pages, region).cpu(), expect.cpu())
    back = torch.zeros_like(buf)
    copy_kv(L.host_page_first(host, ps), L.page_first_slots(back), dst_pages.to(DEVICE),
            src_pages.to(DEVICE), impl=impl)
    idx = src_pages.to(DEVICE)
    assert torch.equal(back[idx].view(torch.uint8).cpu(), buf[idx].view(torch.uint8).cpu())
