"""The agentic replayer against an in-process /generate that streams cumulative output ids."""

import asyncio
import json

from aiohttp import web
from aiohttp.test_utils import TestServer

from dualpath.bench.replay import replay, token_ids
from dualpath.bench.trace import Trajectory


def fake_server(prompts: list, fail_on: int | None = None, hang_rid: str | None = None,
                rids: list | None = None) -> web.Application:
    app = web.Application()

    async def gen(request):
        body = await request.json()
        prompts.append(body["input_ids"])
        if rids is not None:
            rids.append(body.get("rid"))
        if fail_on is not None and len(prompts) == fail_on:
            return web.json_response({"error": "boom"}, status=500)
        if hang_rid is not None and (body.get("rid") or "").endswith(hang_rid):
            await asyncio.sleep(3600)  # a request the servers never finish
        n = body["sampling_params"]["max_new_tokens"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        ids = []
        for i in range(n):
            ids.append(len(body["input_ids"]) * 7 + i)  # depends on the prompt
            meta = {"completion_tokens": len(ids), "cached_tokens": len(body["input_ids"]) // 2}
            await resp.write(f"data: {json.dumps({'output_ids': ids, 'meta_info': meta})}\n\n"
                             .encode())
            await asyncio.sleep(0.001)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app.router.add_post("/generate", gen)
    return app


def run_replay(trajs, fail_on=None, hang_rid=None, rids=None, **kw):
    prompts = []

    async def main():
        srv = TestServer(fake_server(prompts, fail_on, hang_rid, rids))
        await srv.start_server()
        try:
            return await replay(str(srv.make_url("")), trajs, **kw)
        finally:
            await srv.close()

    summary, records = asyncio.run(main())
    return summary, records, prompts


def test_context_carries_outputs_and_appends():
    traj = Trajectory(3, 50, [(10, 4), (20, 6), (5, 2)])
    summary, records, prompts = run_replay([traj], seed=9)
    assert [len(p) for p in prompts] == traj.prompt_lengths()
    first, second = prompts[0], prompts[1]
    outputs = [len(first) * 7 + i for i in range(4)]
    assert second == first + outputs + token_ids(9, 3, 1, 20)
    assert first == token_ids(9, 3, -1, 50) + token_ids(9, 3, 0, 10)
    assert summary["turns_ok"] == 3 and summary["errors"] == 0
    assert summary["ttft_s_p50"] > 0 and summary["tpot_s_p50"] > 0
    assert 0.4 < summary["cached_token_ratio"] < 0.6


def test_offline_agents_run_concurrently_and_same_seed_same_prompts():
    trajs = [Trajectory(a, 30, [(5, 3)] * 4) for a in range(8)]
    s1, _, p1 = run_replay(trajs, seed=1)
    s2, _, p2 = run_replay(trajs, seed=1)
    assert sorted(map(tuple, p1)) == sorted(map(tuple, p2))
    assert s1["turns_ok"] == 32 and s1["jct_s"] <= s1["wall_s"]


def test_a_failed_turn_stops_its_agent_and_is_counted():
    trajs = [Trajectory(0, 10, [(5, 2)] * 3)]
    summary, records, prompts = run_replay(trajs, fail_on=2)
    assert len(prompts) == 2 and summary["errors"] == 1 and summary["turns_ok"] == 1
    assert "HTTP 500" in records[1].error


def test_online_mode_waits_for_arrivals():
    trajs = [Trajectory(0, 10, [(1, 1)], arrival_s=0.0), Trajectory(1, 10, [(1, 1)],
                                                                    arrival_s=0.3)]
    _, records, _ = run_replay(trajs, online=True)
    late = next(r for r in records if r.agent == 1)
    assert late.start_s >= 0.3


def test_ttst_is_after_ttft_and_summarized():
    summary, records, _ = run_replay([Trajectory(0, 10, [(5, 4)] * 2)], progress_s=None)
    assert all(r.ttst_s >= r.ttft_s for r in records)
    assert summary["ttst_s_p50"] >= summary["ttft_s_p50"] and summary["stopped_at_s"] is None


def test_online_run_stops_once_ttft_exceeds_the_limit(capsys):
    from dualpath.bench import replay as rp

    trajs = [Trajectory(a, 10, [(1, 2)] * 50) for a in range(4)]
    summary, records, _ = run_replay(trajs, online=True, stop_ttft_s=0.0, progress_s=0.05)
    assert summary["stopped_at_s"] is not None
    assert rp.STOP_WINDOW <= len(records) < 200  # stopped well before the 200 turns
    assert "[replay]" in capsys.readouterr().err
    offline, _, _ = run_replay(trajs[:1], stop_ttft_s=0.0, progress_s=None)
    assert offline["stopped_at_s"] is None and offline["turns_ok"] == 50  # offline: no stop


def test_cli_generate_then_replay(tmp_path):
    from aiohttp.test_utils import TestServer as TS

    from dualpath.bench.agentic import main

    trace = tmp_path / "t.jsonl"
    assert main(["generate", "--preset", "32k", "--scale", "0.01", "--agents", "3",
                 "--out", str(trace)]) == 0
    prompts = []

    async def serve_and_replay():
        srv = TS(fake_server(prompts))
        await srv.start_server()
        try:
            return await asyncio.to_thread(main, ["replay", "--url", str(srv.make_url("")),
                                                  "--trace", str(trace), "--out",
                                                  str(tmp_path / "r.json")])
        finally:
            await srv.close()

    assert asyncio.run(serve_and_replay()) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["errors"] == 0 and result["turns_ok"] == len(prompts) > 0
    assert (tmp_path / "r.turns.jsonl").read_text().count("\n") == result["turns"]


def test_each_turn_has_its_own_request_id_per_replay():
    trajs = [Trajectory(a, 10, [(5, 2)] * 2) for a in range(2)]
    r1, r2 = [], []
    run_replay(trajs, rids=r1)
    run_replay(trajs, rids=r2)
    assert len(set(r1)) == 4 and not set(r1) & set(r2), "unique, and a new tag per replay"
    assert sorted(x.split("-", 1)[1] for x in r1) == ["a0-t0", "a0-t1", "a1-t0", "a1-t1"]


def test_a_stalled_replay_stops_says_which_turns_and_asks_the_servers():
    trajs = [Trajectory(a, 10, [(5, 2)] * 3) for a in range(3)]
    asked = []
    summary, records, _ = run_replay(trajs, hang_rid="a1-t1", stall_s=0.5, progress_s=None,
                                     on_stall=lambda: asked.append(1) or {"pe": "state"})
    stall = summary["stall"]
    assert [x["rid"].split("-", 1)[1] for x in stall["in_flight"]] == ["a1-t1"]
    assert stall["in_flight"][0]["waited_s"] >= 0.5 and not stall["in_flight"][0]["first_token"]
    assert stall["servers"] == {"pe": "state"} and asked == [1]
    assert summary["turns_ok"] == 7 and summary["errors"] == 1
    bad = [r for r in records if r.error]
    assert len(bad) == 1 and bad[0].error.startswith("stalled") and bad[0].turn == 1


def test_no_stall_while_turns_keep_finishing_and_a_failing_diagnosis_is_kept():
    trajs = [Trajectory(0, 10, [(5, 2)] * 3)]
    summary, _, _ = run_replay(trajs, stall_s=5.0, progress_s=None,
                               on_stall=lambda: 1 / 0)
    assert "stall" not in summary and summary["turns_ok"] == 3
    summary, _, _ = run_replay([Trajectory(0, 10, [(5, 2)])], hang_rid="a0-t0", stall_s=0.3,
                               progress_s=None, on_stall=lambda: 1 / 0)
    assert summary["stall"]["servers"]["error"].startswith("ZeroDivisionError")


def test_an_online_turn_after_an_idle_gap_is_not_a_stall():
    """Online: the second agent arrives long after the first finished; its turn has not waited,
    so no stall is declared though nothing finished for longer than stall_s."""
    trajs = [Trajectory(0, 10, [(5, 2)], arrival_s=0.0),
             Trajectory(1, 10, [(5, 300)], arrival_s=0.8)]  # in flight ~0.3 s
    summary, _, _ = run_replay(trajs, online=True, stall_s=0.5, progress_s=None)
    assert "stall" not in summary and summary["turns_ok"] == 2
