"""The smoke test's L3 backend flags and page counting (the GPU run itself is on the GPU host)."""

import json

from dualpath.bench.smoke import count_blocks, l3_args
from dualpath.storage import BlockGeometry, BlockStore, fingerprint


def test_dualpath_backend_flags_load_our_class(tmp_path):
    flags, env = l3_args("dualpath", tmp_path)
    assert env == {}
    extra = json.loads(flags[flags.index("--hicache-storage-backend-extra-config") + 1])
    assert flags[flags.index("--hicache-storage-backend") + 1] == "dynamic"
    assert "page_first" in flags and extra["interface_v1"] == 1
    import importlib.util
    assert importlib.util.find_spec(extra["module_path"]) is not None


def test_count_blocks_sees_both_backends(tmp_path):
    (tmp_path / "f").mkdir()
    for i in range(3):
        (tmp_path / "f" / f"{i:064x}_m_0_1.bin").write_bytes(b"x")
    assert count_blocks(tmp_path / "f") == 3
    g = BlockGeometry(1, 1, 1, 8, 1)
    s = BlockStore(str(tmp_path / "d" / "tp0of1"), g, fingerprint("m", g), description={})
    for i in range(4):
        s.put(f"{i:064x}", bytes(g.payload_bytes))
    assert count_blocks(tmp_path / "d") == 4
