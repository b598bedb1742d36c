"""The GPU-profile summary of a Chrome trace (SGLang's torch profiler output)."""

import gzip
import json

from dualpath.bench import gpu_profile


def ev(cat, name, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}


EVENTS = [
    ev("kernel", "void gemm<128, 64>(float*, int)", 0, 100, device=0, stream=7),
    ev("kernel", "void gemm<256, 64>(float*, int)", 50, 100, device=0, stream=7),  # overlaps
    ev("kernel", "transfer_hicache_one_layer", 400, 100, device=0, stream=9),
    ev("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 600, 400, device=0, stream=9,
       bytes=20_000_000),
    ev("cpu_op", "aten::mm", 0, 1000),  # CPU events are ignored
    {"ph": "i", "cat": "kernel", "name": "instant", "ts": 5},
]


def test_summary_counts_overlapping_kernels_once_and_groups_templates():
    s = gpu_profile.summarize(EVENTS)
    assert s["events"] == 4 and s["window_s"] == 0.001
    assert s["kernel_busy_fraction"] == 0.25  # [0, 150) + [400, 500) of 1000 us
    assert s["kernels"][0] == {"name": "void gemm", "s": 0.0002, "calls": 2, "of_window": 0.2}
    assert s["copies"]["HtoD"] == {"s": 0.0004, "bytes": 20_000_000, "calls": 1, "gbps": 50.0}
    assert s["streams"]["device 0 stream 9"] == 0.0005


def test_newest_gzip_trace_of_a_folder_and_empty_cases(tmp_path):
    assert gpu_profile.summarize_dir(tmp_path) is None
    assert gpu_profile.summarize([ev("cpu_op", "x", 0, 1)])["events"] == 0
    with gzip.open(tmp_path / "a-TP-0.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": EVENTS}, f)
    s = gpu_profile.summarize_dir(tmp_path)
    assert s["trace"].endswith(".trace.json.gz") and s["events"] == 4
    assert gpu_profile.main([str(tmp_path)]) == 0
