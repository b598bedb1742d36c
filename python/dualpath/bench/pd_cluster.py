"""One prefill + one decode server (`python -m dualpath.launch_server`) and the DualPath router
on a 2-GPU host, as the GPU checks and benchmarks start them. Each server is its own storage
"node" (its own storage-NIC meter and cap); each writes its log into the run's folder. On a
larger host, cluster `slot` k uses GPUs 2k and 2k + 1 and its own ports, so several can be up
at once.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dualpath.bench.servers import ServerProcess

PRE_PORT, DEC_PORT, BOOT_PORT, ROUTER_PORT = 30010, 30020, 8998, 8000  # slot 0


def slot_ports(slot: int) -> tuple[int, int, int, int]:
    """(prefill, decode, bootstrap, router) ports of cluster `slot` (agents: server + 1000)."""
    if slot < 0:
        raise ValueError(f"cluster slot must be >= 0, got {slot}")
    return PRE_PORT + 100 * slot, DEC_PORT + 100 * slot, BOOT_PORT - slot, ROUTER_PORT + slot


@dataclass
class ClusterSpec:
    model: Path
    root: Path  # the store directory of this run
    dual_path: bool = False
    read_side: str = "pe"  # the router's --read-side
    snic_gbps: float = 6.25
    max_total_tokens: int = 32768
    mem_fraction: float = 0.5  # SGLang --mem-fraction-static (room for the pools above)
    hicache_ratio: float = 2.0
    decode_max_total_tokens: int | None = None  # None: max_total_tokens
    decode_hicache_ratio: float | None = None  # None: hicache_ratio (decode HiCache: dual path)
    buffer_gb: float | None = None  # the DE buffer (None: the plugin's default)
    decode_cuda_graph_max_bs: int = 0  # > 0: CUDA graphs on the decode up to this batch
    # the prefill's CUDA graph backend (SGLang 0.5.17: "breakable" captures the extend forward
    # in segments, attention eager); "disabled" = eager, as every run before session 16
    prefill_cuda_graph: str = "disabled"
    # Both GPUs visible to both servers (decode on --base-gpu-id 1), so NIXL's UCX can use CUDA
    # IPC over NVLink; with one GPU visible per process it stages KV through the host (measured
    # 3.8 GB/s on 2x H100, 2026-11-27) and the PD transfer, not storage, bounds a turn.
    share_gpus: bool = True
    pd_backend: str = "nixl"  # or "dualpath": our engine under SGLang's mooncake backend
    oracle: bool = False  # storage reads skipped (timing ceiling; outputs not meaningful)
    prefetch_queue: bool = True  # False: SGLang's prefetch admission (drop + recompute)
    h2d_kernel: str = "sglang"  # "ours": HiCache's host -> GPU load on dualpath.ops.copy_kv
    stack_sample: bool = False  # profile both schedulers: out/stacks_<role>.txt
    gil_monitor: bool = False  # both servers time their GIL hand-overs (/dualpath/stats 'gil')
    host_cache_tokens: int = -1  # prefill: host-only pages kept (-1: no limit)
    device_cache_tokens: int = -1  # prefill: unlocked GPU cache tokens kept (-1: no limit)
    refetch_host_hits: bool = False  # prefill: host-only prefix hits read from storage again
    async_page_indices: bool = False  # prefill: page indices without the forward wait
    extra: list[str] = field(default_factory=list)  # more SGLang flags for both servers
    slot: int = 0  # GPUs 2 slot (prefill) and 2 slot + 1 (decode), ports from slot_ports


def server(spec: ClusterSpec, role: str, out: Path) -> ServerProcess:
    pre, dec, boot, _ = slot_ports(spec.slot)
    port, gpu = (pre, "0") if role == "prefill" else (dec, "1")  # gpu: within the pair
    pair = (2 * spec.slot, 2 * spec.slot + 1)
    tokens, ratio = spec.max_total_tokens, spec.hicache_ratio
    if role == "decode":
        tokens = spec.decode_max_total_tokens or tokens
        ratio = spec.decode_hicache_ratio or ratio
    graphs = role == "decode" and spec.decode_cuda_graph_max_bs > 0
    if role == "prefill" and spec.prefill_cuda_graph != "disabled":
        graph_flags = ["--cuda-graph-backend-prefill", spec.prefill_cuda_graph,
                       "--disable-decode-cuda-graph"]
    elif graphs:
        graph_flags = ["--cuda-graph-max-bs", str(spec.decode_cuda_graph_max_bs)]
    else:
        graph_flags = ["--disable-cuda-graph"]
    flags = ["-m", "dualpath.launch_server", "--model-path", str(spec.model),
             "--load-format", "dummy", "--attention-backend", "triton",
             "--sampling-backend", "pytorch", "--page-size", "64",
             *graph_flags,
             "--host", "127.0.0.1", "--port", str(port),
             "--mem-fraction-static", str(spec.mem_fraction),
             "--max-total-tokens", str(tokens), "--hicache-ratio", str(ratio),
             "--hicache-write-policy", "write_through", "--enable-cache-report",
             "--enable-request-time-stats-logging",
             "--log-level", "info", "--disaggregation-mode", role,
             *(["--dualpath-pd-engine"] if spec.pd_backend == "dualpath"
               else ["--disaggregation-transfer-backend", spec.pd_backend]),
             "--dualpath-root", str(spec.root), "--dualpath-node", f"{role}-node",
             "--dualpath-snic-gbps", str(spec.snic_gbps), *spec.extra]
    if role == "prefill":
        flags += ["--disaggregation-bootstrap-port", str(boot)]
        if spec.host_cache_tokens >= 0:
            flags += ["--dualpath-host-cache-tokens", str(spec.host_cache_tokens)]
        if spec.device_cache_tokens >= 0:
            flags += ["--dualpath-device-cache-tokens", str(spec.device_cache_tokens)]
        if spec.refetch_host_hits:
            flags.append("--dualpath-refetch-host-hits")
        if spec.async_page_indices:
            flags.append("--dualpath-async-page-indices")
    if spec.dual_path:
        flags.append("--enable-dual-path")
    if spec.oracle:
        flags.append("--dualpath-oracle")
    if not spec.prefetch_queue:
        flags += ["--dualpath-prefetch-queue", "off"]
    if spec.buffer_gb is not None:
        flags += ["--dualpath-buffer-gb", str(spec.buffer_gb)]
    if spec.stack_sample:
        flags += ["--dualpath-stack-sample", str(out / f"stacks_{role}.txt")]
    if spec.gil_monitor:
        flags.append("--dualpath-gil-monitor")
    if spec.h2d_kernel != "sglang":
        flags += ["--dualpath-h2d-kernel", spec.h2d_kernel]
    if spec.share_gpus:
        flags += ["--base-gpu-id", gpu]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, pair)) if spec.share_gpus
           else str(pair[int(gpu)]),
           # CUDA numbers GPUs as nvidia-smi/NVML do (the samplers' indices). Session 18 ruled it
           # out as the cause of the ~10 s first PD request (NIXL's per-peer descriptor lists):
           # without it the first request still took 9.5 s.
           "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    return ServerProcess(role, flags, port, out / f"server_{role}.log", env=env)


def router(spec: ClusterSpec, out: Path) -> ServerProcess:
    pre, dec, boot, port = slot_ports(spec.slot)
    return ServerProcess("router", [
        "-m", "dualpath.router", "--prefill", f"http://127.0.0.1:{pre}", str(boot),
        "--decode", f"http://127.0.0.1:{dec}", "--port", str(port),
        "--read-side", spec.read_side, "--stats-interval-s", "0.5"],
        port, out / "router.log")


class PDCluster:
    """Start with `start()`, stop with `stop()` (also on errors: use it as a context manager)."""

    def __init__(self, spec: ClusterSpec, out: Path, health_timeout_s: float = 400):
        self.spec, self.out, self.health_timeout_s = spec, out, health_timeout_s
        self.pre = server(spec, "prefill", out)
        self.dec = server(spec, "decode", out)
        self.router = router(spec, out)
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return self.router.url

    @property
    def gpus(self) -> tuple[int, int]:
        """Host GPU indices of the prefill and the decode (as NVML numbers them)."""
        return 2 * self.spec.slot, 2 * self.spec.slot + 1

    def start(self) -> PDCluster:
        t0 = time.time()
        self.pre.start()
        self.dec.start()
        self.pre.wait_healthy(self.health_timeout_s)
        self.dec.wait_healthy(self.health_timeout_s)
        self.startup_s = round(time.time() - t0, 1)
        self.router.start()
        self.router.wait_healthy(60)
        time.sleep(1.5)  # the router learns the agents from the engines' stats
        return self

    def stop(self) -> None:
        for p in (self.router, self.dec, self.pre):
            p.stop()

    def __enter__(self) -> PDCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def agent_stats(server_port: int, timeout_s: float = 5.0) -> dict:
    """A server's agent stats (the agent listens on the server port + 1000), or {'error': ...}."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server_port + 1000}/dualpath/stats",
                                    timeout=timeout_s) as r:
            return json.loads(r.read())
    except OSError as e:
        return {"error": str(e)}


