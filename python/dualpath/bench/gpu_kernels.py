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


NCU_CMD = ["ncu", "--clock-control", "none", "--target-processes", "all", "-k", "regex:copy_kv",
           "-c", "1", "--section", "SpeedOfLight", "--section", "MemoryWorkloadAnalysis"]
NCU_BENCH = ["--models", "8b", "--page-sizes", "64", "--pages", "64", "--moves", "d2d_gather",
             "--impls", "cuda"]


def ncu_profile(out: Path, timeout_s: float = 300) -> dict:
    """One copy_kv launch under Nsight Compute (the command scripts/gpu_kernels.sh documents);
    the report goes to OUT/ncu.txt. Returns what happened, also when ncu is missing or may not
    read the counters (ERR_NVGPUCTRPERM)."""
    import shutil

    if shutil.which("ncu") is None:
        return {"ncu": "not found on PATH"}
    cmd = [*NCU_CMD, sys.executable, str(ROOT / "benchmark/kernels/bench_copy_kv.py"),
           *NCU_BENCH]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                           env={**os.environ, "TRITON_INTERPRET": "0"})
    except subprocess.TimeoutExpired:
        return {"ncu": f"timed out after {timeout_s:.0f} s", "cmd": shlex.join(cmd)}
    (out / "ncu.txt").write_text(r.stdout + r.stderr)
    profiled = "copy_kv" in r.stdout and "Section: GPU Speed Of Light" in r.stdout
    return {"ncu": "profiled" if profiled else "no kernel report", "ncu_rc": r.returncode,
            "ncu_s": round(time.time() - t0, 1), "cmd": shlex.join(cmd),
            "ncu_perm_error": "ERR_NVGPUCTRPERM" in (r.stdout + r.stderr)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ncu = "--ncu" in argv
    if ncu:
        argv.remove("--ncu")
    rc = tests_then_bench(__doc__.split("\n\n")[0], "test/ops",
                          "benchmark/kernels/bench_copy_kv.py", argv)
    if ncu:  # after the timed benchmark: profiling replays kernels and would disturb it
        out = Path(argv[argv.index("--out") + 1])
        info = ncu_profile(out)
        print(f"ncu: {info}", flush=True)
        summary = json.loads((out / "summary.json").read_text())
        (out / "summary.json").write_text(json.dumps({**summary, **info}, indent=1) + "\n")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
