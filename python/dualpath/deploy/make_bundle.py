"""Build the offline GPU bundle (see bundle.py for the format) on a machine with PyPI access.

Steps: download cp312 manylinux wheels (no dependency resolution: the list below is the
resolved set), ``pip install --target`` each into its own tree, trim what is never loaded,
tar + xz the trees, split the archive into parts, write the manifest. The target host is
"Python 3.12 + torch 2.11.0 (CUDA 13) + triton": the wheels a bare host lacks are listed here.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dualpath.deploy import bundle as fmt

log = logging.getLogger("dualpath.make_bundle")

TARGET = {"python": "3.12", "torch": "2.11.0", "cuda": "13.0", "platform": "manylinux_x86_64"}
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")

# SGLang 0.5.17's exact pins (wheel METADATA) and what its import path needs: always installed,
# shadowing the host. transformers/tokenizers are forced because the GPU host's transformers
# 5.17.0 breaks `import sglang` ("'qwen3_asr' is already used by a Transformers config") and
# transformers 5.12.1 refuses the host's tokenizers 0.23.2.
FORCED = ("sglang==0.5.17 sglang-kernel==0.4.5 flashinfer-python==0.6.15.post1 "
          "apache-tvm-ffi==0.1.11 transformers==5.12.1 tokenizers==0.22.2 xgrammar==0.2.1").split()
# Installed only where the host lacks the distribution. Versions resolved as of SGLang 0.5.17's
# release (uv pip compile --exclude-newer 2026-08-09): e.g. newer fastapi imports opentelemetry.
OPTIONAL = """fastapi==0.141.1 starlette==1.6.0 uvicorn==0.52.1 python-multipart==0.0.32
pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.8.0 typing-inspection==0.4.2
annotated-doc==0.0.5 pyzmq==27.1.0 msgspec==0.21.1 orjson==3.11.9 pybase64==1.5.0
setproctitle==1.3.7 ipython==9.16.1 traitlets==5.16.1 ipython-pygments-lexers==1.1.1
pygments==2.20.0 stack-data==0.6.3 executing==2.2.1 asttokens==3.0.2 pure-eval==0.2.3
prompt-toolkit==3.0.53 wcwidth==0.8.2 openai==2.6.1 distro==1.9.0 jiter==0.16.0 httpx==0.28.1
httpcore==1.0.9 h11==0.16.0 anyio==4.14.2 sniffio==1.3.1 partial-json-parser==0.2.1.1.post7
compressed-tensors==0.18.0 loguru==0.7.3 gguf==0.19.0 dill==0.4.1 einops==0.8.2
jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.6.3 jsonschema-specifications==2025.9.1
soundfile==0.13.1 cffi==2.1.1 pycparser==3.0 prometheus-client==0.26.0 interegular==0.3.3
cuda-bindings==13.3.1 cuda-pathfinder==1.6.0 nvidia-ml-py==13.610.43 requests==2.32.5 xxhash==3.6.0
pybind11==3.0.1""".split()
# PD disaggregation without RDMA: NIXL with its UCX plugin.
NIXL = ["nixl==1.3.2", "nixl-cu13==1.3.2"]
BUNDLE_NAME = "dualpath-gpu-bundle"


@dataclass(frozen=True)
class Trim:
    dist: str
    pattern: str  # glob relative to the dist's tree
    reason: str


TRIMS = (
    Trim("sglang", "sglang/srt/*/_core*.so",
         "Rust extensions for SGLANG_RUST_SERVER, native gRPC and some multimodal paths; "
         "the Python HTTP server never loads them"),
    Trim("sglang", "sglang/multimodal_gen",
         "diffusion/multimodal generation runtime, not part of LLM serving"),
    Trim("sglang-kernel", "sgl_kernel/flash_ops.abi3.so",
         "FlashAttention-3 (1.1 GB): only for --attention-backend fa3; we run triton attention"),
    Trim("sglang-kernel", "sgl_kernel/sm100",
         "Blackwell (sm100) build of common_ops; an H100 (sm90) loads sgl_kernel/sm90"),
    Trim("sglang-kernel", "sgl_kernel/infllm_ops*.so",
         "InfLLM sparse attention, built for cp310 only and imported lazily"),
    Trim("sglang-kernel", "sgl_kernel/flashmla_ops.abi3.so",
         "FlashMLA, for MLA models (DeepSeek) only; imported lazily"),
    Trim("xgrammar", "xgrammar/lib",
         "static C++ archive (65 MB) for C++ users; Python loads the extension module"),
)
NIXL_KEEP_EXPLAIN = ("NIXL trimmed to the ELF closure of its Python bindings + the UCX plugin + "
                     "UCX transport modules: drops nixl_ep (117 MB, 3 torch builds) and the GDS, "
                     "OBJ/S3, Azure, GPUNETIO, INFINIA, LIBFABRIC and POSIX plugins")


def norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "_", dist).lower()


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    log.debug("+ %s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def _platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", TARGET["python"], "--implementation", "cp"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def find_wheel(dl: Path, spec: str) -> Path:
    name, version = spec.split("==")
    hits = sorted(p for p in dl.glob("*.whl")
                  if norm(p.name.split("-")[0]) == norm(name) and p.name.split("-")[1] == version)
    if not hits:
        raise fmt.BundleError(f"no wheel for {spec} in {dl} after download")
    return hits[0]


def _du(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def apply_trims(pkgs: Path) -> list[dict]:
    """Delete TRIMS; every pattern must match (a miss means the pins moved: fix the list)."""
    removed = []
    for t in TRIMS:
        hits = sorted(glob.glob(str(pkgs / norm(t.dist) / t.pattern)))
        if not hits:
            raise fmt.BundleError(f"trim pattern {t.dist}:{t.pattern} matched nothing")
        for h in hits:
            p = Path(h)
            removed.append({"dist": t.dist, "path": str(p.relative_to(pkgs / norm(t.dist))),
                            "bytes": _du(p), "reason": t.reason})
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return removed


def _elf_needed(path: str) -> list[str]:
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
    return [ln.split("[")[1].split("]")[0] for ln in out.splitlines() if "(NEEDED)" in ln]


def trim_nixl(tree: Path) -> dict:
    """Keep only the ELF closure of NIXL's bindings, UCX plugin and UCX transports."""
    if shutil.which("readelf") is None:
        raise fmt.BundleError("readelf (binutils) is needed to trim NIXL; or pass --no-nixl")
    by_name: dict[str, list[str]] = {}
    for p in tree.rglob("*.so*"):
        if p.is_file():
            by_name.setdefault(p.name, []).append(str(p))
    roots = (glob.glob(str(tree / "nixl_cu13/*.so"))
             + glob.glob(str(tree / ".nixl_cu13.mesonpy.libs/plugins/libplugin_UCX.so"))
             + [q for q in glob.glob(str(tree / "nixl_cu13.libs/ucx/*.so*"))
                if "perftest" not in q and not q.endswith(".la")])
    if not roots:
        raise fmt.BundleError(f"NIXL layout changed: no bindings/UCX plugin under {tree}")
    keep, todo = set(), list(roots)
    while todo:
        p = todo.pop()
        if p not in keep:
            keep.add(p)
            todo += [x for n in _elf_needed(p) for x in by_name.get(n, [])]
    before = _du(tree)
    for paths in by_name.values():
        for p in paths:
            if p not in keep:
                os.remove(p)
    for sub in ("nixl_ep_cu13", "bin", "include", "pkgconfig", "nixl_cu13.scripts"):
        shutil.rmtree(tree / sub, ignore_errors=True)
    for p in set(tree.rglob("*.la")) | set(tree.rglob("*perftest*")):
        p.unlink(missing_ok=True)
    return {"dist": "nixl-cu13", "path": "(see reason)", "bytes": before - _du(tree),
            "reason": NIXL_KEEP_EXPLAIN}


