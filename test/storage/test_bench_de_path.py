"""benchmark/storage/bench_de_path.py runs end to end (two agents, the store, a shm pool) and
checks every load byte for byte; a tiny run here keeps it working."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmark" / "storage" / "bench_de_path.py"


def test_a_tiny_run_times_both_paths(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_de_path", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "rows.jsonl"
    assert mod.main(["--pages", "2", "--caps", "0", "--repeats", "1", "--dir", str(tmp_path),
                     "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == ["pe", "de", "restore"]
    assert all(r["median_s"] > 0 and r["pages"] == 2 for r in rows)
    assert "de/pe" in capsys.readouterr().out
