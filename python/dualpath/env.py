"""Every environment variable DualPath reads, in one place.

This module has no dependencies beyond the standard library: ``setup.py`` loads it by path to
read the build-time variables before the package is installed.

A variable that is set to a value its parser rejects raises ``ValueError`` naming the variable;
it is never silently replaced by the default. An unset or empty variable takes the default.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")


def choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        word = raw.strip().lower()
        if word not in options:
            raise ValueError(f"expected one of {list(options)}")
        return word

    return parse


def parse_nonneg_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def parse_cuda_archs(raw: str) -> str:
    """Semicolon- or comma-separated CMake CUDA architectures, e.g. ``90`` or ``80;90a``."""
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs:
        raise ValueError("expected at least one architecture, e.g. '90'")
    for a in archs:
        digits = a.removesuffix("a").removesuffix("-real").removesuffix("-virtual")
        if not digits.isdigit():
            raise ValueError(f"{a!r} is not a CUDA architecture like '90' or '90a'")
    return ";".join(archs)


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    name: str
    default: str
    parse: Callable[[str], T]
    help: str

    def get(self) -> T:
        raw = os.environ.get(self.name, "")
        if raw == "":
            return self.parse(self.default)
        try:
            return self.parse(raw)
        except ValueError as e:
            raise ValueError(f"{self.name}={raw!r} is invalid: {e}") from None

    def is_set(self) -> bool:
        return os.environ.get(self.name, "") != ""


# ---- build time (read by setup.py) ----
BUILD_CUDA = EnvVar(
    "DUALPATH_BUILD_CUDA", "auto", choice("auto", "on", "off"),
    "Build the CUDA sources: 'auto' when nvcc and a CUDA build of torch are both present, "
    "'on' whenever nvcc is found (fails otherwise), 'off' never.",
)
CUDA_ARCHS = EnvVar(
    "DUALPATH_CUDA_ARCHS", "90", parse_cuda_archs,
    "CMake CUDA architectures for the CUDA sources (Hopper: 90).",
)
BUILD_TYPE = EnvVar(
    "DUALPATH_BUILD_TYPE", "Release", choice("release", "debug", "relwithdebinfo"),
    "CMake build type of the native module.",
)
BUILD_JOBS = EnvVar(
    "DUALPATH_BUILD_JOBS", "0", parse_nonneg_int,
    "Parallel compile jobs for the native module; 0 means one per CPU.",
)

GIT_SHA = EnvVar(
    "DUALPATH_GIT_SHA", "", str,
    "Commit to record in build info and results when the tree has no .git (a copied checkout).",
)

# ---- run time ----
LOG_LEVEL = EnvVar(
    "DUALPATH_LOG_LEVEL", "info", choice("debug", "info", "warning", "error"),
    "Log level of the dualpath loggers.",
)

PLUGIN_CONFIG = EnvVar(
    "DUALPATH_PLUGIN_CONFIG", "", str,
    "JSON of dualpath.config.PluginConfig, set by `python -m dualpath.launch_server` for the "
    "SGLang processes it starts. Unset: the SGLang plugin registers no hooks (stock SGLang).",
)

NATIVE_IO = EnvVar(
    "DUALPATH_NATIVE_IO", "1", parse_bool,
    "Storage reads and writes of SGLang's page_first host pages go through the native block "
    "I/O (dualpath._C.read_blocks_page_first: a batch per GIL release; write_page_block: a "
    "block per GIL release); 0 uses the Python reader and writer, the reference (same checks "
    "and bytes; one GIL hand-over per system call).",
)

PD_CUDA_BACKEND = EnvVar(
    "DUALPATH_PD_CUDA_BACKEND", "cuda", choice("cuda", "cuda:kernel", "cuda:memcpy"),
    "The transfer backend our PD engine (--dualpath-pd-engine) moves device KV with: 'cuda' "
    "(pieces under 1 MiB by the batched kernel, larger ones by the copy engines), "
    "'cuda:kernel' (every piece by the kernel: SMs over NVLink, no copy engine) or "
    "'cuda:memcpy' (every piece by a copy engine). An experiment knob: 1 GB sends ran at "
    "48-61 instead of ~310 GB/s now and then on 2x H200 (8cde10f).",
)

# ---- test time (read by scripts/run_tests.sh) ----
TEST_SGLANG = EnvVar(
    "DUALPATH_TEST_SGLANG", "1", parse_bool,
    "scripts/run_tests.sh installs SGLang 0.5.17 without its GPU dependencies (the wheel with "
    "--no-deps, then test/requirements-sglang-cpu.txt) so that test/sglang_plugin runs; "
    "0 skips the install and those tests.",
)

ALL: tuple[EnvVar, ...] = (BUILD_CUDA, CUDA_ARCHS, BUILD_TYPE, BUILD_JOBS, GIT_SHA, LOG_LEVEL,
                           PLUGIN_CONFIG, NATIVE_IO, PD_CUDA_BACKEND, TEST_SGLANG)