def stage_packages(dl: Path, stage: Path, specs: list[tuple[str, str]]) -> list[dict]:
    pkgs = stage / "pkgs"
    out = []
    for spec, kind in specs:
        whl = find_wheel(dl, spec)
        name, version = spec.split("==")
        _pip("install", "-q", "--no-deps", "--no-compile", *_platform_args(),
             "--target", str(pkgs / norm(name)), str(whl))
        shutil.rmtree(pkgs / norm(name) / "bin", ignore_errors=True)  # build-host shebangs
        out.append({"dist": name, "version": version, "kind": kind, "dir": norm(name),
                    "wheel": whl.name, "wheel_sha256": fmt.sha256_file(str(whl))})
    for cache in pkgs.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    return out


def stage_openssl(stage: Path) -> list[dict]:
    """OpenSSL headers for SGLang's HiCache hash JIT extension, used only if the host lacks them."""
    dirs = [d for d in ("/usr/include/openssl", "/usr/include/x86_64-linux-gnu/openssl")
            if os.path.isdir(d)]
    if not dirs:
        log.warning("no OpenSSL headers here (apt-get install libssl-dev): the bundle will not "
                    "carry them, so the GPU host needs its own")
        return []
    for d in dirs:
        shutil.copytree(d, stage / "extras/openssl-include" / os.path.relpath(d, "/usr/include"))
    return [{"name": "openssl-include", "path": "extras/openssl-include",
             "use": "C include path for the HiCache hash extension when the host has no "
                    "/usr/include/openssl/sha.h"}]


