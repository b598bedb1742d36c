"""The 1P1D comparison's pieces that run without GPUs: trace shaping, run_once against an
in-process /generate with fake agent stats, SLO attainment, output matching, the table, plots."""

import argparse
import asyncio
import contextlib
import json
import threading
import time

import pytest
from aiohttp.test_utils import TestServer
from test_replay import fake_server

from dualpath.bench import compare_1p1d as cmp
from dualpath.bench import compare_report as report
from dualpath.bench.pd_cluster import DEC_PORT, PRE_PORT
from dualpath.bench.replay import TurnRecord
from dualpath.bench.samplers import Sampler, gpu_sampler, mean_util, rates


def args(**kw):
    base = {"preset": "64k", "scale": 0.25, "initial": 4096, "agents": 4, "max_turns": 3, "seed": 0}
    return argparse.Namespace(**{**base, **kw})


def test_trace_is_truncated_and_seeded():
    a, b = cmp.make_trace(args()), cmp.make_trace(args())
    assert [t.turns for t in a] == [t.turns for t in b]
    assert all(1 <= len(t.turns) <= 3 for t in a) and len(a) == 4
    online = cmp.make_trace(args(), arrival_rate=2.0, seed=1)
    assert all(t.arrival_s > 0 for t in online)


def test_slo_attainment_counts_failures_as_misses():
    def rec(ttft, end, err=None):
        r = TurnRecord(0, 0, 10, 11, start_s=0.0, ttft_s=ttft, end_s=end, output_len=11)
        r.error = err
        return r
    # tpot = (end - ttft) / 10
    recs = [rec(1.0, 1.3), rec(5.0, 5.1), rec(1.0, 2.0), rec(1.0, 1.1, err="boom")]
    assert cmp.slo_attainment(recs) == 0.25


def test_outputs_match_by_agent_and_turn():
    a = {"turn_records": [{"agent": 0, "turn": 0, "output_digest": "x"},
                          {"agent": 0, "turn": 1, "output_digest": "y"}]}
    b = {"turn_records": [{"agent": 0, "turn": 1, "output_digest": "y"},
                          {"agent": 0, "turn": 0, "output_digest": "x"}]}
    assert report.outputs_match(a, b) is True
    b["turn_records"][0]["output_digest"] = "z"
    assert report.outputs_match(a, b) is False
    assert report.outputs_match(a, {"turn_records": []}) is None


def test_samplers_and_rates():
    n = {"v": 0}

    def read():
        n["v"] += 10**9
        return {"x_read_bytes": n["v"]}
    s = Sampler(read, 0.02).start()
    time.sleep(0.15)
    rows = s.stop()
    assert len(rows) >= 3 and s.error is None
    assert all(v > 0 for _, v in rates(rows, "x_read_bytes"))
    assert mean_util([(0.0, {"gpu0_util": 50}), (1.0, {"gpu0_util": 100})], 0) == 75.0
    bad = Sampler(lambda: 1 / 0, 0.01).start()
    time.sleep(0.05)
    bad.stop()
    assert "ZeroDivisionError" in bad.error
    g = gpu_sampler().start()  # no NVML on CI: an error, no rows, no exception
    assert g.stop() == [] or g.error is None


def served(app):
    """(server, loop): an aiohttp test server running in a thread of its own."""
    loop = asyncio.new_event_loop()
    srv = TestServer(app)
    loop.run_until_complete(srv.start_server())
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return srv, loop


def test_run_once_against_a_fake_cluster(monkeypatch, tmp_path):
    counters = {"pe": 0, "de": 0}

    def fake_stats(port, timeout):
        node = "pe" if port == PRE_PORT else "de"
        counters[node] += 64 << 20
        if node == "pe" and counters[node] == 64 << 20:  # the server logs during the run
            with open(tmp_path / "pre.log", "a") as f:
                f.write("ReqTimeStats(rid=a, input_len=9, cached_input_len=0, output_len=1, "
                        "attempts=1, type=prefill): queue_duration=5.00ms, "
                        "transfer_speed=2.00 GB/s, transfer_total=1.00 MB\n")
        return {"storage": {"read_bytes": counters[node]}, "paths": {}}
    monkeypatch.setattr(cmp, "agent_stats", fake_stats)

    prompts = []
    srv, loop = served(fake_server(prompts))
    try:
        class P:
            def __init__(self, name, port):
                self.log_path, self.port = tmp_path / name, port
                self.log_path.write_text("boot\n")

        class C:
            url = str(srv.make_url("")).rstrip("/")
            pre, dec, gpus = P("pre.log", PRE_PORT), P("dec.log", DEC_PORT), (0, 1)
        res = cmp.run_once(C(), cmp.make_trace(args()), online=False, seed=0, cap_gbps=1.0)
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
    assert res["errors"] == 0 and res["turns_ok"] == res["turns"] == len(prompts)
    assert all(r["output_digest"] for r in res["turn_records"])
    assert res["bytes"]["pe_read_bytes"] > 0 and res["pe_read_gbps_mean"] > 0
    assert res["stages"]["prefill"]["queue_s"]["p50"] == 0.005
    u = res["storage_util"]
    assert u["pe_util"] > 0 and u["cluster_util"] == pytest.approx(
        (u["pe_util"] + u["de_util"]) / 2, abs=2e-3)


