"""The in-process stack sampler (sglang_plugin/stack_sampler.py) and its summary
(dualpath.bench.stacks): a busy thread's hot function dominates the samples, the folded file is
complete while the sampler runs and after it stops, bad files are refused."""

import json
import threading
import time

import pytest

from dualpath.bench import stacks
from dualpath.sglang_plugin import stack_sampler as ss


def hot_loop(stop):
    x = 0
    while not stop.is_set():
        x += sum(range(200))
    return x


def idle_wait(stop):
    stop.wait()


def test_a_busy_threads_hot_function_dominates(tmp_path):
    stop = threading.Event()
    t = threading.Thread(target=hot_loop, args=(stop,))
    t.start()
    path = tmp_path / "stacks.txt"
    # the sampled thread only: folding every thread of the test process (pytest's, earlier
    # tests' pools) on a 2-core CI machine starves the sampler of the GIL
    s = ss.StackSampler(t.ident, path, hz=500, flush_s=0.2, others_every=0).start()
    try:
        time.sleep(0.6)
        assert path.exists()  # flushed while running
        mid = stacks.read_folded(path)
        assert sum(mid.values()) > 0
    finally:
        stop.set()
        t.join()
        s.stop()
    folded = stacks.read_folded(path)
    total, self_c, incl = stacks.summarize(folded)
    assert total == s.samples and total >= 50
    assert incl["test_stack_sampler.py:hot_loop"] >= 0.9 * total
    # every stack starts at the thread's root and ends at a frame of the sampled code
    assert all(k.split(";")[0].startswith("threading.py:") for k in folded)


def test_summary_filters_and_cli(tmp_path, capsys):
    path = tmp_path / "s.txt"
    path.write_text("a.py:main:1;b.py:step:5;c.py:wait:9 30\n"
                    "a.py:main:1;b.py:step:7;d.py:copy:3 10\n"
                    "a.py:main:2;e.py:idle:1 60\n")
    total, self_c, incl = stacks.summarize(stacks.read_folded(path))
    assert total == 100 and incl["b.py:step"] == 40 and self_c["e.py:idle"] == 60
    total, self_c, _ = stacks.summarize(stacks.read_folded(path), match="b.py:step")
    assert total == 40 and self_c == {"c.py:wait": 30, "d.py:copy": 10}
    assert stacks.main([str(path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "100 samples" in out and "60.00%" in out
    path.write_text("no count here\n")
    assert stacks.main([str(path)]) == 2
    assert "expected" in capsys.readouterr().err


def test_a_finished_thread_ends_the_sampler(tmp_path):
    stop = threading.Event()
    t = threading.Thread(target=idle_wait, args=(stop,))
    t.start()
    s = ss.StackSampler(t.ident, tmp_path / "x.txt", hz=200, flush_s=10).start()
    time.sleep(0.1)
    stop.set()
    t.join()
    s._thread.join(2)
    assert not s._thread.is_alive()
    s.stop()
    assert s.samples > 0 and "idle_wait" in (tmp_path / "x.txt").read_text()
    with pytest.raises(ValueError, match="hz"):
        ss.StackSampler(1, tmp_path / "y.txt", hz=0)


def test_the_hook_starts_sampling_the_scheduler_thread(monkeypatch, tmp_path):
    from dualpath.sglang_plugin import hooks

    monkeypatch.setattr(ss, "_SAMPLER", None)
    target = str(tmp_path / "stacks_{pid}.txt")
    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG",
                       json.dumps({"stack_sample": target, "stack_sample_hz": 50}))
    assert hooks.start_stack_sampler("r", object()) == "r"
    s = ss._SAMPLER
    try:
        assert s is not None and s.thread_id == threading.get_ident()
        assert "{pid}" not in str(s.path) and s.path.parent == tmp_path
    finally:
        s.stop()
        monkeypatch.setattr(ss, "_SAMPLER", None)
    monkeypatch.setenv("DUALPATH_PLUGIN_CONFIG", "{}")
    assert hooks.start_stack_sampler("r", object()) == "r" and ss._SAMPLER is None


def test_the_replay_window_of_a_cumulative_file(tmp_path):
    """compare_1p1d reads a server's cumulative stack file before and after the measured replay
    and keeps the difference: start-up and warm-up samples are left out."""
    from dualpath.bench import compare_1p1d, stacks

    f = tmp_path / "stacks_prefill.txt"
    f.write_text("a;startup 50\na;b;work 10\n")
    before = compare_1p1d.stack_files(tmp_path, wait_s=0)
    assert before["decode"] == {} and before["prefill"]["a;b;work"] == 10
    f.write_text("a;startup 50\na;b;work 35\na;c;sync 7\n")
    compare_1p1d.stacks_of_replay(tmp_path, before, wait_s=0)
    got = stacks.read_folded(tmp_path / "stacks_prefill_replay.txt")
    assert got == {"a;b;work": 25, "a;c;sync": 7}
    assert stacks.read_folded(tmp_path / "stacks_decode_replay.txt") == {}
    assert stacks.read_folded(tmp_path / "stacks_prefill_threads_replay.txt") == {}


def test_other_threads_are_sampled_less_often_under_their_names(tmp_path):
    stop = threading.Event()
    main = threading.Thread(target=idle_wait, args=(stop,))
    busy = threading.Thread(target=hot_loop, args=(stop,), name="dualpath-pull-0")
    main.start()
    busy.start()
    path = tmp_path / "stacks.txt"
    s = ss.StackSampler(main.ident, path, hz=500, flush_s=0.2, others_every=5).start()
    try:
        time.sleep(0.5)
    finally:
        stop.set()
        main.join()
        busy.join()
        s.stop()
    others = stacks.read_folded(path.with_name("stacks.txt.threads"))
    pull = sum(n for k, n in others.items() if k.startswith("thread:dualpath-pull-0;"))
    assert 0 < pull <= s.samples // 5 + 1  # one sample in five, each thread once
    assert not any("dualpath-stack-sampler" in k for k in others), "not itself"
    assert all(not k.startswith("thread:") for k in stacks.read_folded(path))
    off = ss.StackSampler(1, tmp_path / "x.txt", others_every=0)
    off.write()
    assert not (tmp_path / "x.txt.threads").exists()
    with pytest.raises(ValueError):
        ss.StackSampler(1, tmp_path / "y.txt", others_every=-1)
