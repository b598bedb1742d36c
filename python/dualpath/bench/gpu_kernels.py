"""GPU-host check of the KV copy kernels: the byte-exact tests on the GPU (larger odd sizes than
CI's interpreter run), then the bandwidth benchmark. Run through scripts/gpu_kernels.sh."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def tests_then_bench(description: str, tests: str, bench: str, argv: list[str] | None) -> int:
    """`pytest <tests>` on the GPU, then `python <bench> --out OUT/<name>.jsonl [--bench-args]`;
    logs streamed into --out, summary.json with both exit codes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--setup-s", type=float)
    ap.add_argument("--bench-args", default="", help=f"extra arguments for {bench}")
    ap.add_argument("--test-args", default="",
                    help="extra pytest arguments, e.g. \"-k 'not another_process'\"")
    ap.add_argument("--skip-tests", action="store_true", help="the benchmark only")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    t0 = time.time()
    t = subprocess.CompletedProcess([], 0)
    if not args.skip_tests:
        with open(args.out / "tests.log", "w") as log:  # streamed: a killed run keeps its log
            t = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "--durations=5", *shlex.split(args.test_args),
                                str(ROOT / tests)], env=env, stdout=log,
                               stderr=subprocess.STDOUT, text=True)
        print((args.out / "tests.log").read_text()[-2000:], flush=True)
    t1 = time.time()
    with open(args.out / "bench.log", "w") as log:
        b = subprocess.run([sys.executable, str(ROOT / bench),
                            "--out", str(args.out / (Path(bench).stem + ".jsonl")),
                            *args.bench_args.split()], env=env, stdout=log,
                           stderr=subprocess.STDOUT, text=True)
    print((args.out / "bench.log").read_text()[-6000:], flush=True)
    summary = {"tests_rc": None if args.skip_tests else t.returncode, "bench_rc": b.returncode,
               "tests_s": round(t1 - t0, 1), "bench_s": round(time.time() - t1, 1),
               "setup_s": args.setup_s}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if t.returncode == 0 and b.returncode == 0 else 1


def main(argv: list[str] | None = None) -> int:
    return tests_then_bench(__doc__.split("\n\n")[0], "test/ops",
                            "benchmark/kernels/bench_copy_kv.py", argv)


if __name__ == "__main__":
    raise SystemExit(main())
