"""`python -m dualpath.launch_server [--enable-dual-path] [--dualpath-*] <SGLang server flags>`

Starts a stock SGLang 0.5.17 server (`python -m sglang.launch_server`) with DualPath wired in:
- every server gets the DualPath block store as HiCache's L3 on a prefill (page_first host pool
  in shared memory, `wait_complete` prefetch), so the baseline and DualPath read the same store
  through the same metered storage NIC;
- with --enable-dual-path the plugin's hooks load in the scheduler processes, each server runs an
  agent (plans from the router, DE pulls, stats), and a decode server also gets the decode-side
  radix cache + HiCache on the same store (miss-only return: it restores the prefix it read
  itself and the prefill sends only the missed tokens' KV).
Without --enable-dual-path the command is stock SGLang PD + HiCache with our store at the
prefill: the baseline. Flags you give yourself (e.g. --hicache-storage-prefetch-policy) win over
the defaults added here. SGLang's own flags: `python -m sglang.launch_server --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from dualpath.config import PluginConfig

BACKEND = {"backend_name": "dualpath", "module_path": "dualpath.sglang_plugin.storage_backend",
           "class_name": "DualPathStorage", "interface_v1": 1}


def build_parser() -> argparse.ArgumentParser:
    d = PluginConfig()
    ap = argparse.ArgumentParser(
        prog="python -m dualpath.launch_server", description=__doc__.split("\n\n")[1],
        epilog="All other flags go to SGLang unchanged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--enable-dual-path", action="store_true",
                    help="serve the DE read path (off: the stock PD + HiCache baseline)")
    ap.add_argument("--dualpath-root", default=d.root, help="Full Block store directory")
    ap.add_argument("--dualpath-node", default=d.node,
                    help="node name of this server's storage NIC ('' = host name)")
    ap.add_argument("--dualpath-snic-gbps", type=float, default=d.snic_gbps,
                    help="emulated storage-NIC cap of this node, GB/s in each direction (reads "
                         "and writes each get it: full duplex; 0 = meter only)")
    ap.add_argument("--dualpath-agent-host", default=d.agent_host)
    ap.add_argument("--dualpath-agent-port", type=int, default=d.agent_port,
                    help="agent port (0 = SGLang --port + 1000)")
    ap.add_argument("--dualpath-buffer-gb", type=float, default=d.buffer_gb,
                    help="DE buffer size (GiB)")
    ap.add_argument("--dualpath-store-capacity-gb", type=float, default=d.store_capacity_gb,
                    help="cap of the store in GiB; past it the least recently used blocks "
                         "are deleted (0 = no cap)")
    ap.add_argument("--dualpath-forward-mode", choices=["auto", "shm", "tcp", "inline"],
                    default=d.forward_mode, help="how a DE writes KV into a prefill")
    ap.add_argument("--dualpath-forward-timeout-s", type=float, default=d.forward_timeout_s)
    ap.add_argument("--dualpath-io-threads", type=int, default=d.io_threads,
                    help="block reads/writes in flight per load")
    ap.add_argument("--dualpath-prefetch-io-threads", type=int, default=d.prefetch_io_threads,
                    help="storage loads (requests) in flight per server (SGLang: 1)")
    ap.add_argument("--dualpath-prefetch-queue", choices=["on", "off"],
                    default="on" if d.prefetch_queue else "off",
                    help="on: a storage prefetch that finds HiCache's prefetch budget taken "
                         "waits for it; off: SGLang's behaviour (dropped, prefix recomputed)")
    ap.add_argument("--dualpath-host-cache-tokens", type=int, default=d.host_cache_tokens,
                    help="prefill: host-only prefix pages the HiCache host pool may keep (LRU "
                         "beyond it evicted; -1 = no limit): DRAM as a staging buffer, for "
                         "scaled-down benchmarks")
    ap.add_argument("--dualpath-device-cache-tokens", type=int, default=d.device_cache_tokens,
                    help="prefill: unlocked prefix tokens the GPU radix cache may keep (LRU "
                         "beyond it demoted to the host pool; -1 = no limit; 0 = HBM holds "
                         "only requests in flight, as the paper's PE): for benchmarks where "
                         "every hit must come from storage")
    ap.add_argument("--dualpath-refetch-host-hits", action="store_true",
                    help="prefill, benchmarks: a prefix matched in the host pool only is read "
                         "from storage again, as if DRAM did not hold it (the paper's setting); "
                         "a read of pages whose storage write is still in flight waits for it")
    ap.add_argument("--dualpath-async-page-indices", action="store_true",
                    help="prefill: read KV page indices without waiting for a forward "
                         "(side-stream copies): a finished request's last chunk, and SGLang's "
                         "early send of a cached prefix, deferred until its copy is done")
    ap.add_argument("--dualpath-switch-interval-ms", type=float, default=d.switch_interval_ms,
                    help="GIL switch interval of the server's processes (Python: 5 ms): how "
                         "long a storage-read thread may wait for the GIL behind the "
                         "scheduler thread after each syscall")
    ap.add_argument("--dualpath-h2d-kernel", choices=["sglang", "ours"], default=d.h2d_kernel,
                    help="HiCache's host -> GPU prefix load (page_first host pool): SGLang's "
                         "kernel or ours (dualpath.ops.copy_kv)")
    ap.add_argument("--dualpath-pd-engine", action="store_true",
                    help="move PD KV with our transfer engine under SGLang's Mooncake backend "
                         "(sets --disaggregation-transfer-backend mooncake; no Mooncake "
                         "library needed; device KV across GPUs of one host)")
    ap.add_argument("--dualpath-print", action="store_true",
                    help="print the environment and the SGLang command this would run, and "
                         "exit: to start the server with SGLang's own launcher (any launcher "
                         "works: the plugin loads wherever DUALPATH_PLUGIN_CONFIG is set)")
    ap.add_argument("--dualpath-stack-sample", default=d.stack_sample, metavar="FILE",
                    help="sample the scheduler thread's Python stack into FILE (folded stacks, "
                         "'{pid}' = process id; summarize with python -m dualpath.bench.stacks)")
    ap.add_argument("--dualpath-stack-sample-hz", type=float, default=d.stack_sample_hz)
    ap.add_argument("--dualpath-gil-monitor", action="store_true",
                    help="measure how long the server's threads wait for the GIL (stalls, GC "
                         "pauses, the scheduler's place at a stall's end): 'gil' in "
                         "/dualpath/stats, a log line per stall of 50 ms or more")
    ap.add_argument("--dualpath-oracle", action="store_true",
                    help="benchmark ceiling: skip storage reads, report them done (outputs are "
                         "meaningless)")
    return ap


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _has(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def sglang_args(ours: argparse.Namespace, rest: list[str]) -> tuple[list[str], PluginConfig]:
    """SGLang's argv and the plugin config for one server."""
    mode = _flag_value(rest, "--disaggregation-mode") or "null"
    if mode not in ("null", "prefill", "decode"):
        raise SystemExit(f"error: --disaggregation-mode {mode!r}: use prefill or decode")
    port = int(_flag_value(rest, "--port") or 30000)
    cfg = PluginConfig(
        enable_dual_path=ours.enable_dual_path, root=ours.dualpath_root,
        node=ours.dualpath_node or socket.gethostname(), snic_gbps=ours.dualpath_snic_gbps,
        agent_host=ours.dualpath_agent_host, agent_port=ours.dualpath_agent_port or port + 1000,
        buffer_gb=ours.dualpath_buffer_gb, store_capacity_gb=ours.dualpath_store_capacity_gb,
        forward_mode=ours.dualpath_forward_mode,
        forward_timeout_s=ours.dualpath_forward_timeout_s, io_threads=ours.dualpath_io_threads,
        role=mode if mode != "null" else "", oracle=ours.dualpath_oracle,
        prefetch_io_threads=ours.dualpath_prefetch_io_threads,
        prefetch_queue=ours.dualpath_prefetch_queue == "on", pd_engine=ours.dualpath_pd_engine,
        stack_sample=ours.dualpath_stack_sample, stack_sample_hz=ours.dualpath_stack_sample_hz,
        gil_monitor=ours.dualpath_gil_monitor,
        host_cache_tokens=ours.dualpath_host_cache_tokens,
        device_cache_tokens=ours.dualpath_device_cache_tokens,
        switch_interval_ms=ours.dualpath_switch_interval_ms,
        refetch_host_hits=ours.dualpath_refetch_host_hits,
        async_page_indices=ours.dualpath_async_page_indices, h2d_kernel=ours.dualpath_h2d_kernel)
    if cfg.enable_dual_path and mode == "null":
        raise SystemExit("error: --enable-dual-path needs --disaggregation-mode prefill or decode")
    out = list(rest)
    if cfg.pd_engine:
        if mode == "null":
            raise SystemExit("error: --dualpath-pd-engine needs --disaggregation-mode prefill or "
                             "decode")
        backend = _flag_value(out, "--disaggregation-transfer-backend")
        if backend is None:
            out += ["--disaggregation-transfer-backend", "mooncake"]
        elif backend != "mooncake":
            raise SystemExit(f"error: --dualpath-pd-engine runs under SGLang's mooncake PD "
                             f"backend, not {backend!r}")
    wants_store = mode == "prefill" or (mode == "decode" and cfg.enable_dual_path)
    if not wants_store:
        return out, cfg
    if _has(out, "--hicache-storage-backend"):
        if _flag_value(out, "--hicache-storage-backend") != "dynamic" or "dualpath" not in (
                _flag_value(out, "--hicache-storage-backend-extra-config") or ""):
            raise SystemExit("error: DualPath serves HiCache's L3 itself: drop "
                             "--hicache-storage-backend (use --dualpath-root for the store)")
    else:
        extra = {**BACKEND, "root": cfg.root, "node": cfg.node, "allocator": "shm",
                 "io_threads": cfg.io_threads}
        if cfg.snic_gbps:
            extra["snic_gbps"] = cfg.snic_gbps
        if cfg.store_capacity_gb:
            extra["capacity_gb"] = cfg.store_capacity_gb
        if cfg.oracle:
            extra["oracle"] = True
        out += ["--hicache-storage-backend", "dynamic",
                "--hicache-storage-backend-extra-config", json.dumps(extra)]
    defaults = [("--enable-hierarchical-cache", None), ("--hicache-mem-layout", "page_first"),
                ("--hicache-storage-prefetch-policy", "wait_complete")]
    if mode == "decode":
        defaults.append(("--disaggregation-decode-enable-radix-cache", None))
    for flag, value in defaults:
        if not _has(out, flag):
            out += [flag] if value is None else [flag, value]
    layout = _flag_value(out, "--hicache-mem-layout")
    if layout != "page_first":
        raise SystemExit(f"error: the DualPath store needs --hicache-mem-layout page_first, "
                         f"not {layout!r}")
    return out, cfg


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = build_parser().parse_known_args(argv)
    args, cfg = sglang_args(ours, rest)
    if ours.dualpath_print:
        import shlex

        print(f"DUALPATH_PLUGIN_CONFIG={shlex.quote(cfg.to_json())} "
              f"{shlex.quote(sys.executable)} -m sglang.launch_server "
              f"{' '.join(shlex.quote(a) for a in args)}")
        return
    os.environ["DUALPATH_PLUGIN_CONFIG"] = cfg.to_json()
    from dualpath.models import ensure_unpacked

    for flag in ("--model-path", "--tokenizer-path"):
        path = _flag_value(args, flag)
        if path and os.path.isdir(path):
            ensure_unpacked(path)  # our shipped model dirs keep tokenizer.json xz-compressed
    print(f"dualpath.launch_server: dual path {'ON' if cfg.enable_dual_path else 'off'} "
          f"(role {cfg.role or '-'}, node {cfg.node}, storage-NIC cap "
          f"{cfg.snic_gbps or 'none'} GB/s, agent :{cfg.agent_port}); "
          f"sglang args: {' '.join(args)}", flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "sglang.launch_server", *args])


if __name__ == "__main__":
    main()