def test_a_stalled_run_ends_with_the_servers_state(monkeypatch, tmp_path):
    """A turn the servers never finish: run_once ends the replay after stall_s, the turn is an
    error, and the result names it with both agents' stats (or why they could not be read)
    and each log's tail."""
    def fake_stats(port, timeout):
        if port == PRE_PORT:
            return {"storage": {"read_bytes": 0}, "paths": {}, "pf_in_flight_now": 3}
        raise TimeoutError("decode agent did not answer")
    monkeypatch.setattr(cmp, "agent_stats", fake_stats)
    srv, loop = served(fake_server([], hang_rid="a0-t1"))
    try:
        class P:
            def __init__(self, name, port=0):
                self.log_path, self.port = tmp_path / name, port
                self.log_path.write_text("boot\n" + f"{name} last words\n")

            def log_tail(self, n):
                return self.log_path.read_text().splitlines()[-1]

        class C:
            url = str(srv.make_url("")).rstrip("/")
            pre, dec, router = P("pre.log", PRE_PORT), P("dec.log", DEC_PORT), P("router.log")
            gpus = (0, 1)
        trajs = cmp.make_trace(args(agents=1, max_turns=3))
        res = cmp.run_once(C(), trajs, online=False, seed=0, cap_gbps=1.0, stall_s=0.5)
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
    stall = res["stall"]
    assert [x["turn"] for x in stall["in_flight"]] == [1] and res["errors"] == 1
    s = stall["servers"]
    assert s["pe_stats"]["pf_in_flight_now"] == 3 and "did not answer" in s["de_stats"]["error"]
    assert s["prefill_log_tail"] == "pre.log last words" and s["router_log_tail"]


def test_storage_util_counts_only_the_reading_window():
    rows = [(0.0, {"pe_read_bytes": 0}), (10.0, {"pe_read_bytes": 0}),  # prefill, no reads
            (11.0, {"pe_read_bytes": 6e9, "de_read_bytes": 3e9}),
            (12.0, {"pe_read_bytes": 12e9, "de_read_bytes": 6e9}),
            (20.0, {"pe_read_bytes": 12e9, "de_read_bytes": 6e9})]  # decode tail
    u = cmp.storage_util(rows, 6.0)
    assert u == {"window_s": 2.0, "pe_util": 1.0, "de_util": 0.5, "cluster_util": 0.75,
                 "from_s": 10.0, "to_s": 12.0}
    assert cmp.storage_util(rows[:2], 6.0) == {}


def test_clear_blocks_keeps_the_descriptor(tmp_path):
    from dualpath.bench.pd_cluster import clear_blocks

    (tmp_path / "STORE.json").write_text("{}")
    for k in ("ab/cd/abcd01", "ab/ef/abef02", "12/34/123403"):
        (tmp_path / k).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / k).write_bytes(b"x")
    assert clear_blocks(tmp_path) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["STORE.json"]
    assert clear_blocks(tmp_path / "missing") == 0


def synthetic_result():
    def cfg(name, jct):
        rows = [(0.0, {"pe_read_bytes": 0, "de_read_bytes": 0}),
                (1.0, {"pe_read_bytes": 5e9, "de_read_bytes": 4e9})]
        off = {"jct_s": jct, "turns_per_s": 3.0, "ttft_s_p50": 0.5, "ttft_s_p90": 1.0,
               "tpot_s_p50": 0.03, "pe_read_gbps_mean": 5.0, "de_read_gbps_mean": 4.0,
               "errors": 0, "samples": {"agents": rows, "gpu": [(0.0, {"gpu0_util": 40})]}}
        sweep = [{"snic_gbps": cap, "jct_s": jct * f, "storage_util": {"cluster_util": 0.9}}
                 for cap, f in ((3.0, 2.0), (25.0, 0.4))]
        return {"config": name, "oracle": False, "offline": off, "sweep": sweep,
                "online": [{"aps": 1.0, "turns_per_s": 2.0, "ttft_s_p90": 1.5}]}
    return {"gpu_name": "H100", "date": "d", "git_sha": "s", "snic_gbps": 6.25,
            "trace": {"preset": "64k", "scale": 0.25}, "slo": {"ttft_s": 4.0},
            "configs": [cfg("off", 100.0), cfg("on", 55.0)]}


def test_table_shows_the_speedup():
    text = report.table(synthetic_result()["configs"])
    assert "JCT speed-up" in text and "1.82" in text and "off" in text.splitlines()[0]
    sweep = report.sweep_table(synthetic_result()["configs"], 6.25).splitlines()
    assert [float(x.split()[0]) for x in sweep[1:]] == [3.0, 6.25, 25.0]
    assert sweep[2].split()[1:4] == ["100.00", "55.00", "1.82"]


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from dualpath.bench.plots import plot

    files = plot(synthetic_result(), tmp_path)
    assert {p.name for p in files} == {"jct.png", "storage.png", "gpu_util.png", "online.png",
                                       "sweep.png"}
    assert all(p.stat().st_size > 1000 for p in files)
    online_only = synthetic_result()
    for c in online_only["configs"]:
        c["offline"], c["sweep"] = {}, []
    assert {p.name for p in plot(online_only, tmp_path / "online")} == {"online.png"}


