"""scripts/gpu_run.sh (the wrapper behind gpu_smoke.sh and gpu_router_pd.sh), run with a stand-in
module on the CPU: argument passing, exit status, and the compile-cache round trip."""

import json
import os
import signal
import subprocess
import tarfile
import time


def test_runs_module_with_out_and_caches(tmp_path, repo_root):
    site = tmp_path / "site"
    site.mkdir()
    (site / "probe_mod.py").write_text(
        "import json, os, sys\n"
        "out = sys.argv[sys.argv.index('--out') + 1]\n"
        "os.makedirs(os.path.join(os.environ['TRITON_CACHE_DIR'], 'k'), exist_ok=True)\n"
        "open(os.path.join(os.environ['TRITON_CACHE_DIR'], 'k', 'kernel.bin'), 'w').write('x')\n"
        "json.dump({'argv': sys.argv[1:], 'triton': os.environ['TRITON_CACHE_DIR']},"
        " open(os.path.join(out, 'summary.json'), 'w'))\n"
        "sys.exit(3 if '--fail' in sys.argv else 0)\n")
    (site / "env.sh").write_text(f'export PYTHONPATH="{site}"\n')
    out, cache, saved = tmp_path / "out", tmp_path / "jit", tmp_path / "jit.tar.xz"
    r = subprocess.run(["bash", str(repo_root / "scripts/gpu_run.sh"), "probe_mod", "--skip-setup",
                        "--target", str(site), "--out", str(out), "--cache-dir", str(cache),
                        "--save-cache", str(saved), "--x", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads((out / "summary.json").read_text())
    assert got["argv"][:2] == ["--out", str(out)] and got["argv"][-2:] == ["--x", "1"]
    assert got["triton"] == str(cache / "triton")
    with tarfile.open(saved) as t:
        assert "./triton/k/kernel.bin" in t.getnames()
    cache2 = tmp_path / "jit2"
    r = subprocess.run(["bash", str(repo_root / "scripts/gpu_run.sh"), "probe_mod", "--skip-setup",
                        "--target", str(site), "--out", str(out), "--cache-dir", str(cache2),
                        "--load-cache", str(saved), "--fail"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, "the module's exit status is the wrapper's"
    assert (cache2 / "triton/k/kernel.bin").read_text() == "x"


def test_missing_env_and_cache_are_clear_errors(tmp_path, repo_root):
    r = subprocess.run(["bash", str(repo_root / "scripts/gpu_run.sh"), "probe_mod", "--skip-setup",
                        "--target", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "env.sh missing" in r.stderr
    r = subprocess.run(["bash", str(repo_root / "scripts/gpu_run.sh"), "probe_mod", "--skip-setup",
                        "--load-cache", str(tmp_path / "nope.tar.xz"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_every_gpu_script_explains_itself_and_names_a_real_module(repo_root):
    """`--help` of each scripts/gpu_*.sh / bench_1p1d.sh prints its header, and the module it
    hands to gpu_run.sh imports (a renamed module would only fail on the GPU host)."""
    import importlib
    import re

    for script in sorted(repo_root.glob("scripts/*.sh")):
        text = script.read_text()
        m = re.search(r'gpu_run\.sh" (dualpath\.[\w.]+)', text)
        if not m:
            continue
        r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0 and len(r.stdout.splitlines()) >= 3, script.name
        mod = importlib.import_module(m.group(1))
        assert callable(getattr(mod, "main", None)), m.group(1)


def _probe(tmp_path, repo_root):
    """gpu_run.sh running a module that records its pid, sleeps, and cleans up on the way out."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "probe_mod.py").write_text(
        "import os, sys, time\n"
        "from dualpath.bench.servers import stop_servers_on_sigterm\n"
        "out = sys.argv[sys.argv.index('--out') + 1]\n"
        "stop_servers_on_sigterm()\n"
        "open(os.path.join(out, 'started'), 'w').write(str(os.getpid()))\n"
        "try:\n"
        "    time.sleep(60)\n"
        "finally:\n"
        "    open(os.path.join(out, 'cleaned_up'), 'w').close()\n")
    (site / "env.sh").write_text(f'export PYTHONPATH="{site}:{repo_root / "python"}"\n')
    out = tmp_path / "out"
    p = subprocess.Popen(["bash", str(repo_root / "scripts/gpu_run.sh"), "probe_mod",
                          "--skip-setup", "--target", str(site), "--out", str(out),
                          "--cache-dir", str(tmp_path / "jit")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (out / "started").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (out / "started").exists()
    time.sleep(0.2)  # the pid is written
    return p, out, int((out / "started").read_text())


def test_a_terminated_wrapper_lets_the_module_stop_its_servers(tmp_path, repo_root):
    """`timeout` sends TERM to the wrapper: the module must get it and clean up (it owns
    servers in their own sessions), and the wrapper reports the module's status."""
    p, out, _ = _probe(tmp_path, repo_root)
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 128 + signal.SIGTERM
    assert (out / "cleaned_up").exists(), "the module's finally blocks ran"


def test_an_interrupted_module_stops_although_bash_started_it_with_sigint_ignored(
        tmp_path, repo_root):
    """`pkill -INT -f 'python3 -m MODULE'` (a watchdog's stop): bash runs the module as a
    background job, which starts with SIGINT ignored; the module must still unwind."""
    p, out, pid = _probe(tmp_path, repo_root)
    os.kill(pid, signal.SIGINT)
    assert p.wait(30) != 0
    assert (out / "cleaned_up").exists(), "the module's finally blocks ran"
