"""The native module builds, loads and reports how it was built; the CUDA sources compile."""

import shutil
import subprocess
import sys

import pytest

import dualpath


def test_build_info_matches_package():
    info = dualpath.build_info()
    assert info["version"] == dualpath.__version__
    assert isinstance(info["with_cuda"], bool)
    assert info["cuda_reason"]
    if info["with_cuda"]:
        rt = info["cuda_runtime"]
        assert rt["runtime_version"] >= 12000
        assert (rt["error"] is None) == (rt["device_count"] > 0)


def test_cli_prints_json():
    out = subprocess.run([sys.executable, "-m", "dualpath", "--json"], check=True,
                         capture_output=True, text=True).stdout
    assert '"version"' in out and "DUALPATH_BUILD_CUDA" in out


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_and_load(repo_root, tmp_path):
    """Builds the module with CUDA forced on (as on the GPU host) and calls into the CUDA code.

    Without a GPU driver the call must report the CUDA error, not crash or hang."""
    pybind11 = pytest.importorskip("pybind11")
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(repo_root), "-B", str(build), "-DDUALPATH_WITH_CUDA=ON",
                    "-DCMAKE_CUDA_ARCHITECTURES=90", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DPython_EXECUTABLE={sys.executable}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    code = ("import json, _C; b = _C.build_info(); r = _C.cuda_runtime_info();\n"
            "try:\n"
            "    _C.copy_kv(8, 8, 8, 8, 1, 1, 0, 0, 0, 0, 1, 16, 16, 0); launch = 'ran'\n"
            "except RuntimeError as e:\n"
            "    launch = str(e)\n"
            "print(json.dumps([b['with_cuda'], b['cuda_archs'], r, launch]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=build, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    with_cuda, archs, rt, launch = __import__("json").loads(out)
    assert with_cuda is True and archs == "90"
    assert rt["runtime_version"] >= 13000
    assert rt["device_count"] > 0 or rt["error"], rt
    if rt["device_count"] == 0:  # the KV copy kernel is in the module; without a GPU its
        assert launch.startswith("copy_kv launch failed"), launch  # launch fails cleanly