def test_gpu_plot_reads_the_configs_own_gpus():
    from dualpath.bench.plots import util_series

    rows = [(0.0, {"gpu0_util": 5, "gpu1_util": 6, "gpu2_util": 70, "gpu3_util": 80})]
    assert util_series({"gpus": [2, 3], "samples": {"gpu": rows}}) == {
        "prefill": [(0.0, 70)], "decode": [(0.0, 80)]}
    assert util_series({"samples": {"gpu": rows}})["decode"] == [(0.0, 6)]


def test_unknown_config_is_refused(capsys):
    with pytest.raises(SystemExit):
        cmp.main(["--out", "/tmp/x", "--configs", "off,bogus"])
    assert "unknown configs" in capsys.readouterr().err


def test_max_aps_within_slo():
    runs = [{"aps": 0.5, "ttft_s_mean": 1.0, "tpot_s_mean": 0.02, "errors": 0},
            {"aps": 1.0, "ttft_s_mean": 3.9, "tpot_s_mean": 0.049, "errors": 0},
            {"aps": 2.0, "ttft_s_mean": 6.0, "tpot_s_mean": 0.02, "errors": 0},
            {"aps": 1.5, "ttft_s_mean": 2.0, "tpot_s_mean": 0.02, "errors": 3}]
    assert cmp.max_aps_within_slo(runs) == 1.0
    assert cmp.max_aps_within_slo(runs[2:]) == 0.0 and cmp.max_aps_within_slo([]) is None


@contextlib.contextmanager
def fake_clusters(monkeypatch, tmp_path, prompts: list):
    """compare_1p1d with its clusters replaced by an in-process /generate (fake_server): yields
    the calls it saw (specs, caps set, flushes, starts)."""
    loop = asyncio.new_event_loop()
    srv = TestServer(fake_server(prompts))
    loop.run_until_complete(srv.start_server())
    threading.Thread(target=loop.run_forever, daemon=True).start()
    calls = {"cap": [], "flush": [], "specs": []}

    class Proc:
        def __init__(self, name, port):
            self.url, self.port = f"http://{name}", port
            self.log_path = tmp_path / f"{name}.log"
            self.log_path.write_text("")

    class FakeCluster:
        def __init__(self, spec, out, timeout):
            calls["specs"].append(spec)
            self.spec, self.gpus = spec, (2 * spec.slot, 2 * spec.slot + 1)
            self.url = str(srv.make_url("")).rstrip("/")
            self.pre, self.dec = Proc("pre", PRE_PORT), Proc("dec", DEC_PORT)
            self.startup_s, self.running = None, False
            spec.root.mkdir(parents=True, exist_ok=True)
            (spec.root / "ab").mkdir(exist_ok=True)
            (spec.root / "ab" / "block").write_bytes(b"x")

        def start(self):
            calls.setdefault("started", []).append((self.spec.slot, len(prompts)))
            self.startup_s, self.running = 0.1, True
            return self

        def stop(self):
            self.running = False

    monkeypatch.setattr(cmp, "PDCluster", FakeCluster)
    monkeypatch.setattr(cmp, "set_snic_cap", lambda port, cap: calls["cap"].append((port, cap))
                        or True)
    monkeypatch.setattr(cmp, "_flush", lambda url: calls["flush"].append(url))
    monkeypatch.setattr(cmp, "agent_stats", lambda port, timeout=5: {"error": "no agent"})
    monkeypatch.setattr(cmp, "gpu_facts", lambda: {"gpu_name": "fake", "gpus": ["g"] * 4})
    monkeypatch.setattr(cmp, "stop_servers_on_sigterm", lambda: calls.setdefault("sig", True))
    try:
        yield calls
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)


