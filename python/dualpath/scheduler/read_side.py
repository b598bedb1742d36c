"""Which side reads a request's stored prefix KV (paper §6.4), and a split across both sides."""

from __future__ import annotations


def shorter_side(pe_queue_tokens: float, de_queue_tokens: float) -> str:
    """The paper's rule: the side whose node read queue is shorter; a tie reads on the PE (the
    path without the extra DE -> PE hop)."""
    return "de" if de_queue_tokens < pe_queue_tokens else "pe"


def split_read(hit_tokens: int, pe_queue: float, de_queue: float, pe_rate: float,
               de_rate: float, block: int) -> tuple[int, int]:
    """Divide `hit_tokens` between the PE and DE nodes so both reads are expected to finish at
    the same time, given each node's queue (tokens) and read rate (tokens/s). Returns
    (pe_tokens, de_tokens), whole blocks each except where `hit_tokens` is not a multiple of
    `block` (the remainder stays on the PE side).

    Equal finish time: (pe_queue + x) / pe_rate = (de_queue + hit - x) / de_rate, so
    x = (pe_rate * (de_queue + hit) - de_rate * pe_queue) / (pe_rate + de_rate), clamped.
    """
    if hit_tokens <= 0:
        return 0, 0
    if pe_rate <= 0 or de_rate <= 0:
        raise ValueError("read rates must be > 0")
    x = (pe_rate * (de_queue + hit_tokens) - de_rate * pe_queue) / (pe_rate + de_rate)
    whole = hit_tokens - hit_tokens % block
    de_tokens = whole - min(max(round(x / block) * block, 0), whole)
    return hit_tokens - de_tokens, de_tokens
