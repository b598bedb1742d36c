"""`python -m dualpath.bench.sglang_serving <sglang.benchmark.serving args>`: SGLang's serving
benchmark where Hugging Face `datasets` is not installed.

SGLang 0.5.17's `sglang.benchmark.serving` imports `datasets` at start-up only for the MMMU
dataset (`sglang/benchmark/datasets/mmmu.py`). The offline GPU bundle leaves `datasets` out (it
pulls pyarrow, ~40 MB, past the upload limit), so this wrapper gives that one import a module
whose `load_dataset` raises a clear error, and runs the benchmark unchanged. Every dataset that
does not need Hugging Face `datasets` (random, random-ids, sharegpt from a local file,
generated-shared-prefix, mooncake, agentic-trace, ...) works as in stock SGLang. Where
`datasets` is installed, it is used as is.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
import types


def _missing_datasets() -> types.ModuleType:
    mod = types.ModuleType("datasets")
    mod.__doc__ = "placeholder: Hugging Face datasets is not installed"

    def load_dataset(*args, **kwargs):
        raise RuntimeError("this dataset needs Hugging Face `datasets`, which is not installed "
                           "(the offline GPU bundle leaves it out); use random, random-ids, "
                           "sharegpt with --dataset-path, or install datasets")

    mod.load_dataset = load_dataset
    return mod


def main() -> None:
    if importlib.util.find_spec("datasets") is None:
        sys.modules["datasets"] = _missing_datasets()
    sys.argv[0] = "sglang.benchmark.serving"
    runpy.run_module("sglang.benchmark.serving", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