@pytest.mark.parametrize("parallel", [False, True])
def test_main_runs_configs_sweep_and_online_end_to_end(monkeypatch, tmp_path, parallel):
    """main() with the cluster replaced by an in-process /generate: each config's offline run,
    a cap sweep point (cap set on the agents, caches flushed, store emptied between runs), an
    online point, result.json saved, the tables printed. --parallel-start: both clusters start
    (on their own GPU pairs) before the first replay, and the results are the same."""
    prompts: list = []
    out = tmp_path / "out"
    with fake_clusters(monkeypatch, tmp_path, prompts) as calls:
        rc = cmp.main(["--out", str(out), "--configs", "stock,on", "--agents", "2",
                       "--max-turns", "2", "--initial", "256", "--scale", "0.02",
                       "--snic-sweep", "3", "--online-aps", "50", "--pd-backend", "dualpath",
                       "--mem-fraction", "0.7", "--store-dir", str(tmp_path / "store")]
                      + (["--parallel-start"] if parallel else []))
    assert rc == 0
    import json

    res = json.loads((out / "result.json").read_text())
    assert res["ok"] and [c["config"] for c in res["configs"]] == ["stock", "on"]
    stock, on = res["configs"]
    assert stock["prefetch_queue"] is False and on["dual_path"] is True
    assert [s["snic_gbps"] for s in on["sweep"]] == [3.0] and on["online"][0]["aps"] == 50
    assert on["max_aps_within_slo"] == 50 and "outputs_match_off" not in on  # no off config
    assert not calls["specs"][0].prefetch_queue and calls["specs"][1].dual_path
    assert {(sp.pd_backend, sp.mem_fraction) for sp in calls["specs"]} == {("dualpath", 0.7)}
    assert (res["pd_backend"], res["mem_fraction"]) == ("dualpath", 0.7)
    # cap: stock sets the prefill's only; on sets both, then restores the main cap
    assert calls["cap"] == [(PRE_PORT, 3.0), (PRE_PORT, 6.25),
                            (PRE_PORT, 3.0), (DEC_PORT, 3.0),
                            (PRE_PORT, 6.25), (DEC_PORT, 6.25)]
    # both servers after each warm-up and before each sweep and online run
    assert len(calls["flush"]) == 12
    assert stock["warmup_s"] > 0 and on["warmup_s"] > 0
    assert not (tmp_path / "store" / "on").exists()  # the store is removed after each config
    assert calls.get("sig", False) is parallel  # threads cannot install the handler
    if parallel:
        assert [sp.slot for sp in calls["specs"]] == [0, 1]
        assert sorted(calls["started"]) == [(0, 0), (1, 0)], "both up before any replay"
    else:
        assert [sp.slot for sp in calls["specs"]] == [0, 0]
        assert calls["started"][0] == (0, 0) and calls["started"][1][1] > 0


def test_parallel_start_needs_two_gpus_per_config(monkeypatch, tmp_path):
    monkeypatch.setattr(cmp, "gpu_facts", lambda: {"gpu_name": "fake", "gpus": ["g"] * 2})
    monkeypatch.setattr(cmp, "PDCluster", lambda *a: pytest.fail("nothing may start"))
    out = tmp_path / "out"
    assert cmp.main(["--out", str(out), "--configs", "off,on", "--agents", "1",
                     "--max-turns", "1", "--parallel-start",
                     "--store-dir", str(tmp_path / "store")]) == 1
    assert "need 4 GPUs, this host has 2" in json.loads((out / "result.json").read_text())[
        "failure"]


def test_torch_profile_is_requested_from_both_servers(tmp_path):
    import gzip
    import http.server
    import json
    import threading
    import types

    from dualpath.bench import compare_1p1d

    got = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            got.append((self.server.server_address[1], self.path,
                        json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *a):
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), H) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        urls = [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
        c = types.SimpleNamespace(pre=types.SimpleNamespace(url=urls[0]),
                                  dec=types.SimpleNamespace(url=urls[1]))
        args = types.SimpleNamespace(torch_profile=5, profile_after=0.01)
        assert compare_1p1d.profile_later(c, tmp_path, types.SimpleNamespace(
            torch_profile=0, profile_after=0.01)) is None
        compare_1p1d.profile_later(c, tmp_path, args).join(5)
    finally:
        for s in servers:
            s.shutdown()
    ports = [s.server_address[1] for s in servers]
    want = [(ports[0], "/start_profile", 5, ["GPU"], str(tmp_path / "prefill")),
            (ports[1], "/start_profile", 50, ["GPU"], str(tmp_path / "decode"))]
    assert sorted((p, path, b["num_steps"], b["activities"], b["output_dir"])
                  for p, path, b in got) == sorted(want)
    with gzip.open(tmp_path / "prefill" / "x-TP-0.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": [{"ph": "X", "cat": "kernel", "name": "k", "ts": 0,
                                    "dur": 10, "args": {}}]}, f)
    s = compare_1p1d.profile_summaries(tmp_path)
    assert s["prefill"]["kernel_busy_fraction"] == 1.0 and s["decode"] is None


def test_recomputed_share_counts_later_turns_only():
    from dualpath.bench.compare_report import recomputed_share

    run = {"stage_records": [{"type": "prefill", "input_len": 1000, "cached_input_len": 0},
                             {"type": "prefill", "input_len": 2000, "cached_input_len": 1500},
                             {"type": "decode", "input_len": 2000, "cached_input_len": 0}],
           "turn_records": [{"turn": 0, "prompt_len": 1000}, {"turn": 1, "prompt_len": 2000}]}
    assert recomputed_share(run) == 0.25
    assert recomputed_share({"stage_records": [], "turn_records": []}) is None


