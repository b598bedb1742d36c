"""Background samplers for benchmarks: GPU utilisation (NVML) and the engines' path counters.

Each sampler polls on its own thread every `interval_s` from `start()` to `stop()` and keeps
(t, values) rows, t in seconds since start. `rates()` turns cumulative byte counters into
GB/s per interval. A sampler whose source is missing (no NVML, an engine without an agent)
records why in `error` and yields no rows; the benchmark still runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Sampler:
    def __init__(self, read: Callable[[], dict], interval_s: float = 0.5):
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self._read, self.interval_s = read, interval_s
        self.rows: list[tuple[float, dict]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def start(self) -> Sampler:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.rows.append((round(time.monotonic() - self._t0, 3), self._read()))
            except Exception as e:  # noqa: BLE001  (record once, keep the benchmark alive)
                self.error = f"{type(e).__name__}: {e}"
                return
            self._stop.wait(self.interval_s)

    def stop(self) -> list[tuple[float, dict]]:
        """Stop, take a last sample (so totals cover the whole run), return the rows."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            if self.error is None:
                try:
                    self.rows.append((round(time.monotonic() - self._t0, 3), self._read()))
                except Exception as e:  # noqa: BLE001
                    self.error = f"{type(e).__name__}: {e}"
        return self.rows


def rates(rows: list[tuple[float, dict]], key: str,
          scale: float = 1e-9) -> list[tuple[float, float]]:
    """(t, d(key)/dt * scale) between consecutive rows (GB/s for byte counters)."""
    out = []
    for (t0, a), (t1, b) in zip(rows, rows[1:], strict=False):
        if t1 > t0 and key in a and key in b:
            out.append((t1, (b[key] - a[key]) / (t1 - t0) * scale))
    return out


def nvml_reader(indices: list[int] | None = None) -> Callable[[], dict]:
    """Reads {'gpu<i>_util': %, 'gpu<i>_mem_gb': GB} for the given GPUs (default: all)."""
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    n = pynvml.nvmlDeviceGetCount()
    handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in (indices or range(n))}

    def read() -> dict:
        out = {}
        for i, h in handles.items():
            out[f"gpu{i}_util"] = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            out[f"gpu{i}_mem_gb"] = round(pynvml.nvmlDeviceGetMemoryInfo(h).used / 1e9, 2)
        return out

    return read


def gpu_sampler(interval_s: float = 0.5) -> Sampler:
    try:
        read = nvml_reader()
    except Exception as e:  # noqa: BLE001  (no NVML here: say so in the result)
        s = Sampler(lambda: {}, interval_s)
        s.error = f"NVML unavailable: {type(e).__name__}: {e}"
        s.start = lambda: s  # nothing to sample
        return s
    return Sampler(read, interval_s)


def agents_sampler(read_stats: dict[str, Callable[[], dict]], flatten: Callable[[dict], dict],
                   interval_s: float = 0.5) -> Sampler:
    """Samples each named engine's agent stats, flattened to '<name>_<counter>' keys."""
    def read() -> dict:
        out = {}
        for name, get in read_stats.items():
            stats = get()
            if "error" in stats:
                continue
            for k, v in flatten(stats).items():
                out[f"{name}_{k}"] = v
        return out

    return Sampler(read, interval_s)


def mean_util(rows: list[tuple[float, dict]], gpu: int, busy_from_s: float = 0.0,
              busy_to_s: float | None = None) -> float | None:
    """Mean utilisation (%) of one GPU over [busy_from_s, busy_to_s]."""
    xs = [r[f"gpu{gpu}_util"] for t, r in rows if f"gpu{gpu}_util" in r and t >= busy_from_s
          and (busy_to_s is None or t <= busy_to_s)]
    return round(sum(xs) / len(xs), 1) if xs else None
