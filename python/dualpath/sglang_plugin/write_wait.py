"""--dualpath-refetch-host-hits: a refetch waits for the storage writes of the pages it reads
again (SGLang 0.5.17 HiRadixCache).

The refetch setting makes the prefill read every stored prefix from storage, as the paper's
storage-only baseline does. A turn can arrive while its previous turn's prompt is still being
written: SGLang's write-through backs a prompt up to storage after its prefill, one op after
another. Stock's prefetch then reads only the stored part of the chain (`_storage_hit_query`
stops at the first missing page) and the rest stays a host-pool hit: DRAM reuse the baseline
should not have, the more of it the slower the writes. Measured on 2x H100 (2026-11-28, 25ccd4e,
24 agents x 12 turns): at 3 GB/s per NIC the baseline read 160 GB where the DualPath arm,
whose writes were split over two NICs, read 252 GB, and the arms came out even (1.01x).

With this, such a request's prefetch is queued (prefetch_queue) until the writes of the pages it
would read again are acked, then reads the whole chain. The paper's decode engines persist each
full block as it is generated, so a later turn finds its prefix stored; waiting is what a
storage-only prefill has to do when it is not.

Pending pages are known by hash: an AFTER hook on `write_backup_storage` records the page hashes
of the op it just queued (the chain walked as SGLang's `_concat_split_chain` walks it), and an
op is forgotten once SGLang has dropped it from `ongoing_backup` (acked). A cache reset forgets
them all (`forget`): SGLang's reset drops the ops' acks but leaves them in `ongoing_backup`.
Hashes survive node splits, which node identity would not. Scheduler thread only; `prune` once
per scheduling pass, then `writing` is a set lookup.
"""

from __future__ import annotations

from collections import Counter

from dualpath.sglang_plugin.prefetch_meters import _settings

PENDING = "_dualpath_pending_writes"  # op id -> the page hashes it writes
COUNTS = "_dualpath_pending_hashes"  # page hash -> pending ops writing it


def _chain_hashes(node, backup_len) -> list:
    """The page hashes an op queued for `node` writes: `node`'s own, or, after splits, those of
    the chain of `backup_len` tokens that ends at it (SGLang's `_concat_split_chain`)."""
    want = len(node.key) if backup_len is None else backup_len
    out: list = []
    got = 0
    while node is not None and getattr(node, "parent", None) is not None and got < want:
        out[:0] = list(node.hash_value or ())
        got += len(node.key)
        node = node.parent
    return out


def noted_backup(result, cache, node, backup_len=None):
    """AFTER HiRadixCache.write_backup_storage: remember which page hashes the op it queued
    writes (refetch setting, prefill servers only)."""
    if not _settings(cache).refetch:
        return result
    ops = getattr(cache, "ongoing_backup", None)
    if not ops:
        return result
    op_id = next(reversed(ops))
    if ops[op_id] is not node:  # not queued by this call
        return result
    hashes = tuple(_chain_hashes(node, backup_len))
    if hashes:
        prune(cache)
        getattr(cache, PENDING)[op_id] = hashes
        getattr(cache, COUNTS).update(hashes)
    return result


def forget(cache) -> None:
    """After a cache reset: SGLang 0.5.17's HiRadixCache.reset keeps `ongoing_backup` while its
    controller's reset drops the acks, so those ops would look in flight forever."""
    for attr in (PENDING, COUNTS):
        if hasattr(cache, attr):
            delattr(cache, attr)


def prune(cache) -> Counter:
    """Forget the ops SGLang no longer has in flight; the remaining hash counts."""
    pending = getattr(cache, PENDING, None)
    if pending is None:
        pending = {}
        setattr(cache, PENDING, pending)
        setattr(cache, COUNTS, Counter())
    counts = getattr(cache, COUNTS)
    live = getattr(cache, "ongoing_backup", None) or {}
    for op in [op for op in pending if op not in live]:
        for h in pending.pop(op):
            counts[h] -= 1
            if counts[h] <= 0:
                del counts[h]
    return counts


def writing(cache, hashes) -> bool:
    """Is a storage write of any of these page hashes still in flight (as of the last
    `prune`)?"""
    counts = getattr(cache, COUNTS, None)
    return bool(hashes and counts) and any(h in counts for h in hashes)


def suffix_hashes(node, anchor) -> tuple:
    """Page hashes of the nodes below `anchor` down to `node` (what a refetch anchored at
    `anchor` reads again), root side first."""
    out: list = []
    while node is not None and node is not anchor:
        out[:0] = list(getattr(node, "hash_value", None) or ())
        node = getattr(node, "parent", None)
    return tuple(out)