def test_merge_puts_runs_of_separate_calls_side_by_side(tmp_path, capsys):
    import copy
    import lzma

    full = synthetic_result()
    off, on = copy.deepcopy(full), copy.deepcopy(full)
    off["configs"] = [c for c in off["configs"] if c["config"] == "off"]
    on["configs"] = [c for c in on["configs"] if c["config"] == "on"]
    for r in (off, on):
        r["ok"] = True
        for c in r["configs"]:
            c["offline"]["turn_records"] = [{"agent": 0, "turn": 0, "output_digest": "d"}]
    merged = report.merge([off, on])
    assert [c["config"] for c in merged["configs"]] == ["off", "on"]
    assert merged["configs"][1]["outputs_match_off"] is True and merged["ok"]
    on["configs"][0]["offline"]["turn_records"][0]["output_digest"] = "e"
    assert report.merge([off, on])["configs"][1]["outputs_match_off"] is False
    with pytest.raises(ValueError, match="twice"):
        report.merge([off, off])
    other = copy.deepcopy(on)
    other["snic_gbps"] = 3.0
    with pytest.raises(ValueError, match="snic_gbps"):
        report.merge([off, other])
    # the command: plain and xz files, merged result written
    (tmp_path / "off.json").write_text(json.dumps(off))
    with lzma.open(tmp_path / "on.json.xz", "wt") as f:
        json.dump(on, f)
    assert report.main([str(tmp_path / "off.json"), str(tmp_path / "on.json.xz"),
                        "--out", str(tmp_path / "m.json")]) == 0
    assert "JCT speed-up" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "m.json").read_text())["configs"]) == 2


def test_where_the_prefills_reuse_came_from():
    run = {"bytes": {"pe_pf_arrival_matched_tokens": 300, "pe_pf_arrival_new_tokens": 700,
                     "pe_pf_loaded_tokens": 500, "pe_pf_gpu_evicted_tokens": 4096},
           "stage_records": [{"type": "prefill", "input_len": 600},
                             {"type": "prefill", "input_len": 400},
                             {"type": "decode", "input_len": 1000}]}
    assert report.arrival_match_share(run) == 0.3
    assert report.read_rate_per_prefetch(run) is None
    run["bytes"].update(pe_pf_read_s_total=2.0, pe_pf_read_tokens_total=96_000)
    assert report.read_rate_per_prefetch(run) == 48.0
    assert report.prefetch_stage_mean(run, "to_start") is None
    run["bytes"].update(pe_pf_to_start_s_total=3.0, pe_pf_to_start_count=4,
                        pe_pf_read_all_s_total=1.0, pe_pf_done_count=0)
    assert report.prefetch_stage_mean(run, "to_start") == 0.75
    assert report.prefetch_stage_mean(run, "read_all") is None  # none completed
    assert report.storage_share(run) == 0.5
    assert report.arrival_match_share({}) is None and report.storage_share({}) is None
    tl = {"mean_in_queue": 6.95, "mean_in_forward": 2.6, "no_forward_share": 0.199,
          "requests_per_batch": 1.56}
    text = report.table([{"config": "off",
                          "offline": {**run, "jct_s": 1.0, "prefill_timeline": tl}}])
    rows = {line[:16].strip(): line[16:].split() for line in text.splitlines()[1:]}
    assert rows["PE in queue"] == ["6.950"] and rows["PE reqs/batch"] == ["1.560"]
    assert rows["PE arrival match"] == ["0.300"] and rows["PE from storage"] == ["0.500"]
    assert rows["PE GPU evicted"] == ["4096"]


