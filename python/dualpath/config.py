"""One frozen configuration dataclass per component. CLI defaults are read from these fields;
invalid values raise in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ReadSideMode = Literal["shorter", "split", "pe"]


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
    (the paper's Basic baseline)."""
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
        if self.read_side not in ("shorter", "split", "pe"):
            raise ValueError(f"SchedulerConfig.read_side: unknown mode {self.read_side!r}")
        if self.block_tokens < 1:
            raise ValueError("SchedulerConfig.block_tokens must be >= 1")
