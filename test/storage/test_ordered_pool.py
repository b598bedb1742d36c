"""The storage read pool: lowest key first, ties in submission order; errors wait for what runs."""

import threading
import time

import pytest

from dualpath.storage.ordered_pool import OrderedPool


def blocked_pool(workers=1):
    """A pool whose workers are all held by a task until the returned event is set."""
    pool, release, started = OrderedPool(workers, "t"), threading.Event(), threading.Semaphore(0)

    def hold():
        started.release()
        release.wait(10)
    for _ in range(workers):
        pool.submit(-1, hold)
    for _ in range(workers):
        assert started.acquire(timeout=10)
    return pool, release


def test_lowest_key_first_then_first_queued():
    pool, release = blocked_pool()
    ran = []
    fs = [pool.submit(k, ran.append, name) for k, name in
          ((5, "e"), (1, "a"), (3, "c"), (1, "b"), (4, "d"))]
    release.set()
    for f in fs:
        f.result(10)
    assert ran == ["a", "b", "c", "d", "e"]
    pool.shutdown()


def test_map_keeps_input_order_and_waits_for_running_tasks_on_error():
    pool = OrderedPool(2, "t")
    assert pool.map(0, lambda x, y: x * y, [1, 2, 3], [4, 5, 6]) == [4, 10, 18]
    done = threading.Event()

    def slow(x):
        if x == "fail":
            raise OSError("disk")
        time.sleep(0.2)
        done.set()
    with pytest.raises(OSError, match="disk"):
        pool.map(0, slow, ["ok", "fail"])
    assert done.is_set(), "the running task finished before map raised"
    pool.shutdown()
    one = OrderedPool(1, "t")
    ran, after = [], threading.Event()

    def fail_then(x):
        ran.append(x)
        if x == 0:  # the worker's next task waits until map has raised (and cancelled)
            one.submit(-1, after.wait, 10)
            raise ValueError("x")
    cancelled = []
    with pytest.raises(ValueError):
        one.map(0, fail_then, [0, 1, 2], on_cancel=cancelled.append)
    after.set()
    one.shutdown()
    assert ran == [0], "tasks not started when the first failed are cancelled"
    assert cancelled == [1, 2], "and the caller hears of each"
    # an error while queueing (unequal lengths): what was queued is waited for, not left
    two = OrderedPool(1, "t")
    with pytest.raises(ValueError):
        two.map(0, lambda x, y: time.sleep(0.05), [1, 2, 3], [1, 2])
    assert all(item[2].cancelled() for item in two._heap), "queued ones were cancelled"
    two.shutdown()


def test_shutdown_runs_what_is_queued_and_refuses_more():
    pool, release = blocked_pool()
    f = pool.submit(0, lambda: 7)
    release.set()
    pool.shutdown(wait=True)
    assert f.result(1) == 7
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(0, lambda: 1)
    with pytest.raises(ValueError):
        OrderedPool(0, "t")
