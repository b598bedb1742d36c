"""Prometheus metrics of one router (own registry, so several routers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dualpath_router_requests", "Requests answered",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("dualpath_router_request_seconds", "Time to the full answer",
                                 ["endpoint"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.queue_waiting = Gauge("dualpath_router_queue_waiting",
                                   "Requests waiting for an engine pair", registry=r)
        self.admission_wait = Histogram(
            "dualpath_router_admission_wait_seconds",
            "Time a request waited in the router for an engine pair (Algorithm 1's admission)",
            registry=r, buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.plans = Counter("dualpath_router_plans", "Plans made, by read side",
                             ["read_side"], registry=r)
        self.retries = Counter("dualpath_router_retries",
                               "Requests retried because an engine was unreachable",
                               ["engine"], registry=r)
        self.plan_fallbacks = Counter("dualpath_router_plan_fallbacks",
                                      "DE-side plans turned into PE-side reads", ["reason"],
                                      registry=r)
        self.engine_up = Gauge("dualpath_router_engine_up", "1 if the engine takes requests",
                               ["engine", "role"], registry=r)
