"""What the simulator is told about a cluster and its engines.

`SimCluster`: node counts and links (per node: g GPUs with one compute NIC each, one storage NIC
of s x a compute NIC), KV bytes per token, decode KV capacity, which scheduler runs.
`PerfModel`: engine speeds, fitted from GPU-host measurements (`fit_prefill`, `fit_decode`) or
given by hand:
  prefill time  = p0 + p1 * miss_tokens + p2 * miss_tokens * context_tokens / 1e3
  decode step   = d0 + d1 * running_requests + d2 * running_context_tokens / 1e3
  a request's decode time = its output tokens x the step time when it starts decoding.
  pd_gbps: the rate KV moved prefill -> decode on the measured host (its PD backend).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SimCluster:
    prefill_nodes: int
    decode_nodes: int
    gpus_per_node: int = 8
    compute_nic_gbps: float = 50.0
    """One GPU's compute NIC, GB/s (400 Gb/s)."""
    storage_ratio: float = 1.0
    """s: a node's storage NIC / one compute NIC (the paper's testbed: 1)."""
    kv_bytes_per_token: int = 131072
    """Llama-3.1-8B bf16: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes."""
    decode_kv_tokens: int = 1_000_000
    """KV slots per decode engine (GPU)."""
    h2d_gbps: float = 50.0
    """Host -> GPU per GPU: the prefill loading a turn's prefix into its GPU pool (overlapped
    with its compute, layer by layer), and the DE's restore of the KV it read (miss-only
    return)."""
    pe_cache_tokens: int = 0
    """Tokens of recently used prefixes each prefill engine keeps in HBM + DRAM (SGLang's
    device pool and HiCache host pool, LRU by agent); a turn reads from storage only what is
    not there. 0 = none, as in the paper (its buffers only stage)."""
    prefill_kv_tokens: int = 0
    """KV slots of each prefill engine's GPU pool: a turn holds its whole prompt there from the
    start of its prefill until its KV has reached the decode (SGLang's prefill keeps it for the
    PD transfer); the next turn in the engine's queue waits until it fits. 0 = unlimited."""
    prefill_staging_tokens: int = 0
    """Host staging of each prefill engine (SGLang's HiCache host pool less what mirrors the
    GPU pool): a turn's read prefix occupies it from read start until its prefill starts; a read
    waits for room (always starts when the staging is empty). 0 = unlimited."""
    prefill_loads: int = 0
    """Loads a prefill engine has in flight at most, PE- and DE-side reads alike (the
    plugin's prefetch IO threads; each waits for its whole read and forward). 0 = unlimited."""
    read_batch_bytes: int = 0
    """0: a node's storage NIC serves reads first come first served, each whole (what the
    plugin's read order does since 9d24f5f/8c0aaf3, oldest request first). > 0: reads take
    turns a batch of this many bytes each, a read's next batch queued behind the others'
    (SGLang reads a prefetch 128 pages at a time, and a first-in-first-out read pool served
    them so: 1 GiB for an 8B-shaped model at page 64)."""
    prefill_batch: int = 1
    """Turns a prefill engine runs in one batch at most (those queued and fitting its GPU
    pool): one batch costs PerfModel.prefill_batch_s, so p0 is paid per batch. 1 = one turn
    at a time (the models calibrated so far fit p0 per turn: keep 1 with them)."""
    router_prefill_tokens_per_s: float = 0.0
    """The global scheduler's prefill rate (beta = rate x its window), fixed: what a router
    that is never told the measured rate uses (dualpath.router before 7dc4052: its initial
    20,000 tokens/s). 0 = the engine model's own rate."""
    policy: str = "dualpath"
    """'dualpath' (the global scheduler, read side by `read_side`) or 'basic' (round-robin
    pairs, prefill-side reads: the paper's baseline)."""
    read_side: str = "shorter"
    schedule_interval_s: float = 0.02
    """The scheduler's tick: it places what arrived in the last tick (TTFT granularity)."""

    def __post_init__(self) -> None:
        if min(self.prefill_nodes, self.decode_nodes, self.gpus_per_node) < 1:
            raise ValueError("SimCluster: node and GPU counts must be >= 1")
        if self.pe_cache_tokens < 0:
            raise ValueError("SimCluster.pe_cache_tokens must be >= 0")
        if self.router_prefill_tokens_per_s < 0:
            raise ValueError("SimCluster.router_prefill_tokens_per_s must be >= 0")
        if self.prefill_batch < 1:
            raise ValueError(f"SimCluster.prefill_batch must be >= 1, got {self.prefill_batch}")
        if min(self.prefill_kv_tokens, self.prefill_staging_tokens, self.prefill_loads,
               self.read_batch_bytes) < 0:
            raise ValueError("SimCluster.prefill_kv_tokens, prefill_staging_tokens, "
                             "prefill_loads and read_batch_bytes must be >= 0")
        for name in ("compute_nic_gbps", "storage_ratio", "h2d_gbps", "schedule_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SimCluster.{name} must be > 0")
        if self.policy not in ("dualpath", "basic"):
            raise ValueError(f"SimCluster.policy: unknown {self.policy!r}")

    @property
    def storage_bytes_per_s(self) -> float:
        return self.storage_ratio * self.compute_nic_gbps * 1e9


@dataclass(frozen=True)
class PerfModel:
    p0: float = 0.010
    p1: float = 2.0e-5
    p2: float = 1.0e-6
    d0: float = 0.012
    d1: float = 5.0e-5
    d2: float = 2.0e-6
    pd_gbps: float = 0.0
    """The PD KV transfer rate measured on the host (GB/s; 0 = not measured: the cluster's
    compute NIC)."""
    source: str = "default (not calibrated)"

    def prefill_s(self, miss: int, context: int) -> float:
        return self.p0 + self.p1 * miss + self.p2 * miss * context / 1e3

    def prefill_batch_s(self, turns) -> float:
        """One prefill batch of (miss, context) turns: p0 once (the engine's per-batch cost),
        the token terms per turn; one turn costs prefill_s."""
        return self.p0 + sum(self.p1 * m + self.p2 * m * c / 1e3 for m, c in turns)

    def decode_step_s(self, running: int, context_tokens: int) -> float:
        return self.d0 + self.d1 * running + self.d2 * context_tokens / 1e3

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> PerfModel:
        return cls(**json.loads(path.read_text()))


def _lstsq(cols: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    a = np.stack(cols, axis=1)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return np.maximum(coef, 0.0)  # times do not shrink with more work


def fit_prefill(miss: np.ndarray, context: np.ndarray, seconds: np.ndarray) -> tuple:
    """(p0, p1, p2) by least squares (clamped at >= 0) from measured prefill times."""
    miss, context = np.asarray(miss, float), np.asarray(context, float)
    if len(miss) < 3:
        raise ValueError("need at least 3 prefill samples")
    return tuple(float(x) for x in _lstsq([np.ones_like(miss), miss, miss * context / 1e3],
                                          np.asarray(seconds, float)))


def fit_decode(running: np.ndarray, context: np.ndarray, step_s: np.ndarray) -> tuple:
    """(d0, d1, d2) from measured decode step times (TPOT) at known batch sizes."""
    running, context = np.asarray(running, float), np.asarray(context, float)
    if len(running) < 3:
        raise ValueError("need at least 3 decode samples")
    return tuple(float(x) for x in _lstsq([np.ones_like(running), running, context / 1e3],
                                          np.asarray(step_s, float)))
