"""Start, health-check and stop SGLang server processes for smoke tests and benchmarks.

Each server runs in its own process group with its output in a log file; `stop()` ends the whole
group (SGLang's scheduler and detokenizer are child processes). Used from one thread.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# The GPU host forbids NVLink multicast (it can take shared GPUs out of service); it costs
# nothing elsewhere, so every server we start runs with it off.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}


class ServerError(RuntimeError):
    pass


def _exit_on_sigterm(signum, frame):
    # once: a second SIGTERM (a watchdog's `pkill -f` plus a parent forwarding its own) must not
    # interrupt the `finally`s that are stopping the servers
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def stop_servers_on_sigterm() -> None:
    """Make SIGTERM (e.g. from `timeout`) unwind the stack like Ctrl-C, so the `with` blocks and
    `finally`s that own servers stop them: servers run in their own sessions and outlive a
    killed parent otherwise (then hold the GPU and the ports of the next run). Only from the
    main thread, and only where nobody set a handler of their own. SIGINT too where it arrived
    ignored: a non-interactive shell starts `cmd &` with SIGINT ignored (scripts/gpu_run.sh
    does), and then neither Ctrl-C nor `kill -INT` would stop the run."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def http_status(url: str, timeout: float = 3.0) -> int:
    """HTTP status of a GET, or 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


@dataclass
class ServerProcess:
    name: str
    args: list[str]  # full command line after the interpreter, e.g. ["-m", "sglang.launch_server"]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    python: str = sys.executable
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerProcess:
        if http_status(self.url + "/health") != 0:
            raise ServerError(f"{self.name}: something already answers on {self.url}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **NO_MULTICAST_ENV, **self.env}
        stop_servers_on_sigterm()
        log.info("start %s: %s %s", self.name, self.python, " ".join(self.args))
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([self.python, *self.args], stdout=out,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.started_at = time.time()
        return self

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_healthy(self, timeout_s: float) -> float:
        """Block until GET /health is 200; return seconds since start. Raise if it dies or hangs."""
        assert self.proc is not None, "start() first"
        while True:
            if http_status(self.url + "/health") == 200:
                self.startup_s = time.time() - self.started_at
                log.info("%s healthy after %.1f s", self.name, self.startup_s)
                return self.startup_s
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode} before it was "
                                  f"healthy; log {self.log_path}:\n{self.log_tail()}")
            if time.time() - self.started_at > timeout_s:
                raise ServerError(f"{self.name} not healthy after {timeout_s:.0f} s; log "
                                  f"{self.log_path}:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM for %.0f s: SIGKILL", self.name, grace_s)
        try:  # children that outlive the leader
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
