"""The engine-state model the scheduling functions read: a struct of arrays per engine role.

Per engine (paper §6.1): ``seq`` = unfinished requests assigned to it, ``tok`` = their total
tokens, ``free_kv`` = free KV slots in tokens (decode engines). Per node: the storage read queue
in tokens. Engines belong to groups (all engines of a node share one group). Arrays are numpy so
one decision costs a few vector operations, not a Python loop over 1,000 engines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Request:
    rid: str
    prompt_len: int
    """len(r): the prompt's tokens; what `tok` counts."""
    hit_len: int = 0
    """Prefix tokens whose KV is in storage and must be read (by the PE or the DE side)."""
    max_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError(f"request {self.rid}: prompt_len must be >= 1")
        if not 0 <= self.hit_len <= self.prompt_len:
            raise ValueError(f"request {self.rid}: hit_len must be in [0, prompt_len]")
        if self.max_new_tokens < 0:
            raise ValueError(f"request {self.rid}: max_new_tokens must be >= 0")

    @property
    def kv_tokens(self) -> int:
        """KV slots a decode engine must hold for this request (prompt + output)."""
        return self.prompt_len + self.max_new_tokens


@dataclass(frozen=True)
class EngineSpec:
    name: str
    node: str
    group: str
    kv_capacity: int = 0
    """KV slots in tokens (decode engines); the starting free_kv until the engine reports."""


@dataclass
class EngineTable:
    """Engines of one role. Index i everywhere refers to ``names[i]``."""

    names: list[str]
    node: np.ndarray  # int32 index into node_names
    group: np.ndarray  # int32 index into group_names
    node_names: list[str]
    group_names: list[str]
    tok: np.ndarray = field(default=None)  # int64
    seq: np.ndarray = field(default=None)  # int64
    free_kv: np.ndarray = field(default=None)  # int64

    def __post_init__(self) -> None:
        n = len(self.names)
        for name in ("tok", "seq", "free_kv"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(n, dtype=np.int64))
        if len(set(self.names)) != n:
            raise ValueError("engine names must be unique")

    @classmethod
    def build(cls, specs: Sequence[EngineSpec]) -> EngineTable:
        nodes = sorted({s.node for s in specs})
        groups = sorted({s.group for s in specs})
        node_of = {}
        for s in specs:  # all engines of a node are in one group (paper §6.1)
            if node_of.setdefault(s.node, s.group) != s.group:
                raise ValueError(f"node {s.node} has engines in groups {node_of[s.node]} and "
                                 f"{s.group}; all engines of a node must share a group")
        ni = {n: i for i, n in enumerate(nodes)}
        gi = {g: i for i, g in enumerate(groups)}
        return cls(names=[s.name for s in specs],
                   node=np.array([ni[s.node] for s in specs], dtype=np.int32),
                   group=np.array([gi[s.group] for s in specs], dtype=np.int32),
                   node_names=nodes, group_names=groups,
                   free_kv=np.array([s.kv_capacity for s in specs], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.names)

    def copy(self) -> EngineTable:
        return EngineTable(self.names, self.node, self.group, self.node_names, self.group_names,
                           self.tok.copy(), self.seq.copy(), self.free_kv.copy())

    def group_members(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.group == g) for g in range(len(self.group_names))]
