"""GPU-host check of the KV copy kernels: the byte-exact tests on the GPU (larger odd sizes than
CI's interpreter run), then the bandwidth benchmark. Run through scripts/gpu_kernels.sh."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--setup-s", type=float)
    ap.add_argument("--bench-args", default="", help="extra arguments for bench_copy_kv.py")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    t0 = time.time()
    with open(args.out / "tests.log", "w") as log:  # streamed: a killed run keeps its log
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                "--durations=5", str(ROOT / "test/ops")], env=env, stdout=log,
                               stderr=subprocess.STDOUT, text=True)
    print((args.out / "tests.log").read_text()[-2000:], flush=True)
    t1 = time.time()
    with open(args.out / "bench.log", "w") as log:
        bench = subprocess.run([sys.executable, str(ROOT / "benchmark/kernels/bench_copy_kv.py"),
                                "--out", str(args.out / "bench_copy_kv.jsonl"),
                                *args.bench_args.split()], env=env, stdout=log,
                               stderr=subprocess.STDOUT, text=True)
    print((args.out / "bench.log").read_text()[-6000:], flush=True)
    summary = {"tests_rc": tests.returncode, "bench_rc": bench.returncode,
               "tests_s": round(t1 - t0, 1), "bench_s": round(time.time() - t1, 1),
               "setup_s": args.setup_s}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if tests.returncode == 0 and bench.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
