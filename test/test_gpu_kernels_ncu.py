"""dualpath.bench.gpu_kernels --ncu: one copy_kv launch under Nsight Compute, with a stand-in
`ncu` on PATH (the CPU VM has none): the documented command is what runs, and the outcome is
reported whether ncu profiles, is refused the counters, or is missing."""

import os
import stat

from dualpath.bench import gpu_kernels as gk


def fake_ncu(tmp_path, monkeypatch, body: str) -> None:
    """A stand-in `ncu` first on PATH: records its arguments, then runs `body`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    f = bin_dir / "ncu"
    f.write_text("#!/bin/sh\necho \"$@\" > \"$NCU_ARGS\"\n" + body)
    f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("NCU_ARGS", str(tmp_path / "args"))


def test_profiles_one_copy_kv_launch(tmp_path, monkeypatch):
    fake_ncu(tmp_path, monkeypatch, "echo '  copy_kv_kernel<int4>(...)'\n"
                                    "echo '    Section: GPU Speed Of Light Throughput'\n")
    info = gk.ncu_profile(tmp_path)
    assert info["ncu"] == "profiled" and info["ncu_rc"] == 0 and not info["ncu_perm_error"]
    args = (tmp_path / "args").read_text().split()
    assert args[:6] == ["--clock-control", "none", "--target-processes", "all", "-k",
                        "regex:copy_kv"]
    assert "bench_copy_kv.py" in " ".join(args) and "d2d_gather" in args
    assert "Speed Of Light" in (tmp_path / "ncu.txt").read_text()


def test_reports_a_counter_permission_refusal(tmp_path, monkeypatch):
    fake_ncu(tmp_path, monkeypatch, "echo '==ERROR== ERR_NVGPUCTRPERM - no permission' >&2\n"
                                    "exit 1\n")
    info = gk.ncu_profile(tmp_path)
    assert info["ncu"] == "no kernel report" and info["ncu_perm_error"] and info["ncu_rc"] == 1


def test_missing_ncu_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gk.ncu_profile(tmp_path) == {"ncu": "not found on PATH"}