def run_args(ap, store_dir: str) -> None:
    """The options every 1P1D GPU check shares (besides --out and --model)."""
    ap.add_argument("--store-dir", default=store_dir)
    ap.add_argument("--health-timeout", type=float, default=400)
    ap.add_argument("--setup-s", type=float, help="set by scripts/gpu_run.sh")


def start_run(ap, argv, tag: str):
    """Parse, create --out, log to stdout with `tag`; returns (args, the result's header)."""
    import logging
    import sys

    from dualpath.bench.smoke import gpu_facts
    from dualpath.version import git_sha

    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format=f"[{tag} %(asctime)s] %(message)s",
                        datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    return args, {"date": time.strftime("%Y-%m-%d"), "git_sha": git_sha(), **gpu_facts(),
                  "model": args.model.name, "setup_s": args.setup_s}


def set_snic_cap(server_port: int, cap_gbps: float, timeout_s: float = 5.0) -> bool:
    """Change a server's emulated storage-NIC cap through its agent; False if it has none."""
    req = urllib.request.Request(f"http://127.0.0.1:{server_port + 1000}/dualpath/snic",
                                 data=json.dumps({"cap_gbps": cap_gbps}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status == 200
    except OSError:
        return False


def clear_blocks(root: Path) -> int:
    """Delete the KV blocks of a store directory (keeps its descriptor); return files removed.
    Between benchmark runs with fresh token ids: old blocks would never be read again."""
    n = 0
    for sub in Path(root).iterdir() if Path(root).is_dir() else ():
        if sub.is_dir() and len(sub.name) == 2:
            n += sum(1 for f in sub.rglob("*") if f.is_file())
            shutil.rmtree(sub, ignore_errors=True)
    return n


def path_bytes(stats: dict) -> dict:
    """The cumulative byte counters of one agent's stats."""
    st, paths = stats.get("storage") or {}, stats.get("paths") or {}
    return {"read_bytes": st.get("read_bytes", 0), "write_bytes": st.get("write_bytes", 0),
            "forwarded_bytes": paths.get("forwarded_bytes", 0),
            "received_bytes": paths.get("received_bytes", 0),
            "restore_from_buffer": paths.get("restore_from_buffer", 0),
            "h2d_bytes": paths.get("h2d_bytes", 0),
            # the host-pool prefetches (sglang_plugin/prefetch_queue.py): queued, started, revoked
            **{k: v for k, v in (stats.get("prefetch") or {}).items() if k.startswith("pf_")},
            **(stats.get("h2d") or {})}
