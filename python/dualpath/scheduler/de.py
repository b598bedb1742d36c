"""Decode-engine selection (paper §6.3): groups by total tokens, then engines within a group."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dualpath.scheduler.state import EngineTable, Request

_BIG = np.iinfo(np.int64).max


def group_tokens(table: EngineTable) -> np.ndarray:
    """Total unfinished tokens per group."""
    return np.bincount(table.group, weights=table.tok,
                       minlength=len(table.group_names)).astype(np.int64)


def assign_groups(queue: Sequence[Request], table: EngineTable,
                  gtok: np.ndarray | None = None) -> list[int]:
    """Phase 1: each request, in order, goes to the group whose engines hold the fewest tokens.
    `gtok` (int64[num_groups]) may be passed when the caller keeps the sums; it is not modified."""
    gtok = group_tokens(table) if gtok is None else gtok.copy()
    out = []
    for r in queue:
        g = int(gtok.argmin())
        gtok[g] += r.prompt_len
        out.append(g)
    return out


def high_token_threshold(queue: Sequence[Request], tok: Sequence[int],
                         free_kv: Sequence[int], factor: float) -> float:
    """Z = factor x (sum of len(r) over R + sum of tok) / |E|, where R is the longest queue prefix
    whose KV fits in the group's total free KV (ignoring fragmentation)."""
    room, len_r = int(sum(free_kv)), 0
    for r in queue:
        if r.kv_tokens > room:
            break
        room -= r.kv_tokens
        len_r += r.prompt_len
    return factor * (len_r + int(sum(tok))) / len(tok)


def schedule_decode_group(queue: Sequence[Request], table: EngineTable, members: np.ndarray,
                          factor: float = 1.05) -> list[int]:
    """Phase 2: assign a prefix of a group's private queue to its engines; return engine indices
    (into `table`). Among engines with free KV for the request, those that stay at or under Z
    after taking it are preferred, by fewest requests then fewest tokens; otherwise the fewest
    tokens wins (ties: lowest index). Stops at the first request no engine has room for.

    A group is one node's engines (8 or so), so plain Python beats numpy's per-call overhead.
    """
    idx = members.tolist()
    tok = table.tok[members].tolist()
    seq = table.seq[members].tolist()
    free = table.free_kv[members].tolist()
    z = high_token_threshold(queue, tok, free, factor)
    out = []
    for r in queue:
        n, kv = r.prompt_len, r.kv_tokens
        best, best_key, low_tok, low = None, None, None, None
        for j, t in enumerate(tok):
            if free[j] < kv:
                continue
            if t + n <= z:
                key = (seq[j], t)
                if best is None or key < best_key:
                    best, best_key = j, key
            elif best is None and (low is None or t < low_tok):
                low, low_tok = j, t
        e = best if best is not None else low
        if e is None:
            break
        tok[e] += n
        seq[e] += 1
        free[e] -= kv
        out.append(idx[e])
    return out
