"""The global scheduler (paper §6): pure selection functions over an engine-state model, and a
stateful wrapper shared by the router and the simulator."""

from dualpath.scheduler.baselines import PairScheduler
from dualpath.scheduler.de import assign_groups, schedule_decode_group
from dualpath.scheduler.global_scheduler import GlobalScheduler, Plan
from dualpath.scheduler.pe import schedule_prefill
from dualpath.scheduler.read_side import shorter_side, split_read
from dualpath.scheduler.state import EngineSpec, EngineTable, Request

__all__ = ["EngineSpec", "EngineTable", "GlobalScheduler", "PairScheduler", "Plan", "Request",
           "assign_groups", "schedule_decode_group", "schedule_prefill", "shorter_side",
           "split_read"]
