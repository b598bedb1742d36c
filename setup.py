"""Build of the `dualpath` package and its native module `dualpath._C` (CMake + pybind11).

The CUDA sources are compiled only when nvcc and a CUDA build of torch are both present
(`DUALPATH_BUILD_CUDA=auto`, the default); the CPU build always succeeds. torch is looked up in
the build environment, so a CUDA build needs `pip install --no-build-isolation ...`.
Build-time knobs are environment variables declared in python/dualpath/env.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _load_env():
    spec = importlib.util.spec_from_file_location("_dualpath_env", ROOT / "python/dualpath/env.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up while building the class
    spec.loader.exec_module(mod)
    return mod


ENV = _load_env()
VERSION = re.search(
    r'__version__ = "([^"]+)"', (ROOT / "python/dualpath/version.py").read_text()
).group(1)


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return ENV.GIT_SHA.get() or "unknown"


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin/nvcc").exists():
            return str(Path(home) / "bin/nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def _cuda_plan() -> tuple[str | None, str]:
    """(nvcc path or None, why): whether to compile the CUDA sources."""
    mode = ENV.BUILD_CUDA.get()
    if mode == "off":
        return None, "DUALPATH_BUILD_CUDA=off"
    nvcc = _find_nvcc()
    if mode == "on":
        if nvcc is None:
            raise SystemExit("DUALPATH_BUILD_CUDA=on but nvcc was not found "
                             "(set CUDA_HOME or put nvcc on PATH)")
        return nvcc, "DUALPATH_BUILD_CUDA=on"
    try:
        import torch  # noqa: F401  (only the build environment's torch decides)
        torch_cuda = torch.version.cuda
    except ImportError:
        torch_cuda = None
    if nvcc is None:
        return None, "auto: nvcc not found"
    if torch_cuda is None:
        return None, "auto: no CUDA build of torch in the build environment"
    return nvcc, f"auto: nvcc and torch (CUDA {torch_cuda}) found"


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        nvcc, why = _cuda_plan()
        cfg = ENV.BUILD_TYPE.get()
        cfg = {"release": "Release", "debug": "Debug", "relwithdebinfo": "RelWithDebInfo"}[cfg]
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DDUALPATH_VERSION={VERSION}",
            f"-DDUALPATH_GIT_SHA={_git_sha()}",
            f"-DDUALPATH_CUDA_REASON={why}",
            f"-DDUALPATH_WITH_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        if nvcc:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={ENV.CUDA_ARCHS.get()}"]
        print(f"dualpath: CUDA sources {'ON' if nvcc else 'OFF'} ({why})", flush=True)
        jobs = ENV.BUILD_JOBS.get() or os.cpu_count() or 1
        subprocess.run(["cmake", "-S", ext.source_dir, "-B", str(build_temp), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_temp), "--config", cfg, "-j", str(jobs)],
                       check=True)


setup(
    name="dualpath",
    version=VERSION,
    description="DualPath for SGLang: dual-path KV-cache loading for PD-disaggregated serving",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[CMakeExtension("dualpath._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=["numpy>=1.24", "xxhash>=3.0", "aiohttp>=3.9", "prometheus-client>=0.17"],
    # SGLang loads general plugins from this group in every server process; ours registers its
    # hooks only under `python -m dualpath.launch_server --enable-dual-path`.
    entry_points={"sglang.srt.plugins": ["dualpath = dualpath.sglang_plugin:load"]},
    extras_require={
        # The serving stack. On an air-gapped GPU host use the offline bundle instead
        # (scripts/make_gpu_bundle.py, scripts/gpu_setup.sh): it carries these pins.
        "sglang": ["sglang==0.5.17"],
        "dev": ["pytest>=8", "hypothesis>=6", "ruff>=0.6", "torch>=2.4", "triton>=3.1",
                "pybind11>=2.12", "tokenizers>=0.21", "transformers>=4.50", "jinja2>=3.1",
                "matplotlib>=3.8"],
    },
    zip_safe=False,
)
