"""The offline GPU bundle: its on-disk format, verification and installation.

A bundle is a directory holding ``manifest.json`` and the parts of one xz-compressed tar archive
(``<name>.tar.xz.000``, ``.001``, ...; split so each upload stays under a size cap). The archive
holds ``pkgs/<dist>/`` (one ``pip install --target`` tree per wheel, trimmed) and ``extras/``.
``scripts/make_gpu_bundle.py`` writes bundles; this module reads them.

This file uses the standard library only and runs as a script under the *target* interpreter
before dualpath is installed (``scripts/gpu_setup.sh`` calls it), so it can report a wrong Python
or torch by name. Keep it runnable on Python 3.8+:

    python3 python/dualpath/deploy/bundle.py install --bundle .bundle --target /tmp/site
    python3 python/dualpath/deploy/bundle.py verify --bundle .bundle
    python3 python/dualpath/deploy/bundle.py check-imports --target /tmp/site

Install semantics: packages of kind ``forced`` (SGLang's exact pins) are always installed and
shadow the host's copy (the target goes first on ``sys.path``); ``optional`` ones only where the
host lacks that distribution. The target directory is owned by the bundle: it is replaced on
every install and refused if it holds anything not written by a bundle install.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata as md
import importlib.util
import io
import json
import os
import shutil
import sys
import tarfile
import time

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MARKER = ".dualpath-bundle.json"  # written into an install target; marks it as ours
CHUNK = 1 << 20


class BundleError(Exception):
    """A problem with the bundle or the host, worded for the person running the install."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle: str) -> dict:
    path = os.path.join(bundle, MANIFEST)
    if not os.path.isfile(path):
        raise BundleError(
            f"no {MANIFEST} in {bundle!r}: build a bundle with `python3 scripts/make_gpu_bundle.py`"
            " on a machine with PyPI access and copy its output directory here")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest.get('format')!r} is not "
                          f"{FORMAT_VERSION}; rebuild it with this checkout's make_gpu_bundle.py")
    return manifest


def verify_parts(bundle: str, manifest: dict) -> list:
    """Return the part paths in order; raise naming every missing, short or corrupt part."""
    problems, paths = [], []
    for part in manifest["parts"]:
        path = os.path.join(bundle, part["name"])
        paths.append(path)
        if not os.path.isfile(path):
            problems.append(f"missing part {part['name']} ({part['bytes']} bytes)")
        elif os.path.getsize(path) != part["bytes"]:
            problems.append(f"part {part['name']} has {os.path.getsize(path)} bytes, "
                            f"expected {part['bytes']} (incomplete upload?)")
        elif sha256_file(path) != part["sha256"]:
            problems.append(f"part {part['name']} is corrupt: sha256 differs from the manifest")
    if problems:
        raise BundleError(f"bundle {bundle!r} is not complete:\n  " + "\n  ".join(problems))
    return paths


class ConcatReader(io.RawIOBase):
    """Read several files as one stream (the split archive, without joining it on disk)."""

    def __init__(self, paths):
        self._paths = list(paths)
        self._f = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            if self._f is None:
                if not self._paths:
                    return 0
                self._f = open(self._paths.pop(0), "rb")
            n = self._f.readinto(buf)
            if n:
                return n
            self._f.close()
            self._f = None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        super().close()


def _base_version(v: str) -> str:
    return v.split("+", 1)[0]


def check_host(manifest: dict) -> dict:
    """Check this interpreter and its torch against the bundle's target; raise on a mismatch."""
    target = manifest["target"]
    have_py = "{}.{}".format(*sys.version_info[:2])
    if have_py != target["python"]:
        raise BundleError(
            f"Python mismatch: {sys.executable} is Python {have_py}, but this bundle holds "
            f"cp{target['python'].replace('.', '')} wheels for Python {target['python']}. Run "
            f"the install with a Python {target['python']} interpreter (--python), or rebuild "
            f"the bundle for this one.")
    try:
        import torch  # noqa: F401  (the host's torch; never from the bundle)
    except ImportError as e:
        raise BundleError(
            f"torch mismatch: torch is not importable by {sys.executable} ({e}). This bundle "
            f"expects the host's torch {target['torch']} built for CUDA {target['cuda']}.") from e
    have_torch = _base_version(torch.__version__)
    have_cuda = getattr(torch.version, "cuda", None)
    if have_torch != target["torch"]:
        raise BundleError(
            f"torch mismatch: found torch {torch.__version__} ({os.path.dirname(torch.__file__)})"
            f", but this bundle needs torch {target['torch']} exactly: sglang-kernel's compiled "
            f"ops link that torch build's C++ symbols.")
    if (have_cuda or "").split(".")[0] != target["cuda"].split(".")[0]:
        raise BundleError(
            f"torch mismatch: torch {torch.__version__} is built for CUDA {have_cuda or 'none'}"
            f", but this bundle's kernels are built for CUDA {target['cuda']}.")
    return {"python": have_py, "torch": torch.__version__, "cuda": have_cuda}


def _installed_version(dist: str):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _safe_extract(tar: tarfile.TarFile, dest: str) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    for member in tar:  # older Pythons: refuse paths that leave dest
        name = os.path.normpath(member.name)
        if name.startswith("..") or os.path.isabs(name):
            raise BundleError(f"archive member {member.name!r} escapes the target directory")
        tar.extract(member, dest)


