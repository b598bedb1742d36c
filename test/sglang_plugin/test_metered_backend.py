"""MeteredStorage around one of SGLang's zero-copy backends, built by SGLang's own factory: a
stand-in registered under the `mooncake` name (the real one needs the Mooncake store running),
constructed the way the factory constructs mooncake, (storage_config, mem_pool_host)."""

import pytest

hicache = pytest.importorskip("sglang.srt.mem_cache.hicache_storage")
factory_mod = pytest.importorskip("sglang.srt.mem_cache.storage.backend_factory")

from dualpath.sglang_plugin.agent import node_nic  # noqa: E402
from dualpath.sglang_plugin.metered_backend import MeteredStorage  # noqa: E402


class FakeZeroCopy(hicache.HiCacheStorage):
    made = []

    def __init__(self, storage_config, mem_pool_host):
        self.config, self.pool, self.stored = storage_config, mem_pool_host, set()
        FakeZeroCopy.made.append(self)

    def batch_exists(self, keys, extra_info=None):
        n = 0
        while n < len(keys) and keys[n] in self.stored:
            n += 1
        return n

    def batch_get_v1(self, keys, host_indices, extra_info=None):
        return [k in self.stored for k in keys]

    def batch_set_v1(self, keys, host_indices, extra_info=None):
        self.stored.update(keys)
        return [True] * len(keys)

    get = batch_get = set = batch_set = lambda *a, **k: None

    def exists(self, key):
        return key in self.stored


class Pool:
    page_size = 64

    def get_size_per_token(self):
        return 1000


@pytest.fixture
def metered(monkeypatch):
    monkeypatch.setitem(factory_mod.StorageBackendFactory._registry, "mooncake", {
        "loader": lambda: FakeZeroCopy, "module_path": __name__, "class_name": "FakeZeroCopy"})
    cfg = hicache.HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
        model_name="m", extra_config={"backend_name": "dualpath-metered", "interface_v1": 1,
                                      "inner_backend": "mooncake", "node": "metered-node",
                                      "inner_extra_config": {"master": "x:1"}, "keep": 1})
    m = MeteredStorage(cfg, {})
    m.register_mem_pool_host(Pool())
    return m


def test_inner_is_built_by_sglang_with_its_own_config(metered):
    inner = FakeZeroCopy.made[-1]
    assert metered.inner is inner and isinstance(inner.pool, Pool)
    assert inner.config.extra_config == {"interface_v1": 1, "keep": 1, "master": "x:1"}


def test_reads_and_writes_are_metered_on_the_node(metered):
    nic = node_nic("metered-node", None)
    before = nic.snapshot()
    assert metered.batch_set_v1(["a", "b"], None) == [True, True]
    assert metered.batch_exists(["a", "b", "c"]) == 2
    assert metered.batch_get_v1(["a", "c"], None) == [True, False]
    after = nic.snapshot()
    page = 64 * 1000
    assert after.write_bytes - before.write_bytes == 2 * page
    assert after.read_bytes - before.read_bytes == 2 * page  # the batch, as one transfer
    assert after.read_queue_bytes == before.read_queue_bytes == 0


def test_only_zero_copy_backends_are_wrapped():
    cfg = hicache.HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
        model_name="m", extra_config={"inner_backend": "file"})
    with pytest.raises(ValueError, match="zero-copy"):
        MeteredStorage(cfg, {})
