"""DualPath for SGLang: dual-path prefix-KV loading for PD-disaggregated LLM serving."""

from dualpath.version import __version__

__all__ = ["__version__", "build_info"]


def build_info() -> dict:
    """How the native module `dualpath._C` was built, plus CUDA runtime facts when it has CUDA.

    Raises ImportError with a rebuild hint when the native module is missing.
    """
    try:
        from dualpath import _C
    except ImportError as e:
        raise ImportError(
            "dualpath._C is not built: install the package with `pip install -e .` "
            "(or scripts/gpu_setup.sh on a GPU host)"
        ) from e
    info = dict(_C.build_info())
    if info["with_cuda"]:
        info["cuda_runtime"] = dict(_C.cuda_runtime_info())
    return info
