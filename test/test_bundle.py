"""The offline bundle: pack/split, verification, host checks and install through gpu_setup.sh.

Bundles here are small fakes built by the real packer (make_bundle.pack) so that every check
runs without the 380 MB SGLang wheels; the fake host torch is a module on a wrapper's PYTHONPATH.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dualpath.deploy import bundle as fmt
from dualpath.deploy import make_bundle

PY = "{}.{}".format(*sys.version_info[:2])
PART = 64 << 10


def _dist(pkgs: Path, dist: str, version: str, files: dict[str, bytes]) -> dict:
    tree = pkgs / make_bundle.norm(dist)
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    info = tree / f"{make_bundle.norm(dist)}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    return {"dist": dist, "version": version, "dir": make_bundle.norm(dist)}


def make_fake_bundle(root: Path, target_python: str = PY, torch: str = "2.11.0") -> Path:
    stage, out = root / "stage", root / "bundle"
    pkgs = stage / "pkgs"
    packages = [
        {**_dist(pkgs, "fake-forced", "1.0", {"fake_forced/__init__.py": b"X = 1\n",
                                               # incompressible, so the archive needs 3+ parts
                                               "fake_forced/blob.bin": os.urandom(150_000)}),
         "kind": "forced"},
        {**_dist(pkgs, "fake-opt", "2.0", {"fake_opt/__init__.py": b"Y = 2\n"}),
         "kind": "optional"},
        {**_dist(pkgs, "pytest", "0.0.1", {"not_pytest.py": b""}), "kind": "optional"},
    ]
    (stage / "extras/hello").mkdir(parents=True)
    (stage / "extras/hello/readme.txt").write_text("hi")
    extras = [{"name": "hello", "path": "extras/hello", "use": "test"}]
    packed = make_bundle.pack(stage, out, make_bundle.BUNDLE_NAME, PART, xz_level="-1")
    target = {"python": target_python, "torch": torch, "cuda": "13.0", "platform": "x"}
    make_bundle.write_manifest(out, make_bundle.make_manifest(packed, packages, extras, [],
                                                              target=target))
    return out


@pytest.fixture
def fake_python(tmp_path):
    """An interpreter whose `import torch` finds a fake torch of the given version (or none)."""

    def make(torch_version: str | None, cuda: str = "13.0") -> str:
        site = tmp_path / f"fake-torch-{torch_version}"
        if torch_version:
            (site / "torch").mkdir(parents=True, exist_ok=True)
            (site / "torch/__init__.py").write_text(
                f"__version__ = {torch_version!r}\nclass version:\n    cuda = {cuda!r}\n")
        else:
            (site / "torch").mkdir(parents=True, exist_ok=True)
            (site / "torch/__init__.py").write_text("raise ImportError('no torch here')\n")
        wrapper = tmp_path / f"python-{torch_version}"
        wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{sys.executable}" "$@"\n')
        wrapper.chmod(0o755)
        return str(wrapper)

    return make


def gpu_setup(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo_root / "scripts/gpu_setup.sh"), "--no-project",
                           "--no-check", *args], capture_output=True, text=True, timeout=120)


def test_pack_splits_into_verified_parts(tmp_path):
    out = make_fake_bundle(tmp_path)
    m = fmt.read_manifest(str(out))
    assert len(m["parts"]) >= 3
    assert all(p["bytes"] <= PART for p in m["parts"][:-1])
    assert all(p["bytes"] == PART for p in m["parts"][:-1])
    assert sum(p["bytes"] for p in m["parts"]) == m["archive"]["bytes"]
    assert len(fmt.verify_parts(str(out), m)) == len(m["parts"])


def test_install_places_forced_and_missing_optional(tmp_path, repo_root, fake_python):
    out = make_fake_bundle(tmp_path)
    target = tmp_path / "site"
    r = gpu_setup(repo_root, "--bundle", str(out), "--target", str(target),
                  "--python", fake_python("2.11.0+cu130"))
    assert r.returncode == 0, r.stderr + r.stdout
    assert (target / "fake_forced/blob.bin").stat().st_size == 150_000
    assert (target / "fake_opt/__init__.py").exists()
    assert not (target / "not_pytest.py").exists(), "host has pytest: optional copy skipped"
    assert (target / "_extras/hello/readme.txt").read_text() == "hi"
    record = json.loads((target / fmt.MARKER).read_text())
    assert any(s.startswith("pytest==") for s in record["skipped_host_has"])
    env_sh = (target / "env.sh").read_text()
    assert f'export PYTHONPATH="{target}' in env_sh and "HF_HUB_OFFLINE=1" in env_sh
    # a second install replaces the target it owns
    (target / "stale.py").write_text("")
    r = gpu_setup(repo_root, "--bundle", str(out), "--target", str(target),
                  "--python", fake_python("2.11.0+cu130"))
    assert r.returncode == 0, r.stderr
    assert not (target / "stale.py").exists()


def test_missing_part_is_reported_by_name(tmp_path, repo_root, fake_python):
    out = make_fake_bundle(tmp_path)
    missing = sorted(out.glob("*.tar.xz.*"))[1]
    missing.unlink()
    r = gpu_setup(repo_root, "--bundle", str(out), "--target", str(tmp_path / "site"),
                  "--python", fake_python("2.11.0"))
    assert r.returncode == 2
    assert f"missing part {missing.name}" in r.stderr
    assert not (tmp_path / "site").exists(), "nothing is installed from an incomplete bundle"


def test_corrupt_and_short_parts_are_reported(tmp_path, repo_root, fake_python):
    out = make_fake_bundle(tmp_path)
    first, second = sorted(out.glob("*.tar.xz.*"))[:2]
    data = bytearray(first.read_bytes())
    data[100] ^= 0xFF
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:-10])
    r = gpu_setup(repo_root, "--bundle", str(out), "--target", str(tmp_path / "site"),
                  "--python", fake_python("2.11.0"))
    assert r.returncode == 2
    assert f"part {first.name} is corrupt" in r.stderr
    assert f"part {second.name} has" in r.stderr and "incomplete upload" in r.stderr


def test_wrong_python_is_named(tmp_path, repo_root, fake_python):
    other = f"3.{sys.version_info[1] + 1}"
    out = make_fake_bundle(tmp_path, target_python=other)
    r = gpu_setup(repo_root, "--bundle", str(out), "--target", str(tmp_path / "site"),
                  "--python", fake_python("2.11.0"))
    assert r.returncode == 2
    assert "Python mismatch" in r.stderr and f"Python {PY}" in r.stderr and other in r.stderr


@pytest.mark.parametrize("have,cuda,expect", [
    ("2.13.0+cpu", None, "found torch 2.13.0+cpu"),
    ("2.11.0+cu126", "12.6", "built for CUDA 12.6"),
    (None, None, "torch is not importable"),
])
def test_wrong_torch_is_named(tmp_path, repo_root, fake_python, have, cuda, expect):
    out = make_fake_bundle(tmp_path)
    r = gpu_setup(repo_root, "--bundle", str(out), "--target", str(tmp_path / "site"),
                  "--python", fake_python(have, cuda=cuda))
    assert r.returncode == 2
    assert "torch mismatch" in r.stderr and expect in r.stderr and "2.11.0" in r.stderr


def test_refuses_a_target_it_does_not_own(tmp_path, repo_root, fake_python):
    out = make_fake_bundle(tmp_path)
    target = tmp_path / "mine"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    r = gpu_setup(repo_root, "--bundle", str(out), "--target", str(target),
                  "--python", fake_python("2.11.0"))
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (target / "precious.txt").read_text() == "keep me"


def test_no_bundle_explains_how_to_build_one(tmp_path, repo_root, fake_python):
    r = gpu_setup(repo_root, "--bundle", str(tmp_path / "nothing"), "--target",
                  str(tmp_path / "site"), "--python", fake_python("2.11.0"))
    assert r.returncode == 2 and "make_gpu_bundle.py" in r.stderr


def test_check_imports_reports_failures(capsys):
    failures = fmt.check_imports(["json", "definitely_not_a_module_xyz"], log=lambda *_: None)
    assert len(failures) == 1 and failures[0].startswith("definitely_not_a_module_xyz:")


def test_trim_patterns_must_match(tmp_path):
    (tmp_path / "sglang").mkdir()
    with pytest.raises(fmt.BundleError, match="matched nothing"):
        make_bundle.apply_trims(tmp_path)


def test_every_trim_is_documented(repo_root):
    doc = (repo_root / "docs/gpu-bundle.md").read_text()
    for t in make_bundle.TRIMS:
        shown = t.pattern.rstrip("/")
        assert f"`{shown}" in doc, f"docs/gpu-bundle.md does not explain the trim {t.pattern}"


def test_install_into_an_existing_venv(tmp_path, repo_root):
    out = make_fake_bundle(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin/python"
    site = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True).stdout.strip())
    (site / "torch").mkdir()
    (site / "torch/__init__.py").write_text(
        "__version__ = '2.11.0+cu130'\nclass version:\n    cuda = '13.0'\n")
    r = gpu_setup(repo_root, "--bundle", str(out), "--venv", str(venv))
    assert r.returncode == 0, r.stderr + r.stdout
    code = "import fake_forced, fake_opt, sys; print(fake_forced.__file__)"
    res = subprocess.run([str(vpy), "-c", code], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(str(venv / "dualpath-bundle"))
    assert f'source "{venv}/bin/activate"' in (venv / "dualpath-bundle/env.sh").read_text()


def test_venv_without_python_is_refused(tmp_path, repo_root):
    r = gpu_setup(repo_root, "--bundle", str(tmp_path), "--venv", str(tmp_path / "nope"))
    assert r.returncode == 2 and "has no bin/python" in r.stderr


def test_interrupted_install_can_be_replaced(tmp_path, repo_root, fake_python):
    out = make_fake_bundle(tmp_path)
    target = tmp_path / "site"
    target.mkdir()
    (target / fmt.MARKER).write_text('{"state": "installing"}')  # what a crash leaves behind
    (target / "half_copied.py").write_text("")
    r = gpu_setup(repo_root, "--bundle", str(out), "--target", str(target),
                  "--python", fake_python("2.11.0"))
    assert r.returncode == 0, r.stderr
    assert json.loads((target / fmt.MARKER).read_text())["state"] == "complete"
    assert not (target / "half_copied.py").exists()
