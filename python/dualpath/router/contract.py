"""What engines report to the router: the `EngineStats` message, schema version 1.

Served by each SGLang server with the dualpath plugin as ``GET /dualpath/stats`` (JSON); the
router polls it every ``RouterConfig.stats_interval_s``. Counters are cumulative since the
engine started (the router takes differences; a counter that goes back means a restart).
A receiver rejects a message whose major version it does not know; fields added later must be
optional, with defaults below, so version-1 readers keep working.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

SCHEMA_VERSION = 1
STATS_PATH = "/dualpath/stats"


class ContractError(ValueError):
    pass


@dataclass(frozen=True)
class EngineStats:
    engine: str
    """The engine's name as registered with the router."""
    role: str
    """'prefill' or 'decode'."""
    seq: int
    """Unfinished requests on the engine."""
    tok: int
    """Their total prompt tokens."""
    free_kv_tokens: int
    """Free KV slots, in tokens (what a new request's prompt + output must fit into)."""
    read_queue_tokens: int = 0
    """Tokens queued for storage reads on the engine's node (the scheduler's read_q)."""
    read_tokens_total: int = 0
    read_busy_s_total: float = 0.0
    """Node storage reads: tokens read and seconds with a read in flight, since start."""
    prefill_tokens_total: int = 0
    prefill_busy_s_total: float = 0.0
    """Prefill work: tokens prefilled and seconds spent prefilling, since start."""
    timestamp: float = 0.0
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ContractError(f"role must be 'prefill' or 'decode', got {self.role!r}")
        for f in ("seq", "tok", "free_kv_tokens", "read_queue_tokens", "read_tokens_total",
                  "prefill_tokens_total"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ContractError(f"{f} must be a non-negative int, got {v!r}")

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, raw: bytes | str | dict) -> EngineStats:
        try:
            obj = raw if isinstance(raw, dict) else json.loads(raw)
        except json.JSONDecodeError as e:
            raise ContractError(f"engine stats are not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ContractError("engine stats must be a JSON object")
        version = obj.get("version")
        if version != SCHEMA_VERSION:
            raise ContractError(f"engine stats schema version {version!r}; this router "
                                f"understands {SCHEMA_VERSION}")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in obj.items() if k in known})
        except TypeError as e:
            raise ContractError(f"engine stats: {e}") from None