def pack(stage: Path, out: Path, name: str, part_bytes: int, xz_level: str = "-9e") -> dict:
    """tar | xz the stage deterministically and split the stream into parts in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{name}.tar.xz.*"):
        old.unlink()
    tar = subprocess.Popen(
        ["tar", "-C", str(stage), "--sort=name", "--mtime=@1700000000", "--owner=0", "--group=0",
         "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE)
    xz = subprocess.Popen(["xz", "-T0", xz_level, "-c"], stdin=tar.stdout, stdout=subprocess.PIPE)
    tar.stdout.close()
    whole, parts, idx = hashlib.sha256(), [], 0
    cur, cur_h, cur_n = None, None, 0
    while True:
        block = xz.stdout.read(fmt.CHUNK)
        if not block:
            break
        whole.update(block)
        while block:
            if cur is None:
                pname = f"{name}.tar.xz.{idx:03d}"
                cur, cur_h, cur_n = open(out / pname, "wb"), hashlib.sha256(), 0
                parts.append({"name": pname})
            take = block[: part_bytes - cur_n]
            cur.write(take)
            cur_h.update(take)
            cur_n += len(take)
            block = block[len(take):]
            if cur_n == part_bytes:
                cur.close()
                parts[-1].update(bytes=cur_n, sha256=cur_h.hexdigest())
                cur, idx = None, idx + 1
    if cur is not None:
        cur.close()
        parts[-1].update(bytes=cur_n, sha256=cur_h.hexdigest())
    if xz.wait() != 0 or tar.wait() != 0:
        raise fmt.BundleError("tar | xz failed")
    return {"archive": {"name": f"{name}.tar.xz", "bytes": sum(p["bytes"] for p in parts),
                        "sha256": whole.hexdigest()}, "parts": parts}


def make_manifest(packed: dict, packages: list[dict], extras: list[dict], trimmed: list[dict],
                  target: dict | None = None) -> dict:
    return {
        "format": fmt.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "target": target or TARGET, "sglang": FORCED[0].split("==")[1],
        **packed, "packages": packages, "extras": extras, "trimmed": trimmed,
    }


def write_manifest(out: Path, manifest: dict) -> None:
    (out / fmt.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def build(out: Path, cache: Path, *, nixl: bool, part_mib: int, keep_stage: bool) -> dict:
    dl, stage = cache / "dl", cache / "stage"
    dl.mkdir(parents=True, exist_ok=True)
    specs = [(s, "forced") for s in FORCED] + [(s, "optional") for s in OPTIONAL]
    specs += [(s, "forced") for s in NIXL] if nixl else []
    log.info("download %d wheels into %s (cached)", len(specs), dl)
    _pip("download", "-q", "--no-deps", *_platform_args(), "-d", str(dl), *[s for s, _ in specs])
    shutil.rmtree(stage, ignore_errors=True)
    log.info("install each wheel into its own tree under %s", stage / "pkgs")
    packages = stage_packages(dl, stage, specs)
    trimmed = apply_trims(stage / "pkgs")
    if nixl:
        trimmed.append(trim_nixl(stage / "pkgs" / norm("nixl-cu13")))
    extras = stage_openssl(stage)
    log.info("tar | xz -9e and split into parts of %d MiB", part_mib)
    packed = pack(stage, out, BUNDLE_NAME, part_mib << 20)
    manifest = make_manifest(packed, packages, extras, trimmed)
    write_manifest(out, manifest)
    if not keep_stage:
        shutil.rmtree(stage)
    return manifest
