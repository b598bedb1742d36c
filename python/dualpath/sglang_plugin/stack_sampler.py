"""A sampling profiler of one thread, in-process (the GPU host has no py-spy, perf or gdb).

Started in a scheduler process with `--dualpath-stack-sample FILE`: a daemon thread looks at the
scheduler thread's Python stack `hz` times a second (`sys._current_frames`) and counts each
distinct stack. Every `flush_s` and at exit it rewrites FILE (temp + rename, so a killed server
leaves the last complete copy) in the folded format flame-graph tools read: one line per stack,
`root;...;leaf count`, each frame `file:function:line`. `python -m dualpath.bench.stacks FILE`
prints where the time went. A sample costs the sampled thread one GIL hand-over (tens of us).
A thread blocked in C code that holds the GIL delays the sample and shows up when it releases it:
time in such calls is under-counted, not lost.

Every `others_every`-th sample also folds every other thread of the process (the plugin's
agent, prefetch IO, pull and restore threads, SGLang's own) into `<FILE>.threads`, each stack
rooted at `thread:<name>`: which threads run Python next to the scheduler (a decode whose agent
reads and forwards for the prefill decodes slower; 2x H100, 17ce76c: TPOT 11.2 -> 15.8 ms).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger("dualpath.stack_sampler")


def fold(frame, max_depth: int = 96) -> str:
    """`root;...;leaf` for a frame and its callers, at most `max_depth` frames (the innermost)."""
    names = []
    while frame is not None and len(names) < max_depth:
        code = frame.f_code
        names.append(f"{os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return ";".join(reversed(names))


class StackSampler:
    def __init__(self, thread_id: int, path: str | Path, hz: float = 100.0,
                 flush_s: float = 5.0, others_every: int = 10):
        if not hz > 0 or not flush_s > 0 or others_every < 0:
            raise ValueError("StackSampler: hz and flush_s must be > 0, others_every >= 0")
        self.thread_id, self.path = thread_id, Path(path)
        self.others_path = self.path.with_name(self.path.name + ".threads")
        self.interval, self.flush_s = 1.0 / hz, flush_s
        self.others_every = others_every  # 0: the sampled thread only
        self.counts: Counter[str] = Counter()
        self.others: Counter[str] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="dualpath-stack-sampler")

    def start(self) -> StackSampler:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        atexit.register(self.stop)
        log.info("sampling thread %d's stack at %.0f Hz into %s", self.thread_id,
                 1 / self.interval, self.path)
        return self

    def sample(self) -> bool:
        frames = sys._current_frames()
        frame = frames.get(self.thread_id)
        if frame is None:
            return False
        self.counts[fold(frame)] += 1
        self.samples += 1
        if self.others_every and self.samples % self.others_every == 0:
            names = {t.ident: t.name for t in threading.enumerate()}
            me = threading.get_ident()
            for ident, f in frames.items():
                if ident not in (self.thread_id, me):  # the innermost 48 frames: cheaper
                    self.others[f"thread:{names.get(ident, ident)};{fold(f, 48)}"] += 1
        return True

    def write(self) -> None:
        for path, counts in ((self.path, self.counts), (self.others_path, self.others)):
            if path is self.others_path and not self.others_every:
                continue
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(f"{s} {n}\n" for s, n in counts.most_common()))
            os.replace(tmp, path)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2 * self.flush_s)
        try:
            self.write()
        except OSError:
            log.warning("could not write %s", self.path, exc_info=True)

    def _run(self) -> None:
        next_flush = time.monotonic() + self.flush_s
        while not self._stop.wait(self.interval):
            if not self.sample():
                break  # the thread ended
            if time.monotonic() >= next_flush:
                next_flush += self.flush_s
                try:
                    self.write()
                except OSError:
                    log.warning("could not write %s", self.path, exc_info=True)


_SAMPLER: StackSampler | None = None


def start_for_current_thread(path: str, hz: float) -> StackSampler:
    """Sample the calling thread (once per process; later calls return the running sampler)."""
    global _SAMPLER
    if _SAMPLER is None:
        _SAMPLER = StackSampler(threading.get_ident(), path.replace("{pid}", str(os.getpid())),
                                hz).start()
    return _SAMPLER
