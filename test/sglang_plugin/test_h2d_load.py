"""HiCache's one-layer host -> GPU load on dualpath.ops.copy_kv (sglang_plugin/h2d_load.py):
the same bytes land where SGLang's page_first load puts them; other cases go to SGLang. Triton
under TRITON_INTERPRET=1 on CPU tensors here; the GPU host runs the real thing."""

import os
import types

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from dualpath.sglang_plugin import h2d_load  # noqa: E402

PS, LAYERS, HEADS, DIM = 4, 3, 2, 8


def pools(host_pages=6, dev_pages=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, host_pages * PS, LAYERS, HEADS, DIM, generator=g).to(torch.bfloat16)
    host = types.SimpleNamespace(layout="page_first", page_size=PS, kv_buffer=kv)
    dev = types.SimpleNamespace(
        k_buffer=[torch.zeros(dev_pages * PS, HEADS, DIM, dtype=torch.bfloat16)
                  for _ in range(LAYERS)],
        v_buffer=[torch.zeros(dev_pages * PS, HEADS, DIM, dtype=torch.bfloat16)
                  for _ in range(LAYERS)])
    return host, dev


def tokens(pages):
    return torch.tensor([p * PS + t for p in pages for t in range(PS)], dtype=torch.int64)


def stock_load(host, dev, host_indices, device_indices, layer_id, io_backend="kernel"):
    """What SGLang's page_first load computes (its kernel's semantics, in torch)."""
    dev.k_buffer[layer_id][device_indices] = host.kv_buffer[0][host_indices, layer_id]
    dev.v_buffer[layer_id][device_indices] = host.kv_buffer[1][host_indices, layer_id]


def test_one_layer_lands_where_sglangs_load_puts_it():
    host, ours = pools()
    _, ref = pools()
    hi, di = tokens([5, 0, 3]), tokens([1, 4, 2])
    calls = []
    for layer in (2, 0):  # one load, several layers: the page lists are computed once
        h2d_load.load_to_device_per_layer(lambda *a: calls.append(a), host, ours, hi, di, layer,
                                          "kernel")
        stock_load(host, ref, hi, di, layer)
    assert calls == [], "ours ran, not SGLang's"
    for a, b in zip(ours.k_buffer + ours.v_buffer, ref.k_buffer + ref.v_buffer, strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert ours.k_buffer[1].abs().sum() == 0, "layer 1 was not asked for"
    assert getattr(host, h2d_load.PAGES)[2].tolist() == [5, 0, 3]


@pytest.mark.parametrize("change", ["layout", "page_size", "io_backend"])
def test_other_cases_run_sglangs_load(change):
    host, dev = pools()
    io = "kernel"
    if change == "layout":
        host.layout = "layer_first"
    elif change == "page_size":
        host.page_size = 1
    else:
        io = "direct"
    calls = []
    h2d_load.load_to_device_per_layer(lambda *a: calls.append(a), host, dev, tokens([1]),
                                      tokens([2]), 0, io)
    assert len(calls) == 1 and dev.k_buffer[0].abs().sum() == 0


def test_an_unpinned_host_pool_stays_on_sglangs_load():
    """GPU indices with a host pool the GPU cannot read in place: SGLang's path, every time."""
    host, dev = pools()

    class GpuIndices:  # what the controller passes for the kernel backend: device tensors
        is_cuda = True

        def __len__(self):
            return 4

    calls = []
    for layer in (0, 1):
        h2d_load.load_to_device_per_layer(lambda *a: calls.append(a), host, dev, GpuIndices(),
                                          GpuIndices(), layer, "kernel")
    assert len(calls) == 2 and getattr(host, h2d_load.PINNED) is False


def test_device_layouts_ours_does_not_describe_stay_on_sglangs_load():
    """SGLang's page-major device pool ([pages, page, heads, dim] views) and pools whose rows
    differ from the host's go to SGLang's load instead of a wrong copy or an exception."""
    host, dev = pools()
    dev.k_buffer = [t.view(-1, PS, HEADS, DIM) for t in dev.k_buffer]
    dev.v_buffer = [t.view(-1, PS, HEADS, DIM) for t in dev.v_buffer]
    calls = []
    h2d_load.load_to_device_per_layer(lambda *a: calls.append(a), host, dev, tokens([1]),
                                      tokens([2]), 0, "kernel")
    host, dev = pools()
    dev.k_buffer = [torch.zeros(5 * PS, HEADS, DIM // 2, dtype=torch.bfloat16)
                    for _ in range(LAYERS)]
    dev.v_buffer = [torch.zeros(5 * PS, HEADS, DIM // 2, dtype=torch.bfloat16)
                    for _ in range(LAYERS)]
    for _ in range(2):
        h2d_load.load_to_device_per_layer(lambda *a: calls.append(a), host, dev, tokens([1]),
                                          tokens([2]), 0, "kernel")
    assert len(calls) == 3 and getattr(host, h2d_load.LAYOUTS)[1] is None
