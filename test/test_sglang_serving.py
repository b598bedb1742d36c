"""The wrapper that runs SGLang's serving benchmark without Hugging Face `datasets`."""

import pytest

from dualpath.bench import sglang_serving


def test_placeholder_datasets_fails_clearly():
    mod = sglang_serving._missing_datasets()
    with pytest.raises(RuntimeError, match="not installed"):
        mod.load_dataset("MMMU/MMMU")


def test_runs_sglang_benchmark_help(monkeypatch, capsys):
    pytest.importorskip("sglang")  # datasets may be missing: the wrapper covers it
    monkeypatch.setattr("sys.argv", ["x", "--help"])
    with pytest.raises(SystemExit) as e:
        sglang_serving.main()
    assert e.value.code == 0 and "--dataset-name" in capsys.readouterr().out
