"""DualPathStorage as SGLang's HiCache controller drives it (needs SGLang importable: skipped in
CI, run where the bundle or sglang is installed). The host pool is a stand-in with SGLang
0.5.17's page_first get_page_buffer_meta."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
hicache = pytest.importorskip("sglang.srt.mem_cache.hicache_storage")

from dualpath.sglang_plugin.storage_backend import DualPathStorage  # noqa: E402
from dualpath.storage import StoreMismatch  # noqa: E402


class FakePageFirstHost:
    """Attributes and get_page_buffer_meta of MHATokenToKVPoolHost with layout page_first."""

    def __init__(self, slots=64, layers=3, page=4, heads=2, dim=8, dtype=torch.bfloat16):
        self.layout, self.layer_num, self.page_size = "page_first", layers, page
        self.head_num, self.head_dim, self.dtype, self.size = heads, dim, dtype, slots
        self.kv_buffer = torch.randn(2, slots, layers, heads, dim, dtype=dtype)

    def get_page_buffer_meta(self, indices):
        ptrs, base = [], self.kv_buffer.data_ptr()
        item = self.dtype.itemsize
        v_off = self.layer_num * self.size * self.head_num * self.head_dim * item
        idx = indices.tolist()
        for i in range(0, len(idx), self.page_size):
            k = base + idx[i] * self.layer_num * self.head_num * self.head_dim * item
            ptrs += [k, k + v_off]
        return ptrs, [self.layer_num * item * self.page_size * self.head_num * self.head_dim] * \
            len(ptrs)


def config(root, model="m", tp_rank=0):
    return hicache.HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
        model_name=model, extra_config={"root": str(root), "node": "n0"})


def test_set_exists_get_round_trip(tmp_path):
    b = DualPathStorage(config(tmp_path), {})
    src = FakePageFirstHost()
    b.register_mem_pool_host(src)
    keys = [f"{i:064x}" for i in range(3)]
    idx = torch.arange(8, 20)  # pages 2, 3, 4
    assert b.batch_set_v1(keys, idx) == [True] * 3
    assert b.batch_exists(keys + ["f" * 64]) == 3
    dst = FakePageFirstHost()
    c = DualPathStorage(config(tmp_path), {})  # another server with the same model: shares it
    c.register_mem_pool_host(dst)
    assert c.batch_get_v1(keys, torch.arange(40, 52)) == [True] * 3
    assert torch.equal(dst.kv_buffer[:, 40:52].view(torch.uint8),
                       src.kv_buffer[:, 8:20].view(torch.uint8))
    assert c.get_stats().read_ops == 3


def test_a_failed_write_is_a_page_not_stored_never_an_exception(tmp_path, monkeypatch, caplog):
    """A full store (ENOSPC) fails those pages only, logged once, and the backend never raises
    into SGLang's backup thread (which would die: no later backup, no acknowledgement)."""
    import errno
    import logging

    b = DualPathStorage(config(tmp_path), {})
    b.register_mem_pool_host(FakePageFirstHost())
    keys = [f"{i:064x}" for i in range(3)]
    real = b.adapter._set_one

    def full(key, k, v):
        if key == keys[1]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(key, k, v)
    monkeypatch.setattr(b.adapter, "_set_one", full)
    with caplog.at_level(logging.ERROR):
        assert b.batch_set_v1(keys, torch.arange(8, 20)) == [True, False, True]
        assert b.batch_set_v1(keys[1:2], torch.arange(12, 16)) == [False]
    assert b.adapter.write_errors == 2
    assert sum("No space left" in r.getMessage() for r in caplog.records) == 1  # rate-limited
    assert b.batch_exists(keys) == 1  # the stored prefix stops at the failed page
    monkeypatch.setattr(b.adapter, "set_pages", lambda *a: 1 / 0)
    assert b.batch_set_v1(keys, torch.arange(8, 20)) == [False] * 3


def test_incompatible_server_is_refused(tmp_path):
    DualPathStorage(config(tmp_path), {}).register_mem_pool_host(FakePageFirstHost())
    other = DualPathStorage(config(tmp_path, model="other"), {})
    with pytest.raises(StoreMismatch):
        other.register_mem_pool_host(FakePageFirstHost())
    wrong = FakePageFirstHost()
    wrong.layout = "layer_first"
    with pytest.raises(ValueError, match="page_first"):
        DualPathStorage(config(tmp_path), {}).register_mem_pool_host(wrong)


def test_is_a_hicache_storage_and_refuses_the_copy_interface(tmp_path):
    b = DualPathStorage(config(tmp_path), {})
    assert isinstance(b, hicache.HiCacheStorage)
    with pytest.raises(NotImplementedError, match="interface_v1"):
        b.batch_get(["k"], [np.zeros(1)])


def test_reads_carry_the_request_id_into_the_nodes_read_order(tmp_path):
    """The request id tag_prefetch_rid puts into extra_info reaches the page reads without any
    plan or agent (the baseline too): the node ranks the request when it first asks."""
    b = DualPathStorage(config(tmp_path), {})
    b.register_mem_pool_host(FakePageFirstHost())
    keys = [f"{i:064x}" for i in range(2)]
    b.batch_set_v1(keys, torch.arange(0, 8))
    seen = []
    real = b.adapter.get_pages
    b.adapter.get_pages = lambda k, kp, vp, rid=None: seen.append(rid) or real(k, kp, vp, rid)
    info = hicache.HiCacheStorageExtraInfo(extra_info={"rid": "req-7"})
    assert b.batch_get_v1(keys, torch.arange(16, 24), info) == [True, True]
    assert b.batch_get_v1(keys, torch.arange(16, 24)) == [True, True]  # no extra_info
    assert seen == ["req-7", None]
    assert b.adapter.read_order("req-7") < b.adapter.read_order("later")
