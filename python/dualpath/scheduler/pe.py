"""Prefill-engine selection: the paper's Algorithm 1 (§6.2), as a pure function."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dualpath.scheduler.state import EngineTable, Request

_BIG = np.iinfo(np.int64).max


def schedule_prefill(queue: Sequence[Request], table: EngineTable, read_q: np.ndarray,
                     alpha: np.ndarray | float, beta: np.ndarray | float) -> list[int]:
    """Assign a FIFO prefix of `queue` to prefill engines; return the engine index of each.

    Parameters
    ----------
    queue : requests in arrival order; only a prefix is assigned (FIFO is kept).
    table : prefill engines; `table.tok` is read, not modified.
    read_q : int64[num_nodes], each node's storage read queue in tokens (static for the call).
    alpha : short-read-queue threshold in tokens, scalar or per node (float[num_nodes]).
    beta : unfinished-token limit, scalar or per engine (float[num_engines]).

    Rules: an engine with tok > beta is never chosen. Among the rest, engines on nodes whose
    read queue is <= alpha come first; within the chosen set the engine with the fewest
    unfinished tokens wins (ties: lowest index). The chosen engine's tok grows by the request's
    prompt length before the next request. When no engine qualifies the call stops: the rest
    of the queue waits (admission control).
    """
    tok = table.tok.copy()
    short = (read_q <= alpha)[table.node]
    out: list[int] = []
    for r in queue:
        ok = tok <= beta
        masked = np.where(ok & short, tok, _BIG)  # C2 first ...
        e = int(masked.argmin())
        if masked[e] == _BIG:
            masked = np.where(ok, tok, _BIG)  # ... then C3 (C2 is empty here)
            e = int(masked.argmin())
            if masked[e] == _BIG:
                break
        tok[e] += r.prompt_len
        out.append(e)
    return out
