"""The router's engine registry: where each engine lives and how to reach its bootstrap server."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from dualpath.scheduler import EngineSpec


@dataclass(frozen=True)
class Engine:
    name: str
    role: str  # 'prefill' | 'decode'
    url: str  # http://host:port of the SGLang server
    node: str
    group: str
    bootstrap_port: int | None = None  # prefill only: --disaggregation-bootstrap-port
    kv_capacity: int = 1 << 40  # decode: KV slots in tokens until the engine reports its own

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"engine {self.name}: role must be 'prefill' or 'decode'")
        u = urlsplit(self.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"engine {self.name}: bad url {self.url!r}")
        if self.role == "prefill" and self.bootstrap_port is None:
            raise ValueError(f"prefill engine {self.name} needs its bootstrap_port")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname

    def spec(self) -> EngineSpec:
        return EngineSpec(self.name, self.node, self.group, self.kv_capacity)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Engine:
        """From a JSON object; `name`, `node` and `group` default to the URL's host:port."""
        if not isinstance(d, dict) or "url" not in d or "role" not in d:
            raise ValueError("an engine needs at least 'role' and 'url'")
        url = str(d["url"]).rstrip("/")
        where = urlsplit(url).netloc
        known = {"name", "role", "url", "node", "group", "bootstrap_port", "kv_capacity"}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown engine fields {sorted(extra)}")
        node = d.get("node") or where
        return cls(name=d.get("name") or where, role=d["role"], url=url, node=node,
                   group=d.get("group") or node, bootstrap_port=d.get("bootstrap_port"),
                   kv_capacity=int(d.get("kv_capacity", 1 << 40)))