def _prepare_target(target: str) -> None:
    if os.path.isdir(target) and os.listdir(target):
        if not os.path.isfile(os.path.join(target, MARKER)):
            raise BundleError(
                f"target {target!r} is not empty and was not written by a bundle install; "
                f"choose an empty or new directory")
        shutil.rmtree(target)
    os.makedirs(target, exist_ok=True)


def install(bundle: str, target: str, log=print) -> dict:
    """Verify the bundle, check the host, then install into `target` (replaced if ours)."""
    t0 = time.time()
    manifest = read_manifest(bundle)
    host = check_host(manifest)
    parts = verify_parts(bundle, manifest)
    log(f"bundle ok: {len(parts)} part(s), {sum(p['bytes'] for p in manifest['parts'])} bytes; "
        f"host Python {host['python']}, torch {host['torch']} (CUDA {host['cuda']})")
    target = os.path.abspath(target)
    _prepare_target(target)
    with open(os.path.join(target, MARKER), "w") as f:  # first: an interrupted install stays ours
        json.dump({"state": "installing", "bundle": os.path.abspath(bundle)}, f)
    stage = target + ".stage"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        with ConcatReader(parts) as raw, tarfile.open(fileobj=io.BufferedReader(raw, CHUNK),
                                                      mode="r|xz") as tar:
            _safe_extract(tar, stage)
        t_extract = time.time() - t0
        used, skipped = [], []
        for pkg in manifest["packages"]:
            have = _installed_version(pkg["dist"])
            if pkg["kind"] == "optional" and have is not None:
                skipped.append(f"{pkg['dist']}=={have}")
                continue
            src = os.path.join(stage, "pkgs", pkg["dir"])
            if not os.path.isdir(src):
                raise BundleError(f"archive lacks pkgs/{pkg['dir']} listed in the manifest")
            shutil.copytree(src, target, dirs_exist_ok=True, symlinks=True)
            used.append(f"{pkg['dist']}=={pkg['version']}"
                        + (f" (shadows host {have})" if have and have != pkg["version"] else ""))
        extras = {}
        for extra in manifest.get("extras", []):
            dst = os.path.join(target, "_extras", extra["name"])
            shutil.copytree(os.path.join(stage, extra["path"]), dst, symlinks=True)
            extras[extra["name"]] = dst
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    record = {"state": "complete", "bundle": os.path.abspath(bundle),
              "archive_sha256": manifest["archive"]["sha256"],
              "installed": used, "skipped_host_has": skipped, "extras": extras,
              "host": host, "seconds": round(time.time() - t0, 1),
              "extract_seconds": round(t_extract, 1)}
    with open(os.path.join(target, MARKER), "w") as f:
        json.dump(record, f, indent=1)
    log(f"installed {len(used)} distribution(s) into {target} in {record['seconds']} s "
        f"(extract {record['extract_seconds']} s)")
    log("  from bundle: " + ", ".join(used))
    log("  host has (skipped): " + (", ".join(skipped) or "-"))
    return record


STACK_IMPORTS = (
    "torch", "triton", "transformers", "sgl_kernel", "flashinfer.sampling", "tvm_ffi", "xgrammar",
    "sglang.launch_server", "sglang.srt.managers.scheduler", "sglang.srt.mem_cache.hiradix_cache",
)
NIXL_IMPORTS = ("sglang.srt.disaggregation.nixl.conn",)  # when the bundle carried NIXL
PROJECT_IMPORTS = ("dualpath", "dualpath._C")


def default_imports(project: bool = True) -> list:
    mods = list(STACK_IMPORTS)
    if importlib.util.find_spec("nixl") is not None:
        mods += NIXL_IMPORTS
    return mods + (list(PROJECT_IMPORTS) if project else [])


def check_imports(modules, log=print) -> list:
    """Import each module; return the failures as 'module: error' strings."""
    failures = []
    for name in modules:
        t = time.time()
        try:
            mod = importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001  (SystemExit/OSError from native loads too)
            failures.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
            log(f"FAIL {name}: {type(e).__name__}: {str(e)[:300]}")
            continue
        ver = getattr(mod, "__version__", "")
        log(f"ok   {name:44s} {ver!s:16s} {time.time() - t:5.1f}s  {getattr(mod, '__file__', '')}")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Verify or install a DualPath offline GPU bundle.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("verify", help="check that every part is present and matches its sha256")
    p.add_argument("--bundle", default=".bundle")
    p = sub.add_parser("install", help="check the host, verify, and install into a directory")
    p.add_argument("--bundle", default=".bundle")
    p.add_argument("--target", required=True, help="directory to install into (put on PYTHONPATH)")
    p = sub.add_parser("check-imports", help="import the serving stack's modules")
    p.add_argument("--modules", help="comma-separated (default: the serving stack)")
    p.add_argument("--no-project", action="store_true", help="leave out dualpath itself")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "verify":
            manifest = read_manifest(args.bundle)
            verify_parts(args.bundle, manifest)
            print(f"bundle {args.bundle}: {len(manifest['parts'])} part(s) verified")
        elif args.cmd == "install":
            install(args.bundle, args.target)
        else:
            mods = (args.modules.split(",") if args.modules
                    else default_imports(project=not args.no_project))
            failures = check_imports([m for m in mods if m])
            if failures:
                print(f"{len(failures)} import(s) failed", file=sys.stderr)
                return 1
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
