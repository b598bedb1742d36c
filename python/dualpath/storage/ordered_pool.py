"""A fixed set of worker threads that take queued tasks lowest key first (ties: first queued).

The storage reads of a node run on one such pool, keyed by the order in which requests first
asked this node for pages. SGLang's prefetch IO threads (`--dualpath-prefetch-io-threads`, one
request each) and the decode agent's pulls each read a request batch by batch (128 pages, 1 GiB
for an 8B-shaped model), so in a first-in-first-out pool the requests in flight took turns a
batch each: every one of them finished near the end of all of them, and the prefill, which
waits for a request's whole prefix, idled meanwhile. Served oldest request first, the head's
prefix lands first and its prefill overlaps the reads of the ones behind it; the NIC stays as
busy as before.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future


class OrderedPool:
    def __init__(self, workers: int, name: str):
        if workers < 1:
            raise ValueError(f"an ordered pool needs at least one worker, got {workers}")
        self._heap: list = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}_{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, key, fn: Callable, *args) -> Future:
        """Queue fn(*args); among queued tasks the lowest `key` runs next."""
        f: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            heapq.heappush(self._heap, (key, next(self._seq), f, fn, args))
            self._cv.notify()
        return f

    def map(self, key, fn: Callable, *iterables: Iterable,
            on_cancel: Callable | None = None) -> list:
        """fn over the zipped iterables, all under `key`; the results in order. On an error
        (or one queueing them) the tasks not yet started are cancelled, `on_cancel(*args)`
        called for each, and the running ones waited for (none keeps writing into the
        caller's memory after this returns); then the first error raises."""
        futures: list = []
        try:
            for args in zip(*iterables, strict=True):
                futures.append((self.submit(key, fn, *args), args))
            return [f.result() for f, _ in futures]
        except BaseException:
            for f, args in futures:
                if f.cancel() and on_cancel is not None:
                    on_cancel(*args)
            for f, _ in futures:
                if not f.cancelled():
                    f.exception()  # waits; the error of interest is already raising
            raise

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                _, _, f, fn, args = heapq.heappop(self._heap)
            if not f.set_running_or_notify_cancel():
                continue
            try:
                f.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001  (handed to the caller)
                f.set_exception(e)

    def shutdown(self, wait: bool = True) -> None:
        """No new tasks; the queued ones still run; with `wait`, join the workers."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if wait:
            for t in self._threads:
                t.join()
