"""One frozen configuration dataclass per component. CLI defaults are read from these fields;
invalid values raise in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ReadSideMode = Literal["shorter", "split", "pe", "de"]


@dataclass(frozen=True)
class SchedulerConfig:
    """The global scheduler (paper §6, Algorithm 1, Appendix A.4)."""

    alpha_window_s: float = 3.0
    """alpha = the tokens one node can read from storage in this many seconds."""
    beta_window_s: float = 5.0
    """beta = the tokens one prefill GPU can process in this many seconds."""
    initial_read_tokens_per_s: float = 100_000.0
    """Per-node storage read rate (tokens/s) assumed until engines report measured rates.
    100k tokens/s = 13 GB/s at 128 KiB/token (Llama-3.1-8B bf16)."""
    initial_prefill_tokens_per_s: float = 20_000.0
    """Per-GPU prefill rate (tokens/s) assumed until engines report measured rates."""
    rate_ewma: float = 0.2
    """Weight of the newest sample in the measured-rate moving averages (0, 1]."""
    de_high_token_factor: float = 1.05
    """Z = factor x mean tokens per decode engine (paper: 1.05)."""
    read_side: ReadSideMode = "shorter"
    """'shorter': the side whose node read queue is shorter (paper); 'split': divide one request's
    blocks between both sides by expected finish time (beyond the paper); 'pe': prefill side only
    (the paper's Basic baseline); 'de': decode side only (an ablation, and how tests force the
    DE path)."""
    block_tokens: int = 64
    """Granularity of a split read (tokens per KV block = SGLang page size)."""

    def __post_init__(self) -> None:
        for name in ("alpha_window_s", "beta_window_s", "initial_read_tokens_per_s",
                     "initial_prefill_tokens_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SchedulerConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.rate_ewma <= 1:
            raise ValueError(f"SchedulerConfig.rate_ewma must be in (0, 1], got {self.rate_ewma}")
        if self.de_high_token_factor < 1:
            raise ValueError("SchedulerConfig.de_high_token_factor must be >= 1")
        if self.read_side not in ("shorter", "split", "pe", "de"):
            raise ValueError(f"SchedulerConfig.read_side: unknown mode {self.read_side!r}")
        if self.block_tokens < 1:
            raise ValueError("SchedulerConfig.block_tokens must be >= 1")


RouterPolicy = Literal["dualpath", "round_robin", "random"]


@dataclass(frozen=True)
class RouterConfig:
    """The HTTP router in front of prefill and decode servers."""

    host: str = "127.0.0.1"
    port: int = 8000
    policy: RouterPolicy = "dualpath"
    """'dualpath': the global scheduler; 'round_robin' / 'random': the paper's Basic pairs."""
    max_queue: int = 4096
    """Requests allowed to wait for an engine pair; beyond it the router answers 503."""
    retry_after_s: int = 2
    """Retry-After sent with a 503."""
    max_body_bytes: int = 64 << 20
    """Larger request bodies get 413."""
    max_prompt_tokens: int = 1 << 20
    """Prompts estimated longer than this get 413."""
    max_attempts: int = 2
    """Engine pairs tried for one request when an engine fails before answering."""
    request_timeout_s: float = 3600.0
    connect_timeout_s: float = 5.0
    queue_timeout_s: float = 600.0
    """Longest wait for an engine pair before the request gets 503."""
    stats_interval_s: float = 1.0
    """Period of the engines' stats and health polls."""
    chars_per_token: float = 4.0
    """Prompt-length estimate for text prompts (the router does not tokenize)."""
    default_max_new_tokens: int = 128
    """Output length assumed when a request does not say (SGLang's default)."""
    hit_estimate: Literal["prompt", "none"] = "prompt"
    """Stored-prefix tokens assumed for a request (the router does not see the store): 'prompt'
    = the prompt rounded down to whole blocks (an upper bound: agentic turns hit ~95%);
    'none' = 0 (every read is planned on the PE side)."""

    warm_pairs: bool = True
    """Send one 1-token request through each new prefill/decode pair before /health reports
    ready (router/warmup.py): a pair's first PD request pays its transfer backend's set-up
    (SGLang's NIXL: ~10 s for a 300K-token decode pool on H100)."""
    warm_timeout_s: float = 300.0
    """How long a pair's warm-up is retried before it is given up on (with a warning)."""

    def __post_init__(self) -> None:
        if self.hit_estimate not in ("prompt", "none"):
            raise ValueError(f"RouterConfig.hit_estimate: unknown mode {self.hit_estimate!r}")
        if self.policy not in ("dualpath", "round_robin", "random"):
            raise ValueError(f"RouterConfig.policy: unknown policy {self.policy!r}")
        for name in ("max_queue", "max_body_bytes", "max_prompt_tokens", "max_attempts",
                     "default_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"RouterConfig.{name} must be >= 1")
        for name in ("request_timeout_s", "connect_timeout_s", "queue_timeout_s",
                     "stats_interval_s", "chars_per_token", "warm_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RouterConfig.{name} must be > 0")
        if not 0 < self.port < 65536:
            raise ValueError(f"RouterConfig.port out of range: {self.port}")


ForwardMode = Literal["auto", "shm", "tcp", "inline"]


@dataclass(frozen=True)
class PluginConfig:
    """The SGLang plugin in each server (`python -m dualpath.launch_server --dualpath-*`)."""

    enable_dual_path: bool = False
    """Serve the DE read path: the decode's agent reads stored KV and forwards it to prefills,
    and a decode keeps the prefix KV it read (miss-only return). Off: stock SGLang PD + HiCache
    with the DualPath store at the prefill (the baseline)."""
    root: str = "/dev/shm/dualpath-kv"
    """Directory of the shared Full Block store (a 3FS/NFS mount in production)."""
    node: str = ""
    """This server's node name for the storage-NIC meter ('' = the host name)."""
    snic_gbps: float = 0.0
    """Emulated storage-NIC cap of this node in GB/s (0 = no cap: metering only)."""
    agent_host: str = "127.0.0.1"
    """Address the agent (in the scheduler process) listens on; peers and the router use it."""
    agent_port: int = 0
    """Agent port (0 = the server's --port + 1000)."""
    buffer_gb: float = 4.0
    """DE buffer: KV blocks the agent keeps after reading them, in GiB."""
    store_capacity_gb: float = 0.0
    """Cap of the store directory in GiB (0 = no cap): past it, this server deletes the least
    recently used blocks down to 90% (storage/store.py). Each server that writes counts its own
    writes between rescans, so a store shared by two writers can pass the cap by what the
    other wrote since its last eviction. For hosts whose store is tmpfs (/dev/shm) and runs
    that write more than it holds (online runs: every arriving agent adds its context)."""
    forward_mode: ForwardMode = "auto"
    """How the DE writes into the PE: 'shm' = one-sided copy into the PE's host pool mapped from
    shared memory (same host); 'tcp' = one-sided writes into the pool over TCP by the transfer
    engine (any host); 'inline' = bytes in the HTTP reply; 'auto' = shm for a decode agent on
    this host with a shared-memory pool, else tcp."""
    forward_timeout_s: float = 30.0
    """A DE forward not done by then is abandoned: the PE reads those blocks itself."""
    plan_ttl_s: float = 600.0
    """Plans whose request never arrives are dropped after this long."""
    io_threads: int = 8
    prefetch_io_threads: int = 8
    """Storage loads (requests) in flight per server; SGLang runs one (a launcher hook, so the
    baseline gets the same). A decode-side pull holds one of them for its whole read and
    forward, so with 4 the prefill's own NIC sat idle while every thread waited on a pull (2x
    H100, 778610f: PE reads at 0 GB/s for half-second samples with 15 prefetches in flight and
    the prefill GPU at 0-41%). Reads go oldest request first, so more threads add read-ahead,
    not sharing."""
    prefetch_queue: bool = True
    """A storage prefetch that finds HiCache's prefetch budget (half the host pool) taken waits
    for it instead of being dropped; stock SGLang drops it and the stored prefix is recomputed
    (sglang_plugin/prefetch_queue.py). False = stock behaviour."""
    host_cache_tokens: int = -1
    """Prefill only: host-only prefix pages the HiCache host pool may keep (LRU beyond it is
    evicted; -1 = no limit, stock). Emulates DRAM that holds a negligible share of the working
    set on a scaled-down benchmark host: the pool then stages loads instead of caching. TP = 1
    only (ranks would evict differently)."""
    device_cache_tokens: int = -1
    """Prefill only: unlocked prefix tokens the GPU radix cache may keep once their write-through
    copy is done (LRU beyond it is demoted to the host pool, which `host_cache_tokens` then
    trims; -1 = no limit, stock). With 0 the prefill's HBM holds only the requests in flight,
    as the paper's PE does (layerwise prefill, no cross-request HBM cache): every turn's hit
    is read from storage, on either side. TP = 1 only."""
    refetch_host_hits: bool = False
    """Prefill, benchmark emulation: a prefix a request matches in the host pool only (no
    longer on the GPU) is read from storage again, as if DRAM did not hold it; the pages read
    are dropped as duplicates, and the request waits for the read. With host_cache_tokens 0
    the pool still served 66% of prompt tokens on arrival (2x H100, 4c4ecf3; likely an agent's
    last turn, pinned while its pages are written to storage), which the paper's setting (3FS,
    no DRAM cache) never serves. A read of pages whose storage write is still in flight waits
    for the write (sglang_plugin/write_wait.py); stock would read the stored part and keep the
    rest as a host hit. Needs the prefetch queue (its hooks). TP = 1 only."""
    async_page_indices: bool = False
    """Prefill: a finished request's KV page indices are read on a side stream instead of with
    a `.cpu()` that waits for the forward launched after it (sglang_plugin/page_indices.py;
    27% of the prefill scheduler thread on 2x H100). Opt-in until measured on a GPU."""
    switch_interval_ms: float = 0.2
    """The server processes' GIL switch interval (sys.setswitchinterval; Python's default is
    5 ms). A storage-read thread that released the GIL for a syscall or a checksum waits up to
    this long to win it back from the scheduler thread, which always runs Python: at 5 ms a
    read next to a busy thread ran at 0.3 GB/s, at 0.2 ms at 2.5 (benchmark/storage/
    bench_gil.py, CPU VM). Both arms get it (a launcher hook)."""
    h2d_kernel: str = "sglang"
    """The HiCache host -> GPU load (one layer at a time, page_first host pool): 'sglang' (its
    kernel) or 'ours' (dualpath.ops.copy_kv, CUDA implementation where built, else Triton;
    sglang_plugin/h2d_load.py). Other host layouts always use SGLang's."""
    pd_engine: bool = False
    """Run SGLang's Mooncake PD backend on our transfer engine (transfer/mooncake_compat.py:
    CUDA IPC + the cuda backend for device KV on this host, tcp for host buffers) instead of
    the Mooncake library; the launcher selects --disaggregation-transfer-backend mooncake."""
    role: str = ""
    """'prefill' or 'decode' (set by the launcher from --disaggregation-mode; '' = neither)."""
    stack_sample: str = ""
    """Sample the scheduler thread's Python stack into this file (folded stacks; '{pid}' is
    replaced by the process id; '' = off): sglang_plugin/stack_sampler.py."""
    stack_sample_hz: float = 100.0
    gil_monitor: bool = False
    """Measure how long this process's threads wait for the GIL (a thread that sleeps 5 ms
    ticks and times its wake-up; GC pauses and where the scheduler thread was at the end of a
    stall): sglang_plugin/gil_monitor.py, `gil` in /dualpath/stats."""
    oracle: bool = False
    """Benchmark ceiling only: stored pages are reported loaded without reading them (no storage
    traffic, the pages keep whatever they held), so outputs are meaningless; the paper's
    'oracle' that assumes the hit KV is already present."""

    def __post_init__(self) -> None:
        if self.role not in ("", "prefill", "decode"):
            raise ValueError(f"PluginConfig.role must be '', 'prefill' or 'decode', "
                             f"got {self.role!r}")
        if self.snic_gbps < 0 or self.buffer_gb < 0 or self.store_capacity_gb < 0:
            raise ValueError("PluginConfig: snic_gbps, buffer_gb and store_capacity_gb must be "
                             ">= 0")
        if not 0 <= self.agent_port < 65536:
            raise ValueError(f"PluginConfig.agent_port out of range: {self.agent_port}")
        if self.forward_mode not in ("auto", "shm", "tcp", "inline"):
            raise ValueError(f"PluginConfig.forward_mode: unknown mode {self.forward_mode!r}")
        for name in ("forward_timeout_s", "plan_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PluginConfig.{name} must be > 0")
        if self.host_cache_tokens < -1:
            raise ValueError("PluginConfig.host_cache_tokens must be >= -1 (-1 = no limit)")
        if self.device_cache_tokens < -1:
            raise ValueError("PluginConfig.device_cache_tokens must be >= -1 (-1 = no limit)")
        if not self.prefetch_queue and (max(self.host_cache_tokens, self.device_cache_tokens) >= 0
                                        or self.refetch_host_hits):
            raise ValueError("PluginConfig: host_cache_tokens / device_cache_tokens / "
                             "refetch_host_hits are applied by the prefetch queue's hooks; they "
                             "need prefetch_queue on")
        if self.h2d_kernel not in ("sglang", "ours"):
            raise ValueError(f"PluginConfig.h2d_kernel: 'sglang' or 'ours', got "
                             f"{self.h2d_kernel!r}")
        if not 0 < self.switch_interval_ms <= 100:
            raise ValueError("PluginConfig.switch_interval_ms must be in (0, 100]")
        if not self.stack_sample_hz > 0:
            raise ValueError("PluginConfig.stack_sample_hz must be > 0")
        if self.io_threads < 1 or self.prefetch_io_threads < 1:
            raise ValueError("PluginConfig.io_threads and prefetch_io_threads must be >= 1")

    def to_json(self) -> str:
        import json
        from dataclasses import asdict
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> PluginConfig:
        import json
        from dataclasses import fields
        obj = json.loads(raw)
        known = {f.name for f in fields(cls)}
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"PluginConfig: unknown fields {sorted(unknown)}")
        return cls(**obj)
