"""page_first host pages <-> layer-major Full Blocks, through raw host addresses as SGLang
hands them out (get_page_buffer_meta)."""

import numpy as np
import pytest

from dualpath.storage import BlockGeometry, BlockStore, StorageNic, fingerprint
from dualpath.storage.page_first import PageFirstAdapter

L_, PS, H, D, E = 3, 4, 2, 8, 2  # layers, page size, heads, dim, bytes per element
G = BlockGeometry(num_layers=L_, page_size=PS, num_kv_heads=H, head_dim=D, dtype_bytes=E)
ROW = H * D * E


def host_pool(slots, seed):
    """A page_first host pool [2, slots, layers, heads*dim*bytes] like SGLang's, as raw bytes."""
    return np.random.default_rng(seed).integers(0, 256, (2, slots, L_, ROW), dtype=np.uint8)


def page_ptrs(pool, pages):
    """What MHATokenToKVPoolHost.get_page_buffer_meta gives for page_first: K and V addresses."""
    base, v_off = pool.ctypes.data, pool[1].ctypes.data - pool.ctypes.data
    k = [base + p * PS * L_ * ROW for p in pages]
    return k, [x + v_off for x in k]


def key(i):
    return f"{i:064x}"


@pytest.mark.parametrize("with_nic", [False, True])
def test_round_trip_and_layer_major_blocks(tmp_path, with_nic):
    nic = StorageNic("pf-node") if with_nic else None
    store = BlockStore(str(tmp_path), G, fingerprint("m", G), description={}, nic=nic)
    a = PageFirstAdapter(store)
    src = host_pool(5 * PS, 0)
    keys = [key(i) for i in range(3)]
    assert a.set_pages(keys, *page_ptrs(src, [4, 0, 2])) == [True] * 3
    # the stored block of key 1 (source page 0) is layer-major: layer, K/V, token, row
    block = np.empty(G.payload_bytes, np.uint8)
    assert store.get_into(keys[1], block)
    block = block.reshape(L_, 2, PS, ROW)
    page0 = src[:, 0:PS]  # [2, tokens, layers, row]
    assert np.array_equal(block[:, 0], page0[0].transpose(1, 0, 2))
    assert np.array_equal(block[:, 1], page0[1].transpose(1, 0, 2))
    dst = host_pool(6 * PS, 1)
    before = dst.copy()
    got = a.get_pages(keys + [key(9)], *page_ptrs(dst, [1, 5, 3, 0]))
    assert got == [True, True, True, False]
    for s_page, d_page in ((4, 1), (0, 5), (2, 3)):
        assert np.array_equal(dst[:, d_page * PS:(d_page + 1) * PS],
                              src[:, s_page * PS:(s_page + 1) * PS])
    untouched = [p for p in range(6) if p not in (1, 5, 3)]
    for p in untouched:
        assert np.array_equal(dst[:, p * PS:(p + 1) * PS], before[:, p * PS:(p + 1) * PS])
    if nic:
        snap = nic.snapshot()
        assert snap.read_ops == 4 and snap.read_queue_tokens == 0  # 1 direct + 3 pages; miss: 0
    a.close()


def test_damaged_block_does_not_touch_the_page(tmp_path):
    store = BlockStore(str(tmp_path), G, fingerprint("m", G), description={})
    a = PageFirstAdapter(store)
    src = host_pool(PS, 2)
    a.set_pages([key(1)], *page_ptrs(src, [0]))
    path = store.path(key(1))
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))
    dst = host_pool(PS, 3)
    before = dst.copy()
    assert a.get_pages([key(1)], *page_ptrs(dst, [0])) == [False]
    assert np.array_equal(dst, before), "a failed read must leave the pool page as it was"


def test_mismatched_lists_and_mla_are_refused(tmp_path):
    store = BlockStore(str(tmp_path), G, fingerprint("m", G), description={})
    with pytest.raises(ValueError, match="keys for"):
        PageFirstAdapter(store).get_pages([key(1)], [0, 1], [0])
    g1 = BlockGeometry(2, 4, 1, 64, 2, kv_parts=1)
    with pytest.raises(ValueError, match="MLA"):
        PageFirstAdapter(BlockStore(str(tmp_path / "mla"), g1, fingerprint("m", g1),
                                    description={}))
