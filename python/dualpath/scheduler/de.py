"""Decode-engine selection (paper §6.3): groups by total tokens, then engines within a group."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dualpath.scheduler.state import EngineTable, Request

_BIG = np.iinfo(np.int64).max
_SEQ_SHIFT = np.int64(1) << 40  # key = seq * 2^40 + tok: fewest requests, then fewest tokens


def assign_groups(queue: Sequence[Request], table: EngineTable) -> list[int]:
    """Phase 1: each request, in order, goes to the group whose engines hold the fewest tokens."""
    gtok = np.bincount(table.group, weights=table.tok,
                       minlength=len(table.group_names)).astype(np.int64)
    out = []
    for r in queue:
        g = int(np.argmin(gtok))
        gtok[g] += r.prompt_len
        out.append(g)
    return out


def high_token_threshold(queue: Sequence[Request], tok: np.ndarray, free_kv: np.ndarray,
                         factor: float) -> float:
    """Z = factor x (sum of len(r) over R + sum of tok) / |E|, where R is the longest queue prefix
    whose KV fits in the group's total free KV (ignoring fragmentation)."""
    room, len_r = int(free_kv.sum()), 0
    for r in queue:
        if r.kv_tokens > room:
            break
        room -= r.kv_tokens
        len_r += r.prompt_len
    return factor * (len_r + int(tok.sum())) / len(tok)


def schedule_decode_group(queue: Sequence[Request], table: EngineTable, members: np.ndarray,
                          factor: float = 1.05) -> list[int]:
    """Phase 2: assign a prefix of a group's private queue to its engines; return engine indices
    (into `table`). Among engines with free KV for the request, those that stay at or under Z
    after taking it are preferred, by fewest requests; otherwise the fewest tokens wins. Stops
    at the first request no engine has room for."""
    tok = table.tok[members].copy()
    seq = table.seq[members].copy()
    free = table.free_kv[members].copy()
    z = high_token_threshold(queue, tok, free, factor)
    out = []
    for r in queue:
        fits = free >= r.kv_tokens
        if not fits.any():
            break
        low = fits & (tok + r.prompt_len <= z)
        if low.any():
            e = int(np.argmin(np.where(low, seq * _SEQ_SHIFT + tok, _BIG)))
        else:
            e = int(np.argmin(np.where(fits, tok, _BIG)))
        tok[e] += r.prompt_len
        seq[e] += 1
        free[e] -= r.kv_tokens
        out.append(int(members[e]))
    return out
