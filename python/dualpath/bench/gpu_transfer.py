"""GPU-host check of the transfer engine: the conformance and cuda-backend tests on the GPU
(device memory, pinned and pageable host, peer GPUs, CUDA IPC across processes), then
benchmark/transfer/bench_cuda.py. Run through scripts/gpu_transfer.sh."""

from __future__ import annotations

from dualpath.bench.gpu_kernels import tests_then_bench


def main(argv: list[str] | None = None) -> int:
    return tests_then_bench(__doc__.split("\n\n")[0], "test/transfer",
                            "benchmark/transfer/bench_cuda.py", argv)


if __name__ == "__main__":
    raise SystemExit(main())
