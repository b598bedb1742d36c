"""The DE buffer: KV pages the decode-side agent read from storage, kept in host memory.

Each slot holds one page in SGLang's page_first host layout (the K region, then the V region,
`region_bytes` each), so forwarding a page to a prefill's host pool, or restoring it into the
decode's own host pool, is two contiguous copies. The buffer is filled through `fill`
(normally `PageFirstAdapter.get_pages`, which reads over the node's metered storage NIC).

Reads are single-flight: when the forward to a prefill and the decode's own restore ask for
the same key, storage is read once and the second caller waits for the first. The buffer is a
staging area, not a cache: an entry is created expecting `uses` consumers (2 when the decode
restores what it forwards, else 1) and is freed when the last one releases it, so a later turn
reads storage again, as it would at cluster scale. An entry belongs to the request it was read
for: another request shares it only while it is being read or in use (one storage read serving
both); once idle it is stale for everyone else and is read again (a decode that already held the
prefix never comes to restore it, and its entry must not serve the next turn as a DRAM cache).
Entries whose consumers never come are reclaimed least recently used first when space runs out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

# (keys, K page addresses, V page addresses, request id or None) -> per-key success
Fill = Callable[[Sequence[str], Sequence[int], Sequence[int], "str | None"], list]


@dataclass
class Slot:
    key: str
    index: int
    refs: int = 0
    uses: int = 1  # consumers still expected; the entry is freed after the last
    state: str = "loading"  # loading | ready | failed
    rid: str | None = None  # the request it was read for
    done: threading.Event = field(default_factory=threading.Event)


class BlockBuffer:
    def __init__(self, region_bytes: int, capacity_slots: int, fill: Fill):
        if region_bytes < 1 or capacity_slots < 1:
            raise ValueError("region_bytes and capacity_slots must be >= 1")
        self.region_bytes = region_bytes
        self.slot_bytes = 2 * region_bytes
        self.capacity = capacity_slots
        self.slab = np.zeros(capacity_slots * self.slot_bytes, dtype=np.uint8)
        self.base = self.slab.ctypes.data
        self._fill = fill
        self._free = list(range(capacity_slots - 1, -1, -1))
        self._slots: OrderedDict[str, Slot] = OrderedDict()  # LRU order, oldest first
        self._lock = threading.Lock()
        self.hits = self.misses = self.waits = self.no_room = self.stale = 0

    def offset(self, slot: Slot) -> int:
        return slot.index * self.slot_bytes

    def view(self, slot: Slot) -> np.ndarray:
        o = self.offset(slot)
        return self.slab[o:o + self.slot_bytes]

    def _take_index(self) -> int | None:
        if self._free:
            return self._free.pop()
        for key, s in self._slots.items():  # evict the least recently used idle entry
            if s.refs == 0 and s.state != "loading":
                del self._slots[key]
                return s.index
        return None

    def acquire(self, keys: Sequence[str], uses: int = 1,
                rid: str | None = None) -> list[Slot | None]:
        """Pin a slot holding each key, reading the missing ones (one `fill` call) and waiting
        for those another caller is reading. None where the key could not be read (miss or
        damaged block) or no slot was free. Entries made here expect `uses` consumers (this
        caller included) and belong to `rid`: an idle ready entry of another request is read
        again, not reused. Release what you got with `release`."""
        if uses < 1:
            raise ValueError("uses must be >= 1")
        got: list[Slot | None] = [None] * len(keys)
        mine: list[int] = []
        with self._lock:
            for i, k in enumerate(keys):
                s = self._slots.get(k)
                if (s is not None and rid is not None and s.rid != rid and s.refs == 0
                        and s.state == "ready"):  # idle, another request's: not a cache
                    del self._slots[k]
                    self._free.append(s.index)
                    self.stale += 1
                    s = None
                if s is not None and s.state != "failed":
                    s.refs += 1
                    self._slots.move_to_end(k)
                    got[i] = s
                    if s.state == "ready":
                        self.hits += 1
                    else:
                        self.waits += 1
                    continue
                idx = self._take_index()
                if idx is None:
                    self.no_room += 1
                    continue
                if s is not None:  # a failed entry is retried
                    self._free.append(s.index)
                    del self._slots[k]
                s = self._slots[k] = Slot(k, idx, refs=1, uses=uses, rid=rid)
                got[i] = s
                mine.append(i)
                self.misses += 1
        try:
            self._load(keys, got, mine, rid)
        except BaseException:
            self.release(got, consumed=False)  # nothing stays pinned by a failed call
            raise
        for i, s in enumerate(got):
            if s is None:
                continue
            s.done.wait()
            if s.state != "ready":
                self.release([s], consumed=False)
                got[i] = None
        return got

    def _load(self, keys, got, mine, rid=None) -> None:
        if mine:
            ok: list = []
            try:
                ok = list(self._fill([keys[i] for i in mine],
                                     [self.base + self.offset(got[i]) for i in mine],
                                     [self.base + self.offset(got[i]) + self.region_bytes
                                      for i in mine], rid))
            finally:
                ok += [False] * (len(mine) - len(ok))
                with self._lock:
                    for i, good in zip(mine, ok[:len(mine)], strict=True):
                        got[i].state = "ready" if good else "failed"
                        got[i].done.set()

    def release(self, slots: Sequence[Slot | None], consumed: bool = True) -> None:
        """Unpin; `consumed` counts this caller as one of the entry's expected consumers."""
        with self._lock:
            for s in slots:
                if s is None:
                    continue
                s.refs -= 1
                if consumed:
                    s.uses -= 1
                done = s.state == "failed" or s.uses <= 0
                if s.refs == 0 and done and self._slots.get(s.key) is s:
                    del self._slots[s.key]
                    self._free.append(s.index)

    def stats(self) -> dict:
        with self._lock:
            return {"slots": self.capacity, "used": len(self._slots), "hits": self.hits,
                    "misses": self.misses, "waits": self.waits, "no_room": self.no_room,
                    "stale": self.stale}
