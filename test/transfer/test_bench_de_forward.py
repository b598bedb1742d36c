"""benchmark/transfer/bench_de_forward.py on the CPU: the host-pool forward's byte offsets, run
through the transfer engine, put the DE buffer's slots where copy_kv's layouts say they go."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from dualpath.ops import layout as L
from dualpath.ops.kv_copy import copy_kv

ROOT = Path(__file__).resolve().parents[2]


def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_de_forward", ROOT / "benchmark/transfer/bench_de_forward.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_forward_offsets_land_where_the_layouts_say():
    transfer = pytest.importorskip("dualpath.transfer")
    b = bench()
    slots_n, pages, ps, layers, heads, dim = 6, 9, 4, 3, 2, 8
    region = ps * layers * heads * dim * 2
    gen = torch.Generator().manual_seed(1)
    slab = torch.randint(0, 256, (slots_n, 2, ps, layers, heads, dim * 2), dtype=torch.uint8,
                         generator=gen)
    host = torch.zeros((2, pages * ps, layers, heads, dim * 2), dtype=torch.uint8)
    slots, host_pages = [4, 0, 5, 2], [8, 3, 0, 6]
    src_off, dst_off = b.forward_offsets(slots, host_pages, pages, region)
    eng = transfer.TransferEngine("host", num_workers=2)
    src = eng.register_array(slab.numpy().reshape(-1))
    dst = eng.register_array(host.numpy().reshape(-1))
    h = eng.submit(transfer.TransferBatch.of(src, src_off, dst, dst_off, region))
    assert eng.wait(h, 30) == "done"
    want = torch.zeros_like(host)
    copy_kv(L.page_first_slots(slab.view(torch.bfloat16)),
            L.host_page_first(want.view(torch.bfloat16), ps),
            torch.tensor(slots), torch.tensor(host_pages), impl="reference")
    assert torch.equal(host, want) and host.any()
    assert np.count_nonzero(host.numpy()) == np.count_nonzero(want.numpy())


def test_needs_two_gpus(capsys):
    if torch.cuda.device_count() >= 2:
        pytest.skip("a GPU host runs the benchmark itself")
    assert bench().main(["--pages", "1"]) == 2
    assert "2 GPUs" in capsys.readouterr().err