def test_logs_of_every_config_go_into_one_archive(tmp_path):
    import tarfile

    assert cmp.archive_logs(tmp_path) is None  # nothing to keep
    for rel in ("off/server_prefill.log", "on/router.log", "on/stacks_decode.txt",
                "on/stacks_decode.txt.threads", "on/torch_profile/trace.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / "result.json").write_text("{}")
    dest = cmp.archive_logs(tmp_path)
    with tarfile.open(dest) as tar:
        assert sorted(tar.getnames()) == ["off/server_prefill.log", "on/router.log",
                                          "on/stacks_decode.txt", "on/stacks_decode.txt.threads"]
        assert tar.extractfile("on/router.log").read() == b"on/router.log"


def test_router_admission_wait_from_its_metrics():
    """The router's admission histogram, read before and after a replay, gives the replay's
    mean wait; a server without it says nothing."""
    from aiohttp import web
    from prometheus_client import generate_latest

    from dualpath.router.metrics import RouterMetrics

    m = RouterMetrics()
    app = web.Application()

    async def metrics(request):
        return web.Response(body=generate_latest(m.registry), content_type="text/plain")
    app.router.add_get("/metrics", metrics)
    srv, loop = served(app)
    try:
        url = str(srv.make_url(""))
        before = cmp.router_admission(url)
        assert before == (0.0, 0.0)
        for w in (0.5, 1.5):
            m.admission_wait.observe(w)
        after = cmp.router_admission(url)
        assert after == (2.0, 2.0) and cmp.admission_mean(before, after) == 1.0
    finally:
        asyncio.run_coroutine_threadsafe(srv.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
    assert cmp.admission_mean(None, after) is None and cmp.admission_mean(after, after) is None
    assert cmp.router_admission("http://127.0.0.1:9") is None


def test_same_outputs_across_commits_and_setups(tmp_path, capsys):
    """--same-outputs: two runs of one trace from different commits or knobs, compared per
    config by every turn's output; a different trace is refused."""
    import copy

    a = synthetic_result()
    for c in a["configs"]:
        c["offline"]["turn_records"] = [{"agent": 0, "turn": 0, "output_digest": "d"},
                                        {"agent": 0, "turn": 1, "output_digest": "x"}]
    b = copy.deepcopy(a)
    b["git_sha"], b["snic_gbps"] = "other", 3.0  # what merge would refuse
    names = {c["config"] for c in a["configs"]}
    assert report.same_outputs(a, b) == dict.fromkeys(names, True)
    b["configs"][0]["offline"]["turn_records"][1]["output_digest"] = "y"
    assert report.same_outputs(a, b)[b["configs"][0]["config"]] is False
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert report.main(["--same-outputs", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    assert "same outputs: False" in capsys.readouterr().out
    b["configs"][0]["offline"]["turn_records"][1]["output_digest"] = "x"
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert report.main(["--same-outputs", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    b["trace"] = {**a["trace"], "max_turns": 1, "turns": 1}  # truncated: its turns compared
    b["configs"][0]["offline"]["turn_records"].pop()
    assert report.same_outputs(a, b) == dict.fromkeys(names, True)
    b["trace"] = {**a["trace"], "seed": 1}
    with pytest.raises(ValueError, match="traces"):
        report.same_outputs(a, b)


def test_start_all_stops_every_cluster_when_one_fails():
    class C:
        def __init__(self, fail):
            self.fail, self.stops = fail, 0

        def start(self):
            if self.fail:
                raise RuntimeError("decode not healthy")
            time.sleep(0.05)
            return self

        def stop(self):
            self.stops += 1

    cs = [C(False), C(True)]
    with pytest.raises(RuntimeError, match="not healthy"):
        cmp.start_all(cs)
    assert all(c.stops >= 1 for c in cs)
    ok = [C(False), C(False)]
    cmp.start_all(ok)
    assert [c.stops for c in ok] == [0, 0]


def test_the_sample_time_line_shows_rates_gauges_and_the_nearest_gpu_sample(capsys, tmp_path):
    from dualpath.bench.sample_timeline import format_rows, timeline

    run = {"samples": {
        "agents": [(100.0, {"pe_read_bytes": 0, "de_read_bytes": 0, "pe_write_bytes": 0,
                            "de_write_bytes": 0, "pe_pf_queued": 0}),
                   (100.5, {"pe_read_bytes": 3e9, "de_read_bytes": 1e9, "de_write_bytes": 5e8,
                            "pe_write_bytes": 0,
                            "pe_pf_in_flight_now": 4, "pe_pf_budget_used_tokens_now": 40_000,
                            "pe_pf_host_free_tokens_now": 200_000, "pe_pf_queued": 2})],
        "gpu": [(0.0, {"gpu0_util": 10, "gpu1_util": 20}),
                (0.49, {"gpu0_util": 90, "gpu1_util": 80})]}}
    (row,) = timeline(run)
    assert row["t"] == 0.5 and row["pe_read"] == 6.0 and row["de_read"] == 2.0
    assert row["de_write"] == 1.0 and row["pe_write"] == 0.0
    assert (row["pf_in_flight"], row["pf_budget_k"], row["host_free_k"], row["pf_queued"]) == (
        4, 40.0, 200.0, 2)
    assert (row["gpu0"], row["gpu1"]) == (90, 80)
    assert timeline({"samples": {"agents": run["samples"]["agents"][:1]}}) == []
    text = format_rows([row, {"t": 1.0}])
    assert "PE rd" in text and "  6.00" in text and text.splitlines()[2].count("-") >= 5
    (tmp_path / "r.json").write_text(json.dumps({"configs": [{"config": "on", "offline": run}]}))
    assert cmp_report_main(["--timeline", "on", str(tmp_path / "r.json")]) == 0
    assert "PE gpu" in capsys.readouterr().out
    # a sample without the decode's counters (its stats timed out) shows '-', not a spike
    gap = {"samples": {"agents": [(0.0, {"pe_read_bytes": 0, "de_read_bytes": 0}),
                                  (0.5, {"pe_read_bytes": 1e9}),
                                  (1.0, {"pe_read_bytes": 2e9, "de_read_bytes": 6e9})]}}
    rows = timeline(gap)
    assert [r["de_read"] for r in rows] == [None, None] and rows[1]["pe_read"] == 2.0
    assert rows[0]["pf_budget_k"] is None
    # the config's own GPUs (--parallel-start: config 1 on GPUs 2 and 3)
    run2 = {**run, "gpus": [1, 0]}
    assert (timeline(run2)[0]["gpu0"], timeline(run2)[0]["gpu1"]) == (80, 90)


def cmp_report_main(argv):
    from dualpath.bench.compare_report import main

    return main(argv)


def test_online_only_runs_each_configs_own_rates(monkeypatch, tmp_path):
    """--no-offline with per-config rates and --online-duration-s: no offline replay, each
    config runs only its rates, with APS x duration agents; the online table is printed."""
    prompts: list = []
    out = tmp_path / "out"
    with fake_clusters(monkeypatch, tmp_path, prompts):
        rc = cmp.main(["--out", str(out), "--configs", "off,on", "--no-offline",
                       "--online-aps", "off=40,on=60/80", "--online-duration-s", "0.05",
                       "--max-turns", "2", "--initial", "256", "--scale", "0.02",
                       "--warmup-agents", "0", "--slot", "1",
                       "--store-dir", str(tmp_path / "store")])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    off, on = res["configs"]
    assert off["offline"] == {} and on["offline"] == {} and not off["sweep"]
    assert [(o["aps"], o["agents"]) for o in off["online"]] == [(40.0, 2)]
    assert [(o["aps"], o["agents"]) for o in on["online"]] == [(60.0, 3), (80.0, 4)]
    assert res["online_duration_s"] == 0.05 and "outputs_match_off" not in on
    assert len(prompts) == sum(o["turns_ok"] for c in (off, on) for o in c["online"]) > 0


def test_online_rates_parse_per_config():
    assert cmp.parse_aps("0.4,0.8") == {None: [0.4, 0.8]}
    spec = cmp.parse_aps("off=0.35/0.4,on=0.7,1")
    assert spec == {"off": [0.35, 0.4], "on": [0.7], None: [1.0]}
    assert cmp.aps_of(spec, "on") == [1.0, 0.7] and cmp.aps_of(spec, "de") == [1.0]
    for bad in ("bogus=1", "off=0", "on=-1", "off="):
        with pytest.raises(argparse.ArgumentTypeError):
            cmp.parse_aps(bad)


def test_no_offline_needs_online_rates(capsys):
    with pytest.raises(SystemExit):
        cmp.main(["--out", "/tmp/x", "--no-offline"])
    assert "--no-offline needs online rates for every config" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # 'on' would start its servers and run nothing
        cmp.main(["--out", "/tmp/x", "--no-offline", "--online-aps", "off=0.4"])
    with pytest.raises(SystemExit):
        cmp.main(["--out", "/tmp/x", "--configs", "off", "--online-aps", "on=0.4"])
    assert "names configs not in --configs: ['on']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cmp.main(["--out", "/tmp/x", "--concurrent", "--parallel-start"])
    with pytest.raises(SystemExit):  # no abbreviations: --conc would reach the children
        cmp.main(["--out", "/tmp/x", "--conc"])


def test_concurrent_children_get_their_own_config_slot_and_out():
    from pathlib import Path

    from dualpath.bench.concurrent import child_argv

    argv = ["--configs", "off,on", "--concurrent", "--out", "/o", "--agents", "24",
            "--slot=1", "--online-aps", "off=0.4,on=0.7/0.8,1", "--setup-s", "60"]
    assert child_argv(argv, "on", 2, Path("/o/on")) == [
        "--agents", "24", "--online-aps", "on=0.7/0.8,1",
        "--configs", "on", "--slot", "2", "--out", "/o/on"]
    assert child_argv(["--online-aps=off=0.4,on=0.7"], "off", 0, Path("/o"))[0] == \
        "--online-aps=off=0.4"



def test_concurrent_merges_what_the_children_wrote(monkeypatch, tmp_path):
    """One child per config on its own GPU pair, SIGTERM-safe; their results merged into one
    comparison with the baseline's outputs compared; a child without a result fails the
    call but what the others wrote is kept."""
    import subprocess
    from pathlib import Path

    started, silent, broken = [], set(), set()

    class FakeChild:
        def __init__(self, cmd):
            started.append(cmd)
            name, out = cmd[cmd.index("--configs") + 1], cmd[cmd.index("--out") + 1]
            res = synthetic_result()
            res["ok"] = True
            res["configs"] = [c for c in res["configs"] if c["config"] == name]
            for c in res["configs"]:
                c["offline"]["turn_records"] = [{"agent": 0, "turn": 0, "output_digest": "d"}]
            (Path(out) / name).mkdir(parents=True)
            (Path(out) / name / "server_prefill.log").write_text(name)
            if name in broken:  # its servers failed to start: no offline run, a failure
                res["failure"] = f"ServerError: {name} did not start"
                res["ok"] = False
                for c in res["configs"]:
                    del c["offline"]
            if name not in silent:
                (Path(out) / "result.json").write_text(json.dumps(res))

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeChild)
    monkeypatch.setattr("dualpath.bench.smoke.gpu_facts", lambda: {"gpus": ["g"] * 4})
    out = tmp_path / "out"
    assert cmp.main(["--out", str(out), "--configs", "off,on", "--concurrent"]) == 0
    assert [c[c.index("--slot") + 1] for c in started] == ["0", "1"]
    merged = json.loads((out / "result.json").read_text())
    assert merged["concurrent"] and [c["config"] for c in merged["configs"]] == ["off", "on"]
    assert merged["configs"][1]["outputs_match_off"] is True
    import tarfile

    with tarfile.open(out / "logs.tar.xz") as tar:
        assert sorted(tar.getnames()) == ["off/off/server_prefill.log",
                                          "on/on/server_prefill.log"]
    assert cmp.main(["--out", str(tmp_path / "six"), "--configs", "off,on,de",
                     "--concurrent"]) == 1  # 6 GPUs needed, 4 here
    (tmp_path / "lost" / "on").mkdir(parents=True)
    (tmp_path / "lost" / "on" / "result.json").write_text("{}")  # a previous call's: not merged
    silent.add("on")
    assert cmp.main(["--out", str(tmp_path / "lost"), "--configs", "off,on",
                     "--concurrent"]) == 1
    kept = json.loads((tmp_path / "lost" / "result.json").read_text())
    assert kept["failure"] == "no result from ['on']" and not kept["ok"]
    assert [c["config"] for c in kept["configs"]] == ["off"]
    broken.add("off")
    silent.clear()
    assert cmp.main(["--out", str(tmp_path / "broken"), "--configs", "off,on",
                     "--concurrent"]) == 1
    got = json.loads((tmp_path / "broken" / "result.json").read_text())
    assert got["failure"] == "ServerError: off did not start" and not got["ok"]
    assert got["configs"][1]["outputs_match_off"] is None


def test_online_table_rows_and_ratio():
    runs = {"off": [{"aps": 0.4, "agents": 72, "turns_ok": 500, "ttft_s_mean": 5.1,
                     "ttft_s_p90": 9.0, "tpot_s_mean": 0.011, "stopped_at_s": 80.0,
                     "within_slo": False},
                    {"aps": 0.35, "agents": 63, "turns_ok": 1512, "ttft_s_mean": 2.0,
                     "ttft_s_p90": 3.0, "tpot_s_mean": 0.01, "within_slo": True}],
            "on": [{"aps": 0.7, "agents": 126, "turns_ok": 3024, "ttft_s_mean": 1.5,
                    "ttft_s_p90": 2.5, "tpot_s_mean": 0.012, "within_slo": True}]}
    cfgs = [{"config": k, "online": v, "max_aps_within_slo": cmp.max_aps_within_slo(v)}
            for k, v in runs.items()]
    text = report.online_table(cfgs).splitlines()
    assert text[1].split() == ["off", "0.400", "72", "500", "5.100", "9.000", "0.0110", "80.0",
                               "no"]
    assert text[2].split()[-2:] == ["-", "yes"]
    assert text[-1] == "on: max APS within the SLO 0.7 (2.00x off) (of the rates run)"


def test_gil_delta_is_what_a_run_added():
    from dualpath.bench.run_evidence import gil_delta

    def snap(ticks, s5, stalled, in_gc, gc2, mx):
        return {"ticks": ticks, "tick_ms": 5.0, "stalls_ge_ms": {"1": s5 + 2, "5": s5},
                "stalled_s": stalled, "stalls_in_gc": in_gc, "max_ms": mx,
                "gc": {"0": {"count": 1, "pause_s": 0.001, "max_ms": 1.0},
                       "2": {"count": 1, "pause_s": gc2, "max_ms": 80.0}},
                "sites": [["a.py:f:1", 3]]}
    d = gil_delta(snap(100, 4, 0.2, 1, 0.05, 90.0), snap(300, 10, 0.9, 3, 0.25, 120.0))
    assert d["ticks"] == 200 and d["stalls_ge_ms"] == {"1": 6, "5": 6}
    assert d["stalled_s"] == 0.7 and d["stalls_in_gc"] == 2
    assert d["gc_pause_s"] == {"0": 0.0, "2": 0.2} and d["max_ms_so_far"] == 120.0
    assert gil_delta(None, snap(5, 0, 0.0, 0, 0.0, 0.0))["ticks"] == 5
    assert gil_delta({}, None) is None  # the monitor is off


def test_the_stores_are_checked_against_their_file_system(monkeypatch, tmp_path):
    """An online plan whose stores outgrow the tmpfs is named before anything starts, with
    the cap that would fit; a cap that fits, or a small run, says nothing."""
    import shutil
    from pathlib import Path

    from dualpath.bench.run_evidence import kv_bytes_per_token, store_room_warning

    model = Path(__file__).resolve().parents[1] / "configs" / "models" / "llama-3.1-8b-dummy"
    assert kv_bytes_per_token(model) == 2 * 32 * 8 * 128 * 2 and kv_bytes_per_token(tmp_path) == 0
    usage = shutil.disk_usage(tmp_path)._replace(free=100 * 2**30)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage)
    msg = store_room_warning(str(tmp_path / "kv" / "deeper"), 2, 0, 60)
    assert "2 x 60 GiB against 100 GiB free" in msg and "below 45" in msg
    assert store_room_warning(str(tmp_path), 2, 40, 60) is None
    assert store_room_warning(str(tmp_path), 1, 0, 80) is None
    ns = argparse.Namespace(model=model, no_offline=True, online_aps={"on": [0.5], None: [0.25]},
                            online_duration_s=100, agents=24)
    trajs = [types_traj(9000), types_traj(11000)]
    assert cmp.store_written_gb(ns, trajs) == pytest.approx(50 * 10000 * 131072 / 2**30)


def types_traj(final: int):
    import types

    return types.SimpleNamespace(turns=[(final - 100, 100)], prompt_lengths=lambda: [final - 100])
