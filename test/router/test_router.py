"""The router over real HTTP against in-process fake prefill/decode servers."""

import asyncio
import dataclasses
import json
import socket
from contextlib import asynccontextmanager

import pytest
from aiohttp.test_utils import TestClient, TestServer
from fake_sglang import FakeEngine, Rooms

from dualpath.config import RouterConfig, SchedulerConfig
from dualpath.router.app import make_app
from dualpath.router.contract import ContractError, EngineStats
from dualpath.router.core import Router
from dualpath.router.engines import Engine


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed


@asynccontextmanager
async def cluster(n_pre=1, n_de=1, cfg=None, sched=None, dead_pre=0, kv=1 << 40, warm=False,
                  **fake):
    rooms = Rooms()
    pres = [await FakeEngine("prefill", rooms, **fake).start() for _ in range(n_pre)]
    des = [await FakeEngine("decode", rooms, **fake).start() for _ in range(n_de)]
    # dead ones first: with equal loads the scheduler picks the lowest index, i.e. them
    engines = [Engine.from_dict({"role": "prefill", "url": dead_url(), "bootstrap_port": 9})
               for _ in range(dead_pre)]
    engines += [Engine.from_dict({"role": "prefill", "url": p.url, "bootstrap_port": 8998 + i})
                for i, p in enumerate(pres)]
    engines += [Engine.from_dict({"role": "decode", "url": d.url, "kv_capacity": kv})
                for d in des]
    cfg = dataclasses.replace(cfg or RouterConfig(stats_interval_s=0.05), warm_pairs=warm)
    router = Router(cfg, engines, sched)
    client = TestClient(TestServer(make_app(router)))
    await client.start_server()
    try:
        yield client, router, pres, des
    finally:
        await client.close()
        for f in pres + des:
            await f.close()


def run(coro):
    return asyncio.run(coro)


def test_streaming_generate_reaches_both_with_one_bootstrap_room():
    async def main():
        async with cluster() as (client, router, (pre,), (dec,)):
            body = {"input_ids": list(range(100)), "stream": True,
                    "sampling_params": {"max_new_tokens": 3}}
            r = await client.post("/generate", json=body)
            assert r.status == 200
            text = await r.text()
            assert text.count("data: ") == 4 and text.rstrip().endswith("[DONE]")
            (pb,), (db,) = pre.bodies, dec.bodies
            assert pb == db, "prefill and decode get the same body"
            assert pb["bootstrap_host"] == "127.0.0.1" and pb["bootstrap_port"] == 8998
            assert 0 <= pb["bootstrap_room"] < 2**63
            assert pb["input_ids"] == body["input_ids"]
            assert not router.scheduler.running and not router.scheduler.queue
    run(main())


def test_non_streaming_chat_and_completions():
    async def main():
        async with cluster() as (client, _, _, (dec,)):
            r = await client.post("/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status == 200 and (await r.json())["text"] == "abc"
            r = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
            assert r.status == 200
            assert len(dec.bodies) == 2
    run(main())


def test_load_spreads_over_engines():
    async def main():
        async with cluster(n_pre=2, n_de=2, delay_s=0.2) as (client, _, pres, des):
            body = {"input_ids": [1] * 500, "sampling_params": {"max_new_tokens": 2}}
            rs = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(4)))
            assert [r.status for r in rs] == [200] * 4
            assert [len(p.bodies) for p in pres] == [2, 2]
            assert [len(d.bodies) for d in des] == [2, 2]
    run(main())


@pytest.mark.parametrize("path,body,status,msg", [
    ("/generate", b"{not json", 400, "not valid JSON"),
    ("/generate", b"[1, 2]", 400, "JSON object"),
    ("/generate", b"{}", 400, "missing"),
    ("/generate", json.dumps({"input_ids": [[1], [2]]}).encode(), 400, "batch"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', 400, "max tokens"),
    ("/generate", json.dumps({"input_ids": [1] * 2000}).encode(), 413, "exceeds"),
    ("/generate", b'{"text": "' + b"a" * 70_000 + b'"}', 413, "body over"),
])
def test_bad_requests_get_clear_4xx(path, body, status, msg):
    async def main():
        cfg = RouterConfig(max_prompt_tokens=1000, max_body_bytes=65536)
        async with cluster(cfg=cfg) as (client, _, (pre,), _):
            r = await client.post(path, data=body, headers={"Content-Type": "application/json"})
            assert r.status == status
            assert msg in (await r.json())["error"]["message"]
            assert pre.bodies == [], "nothing reaches an engine"
    run(main())


def test_saturation_answers_503_with_retry_after():
    async def main():
        # the decode engine holds one request's KV at a time: 100 + 10 tokens of 150
        cfg = RouterConfig(max_queue=1, stats_interval_s=5)
        async with cluster(cfg=cfg, kv=150, delay_s=0.5) as (client, router, _, (dec,)):
            body = {"input_ids": [1] * 100, "sampling_params": {"max_new_tokens": 10}}
            first = asyncio.create_task(client.post("/generate", json=body))
            await asyncio.sleep(0.1)
            second = asyncio.create_task(client.post("/generate", json=body))
            await asyncio.sleep(0.1)
            third = await client.post("/generate", json=body)
            assert third.status == 503 and third.headers["Retry-After"] == "2"
            assert (await first).status == 200 and (await second).status == 200
            assert len(dec.bodies) == 2
    run(main())


def test_unreachable_engine_is_retried_elsewhere_and_marked_down():
    async def main():
        cfg = RouterConfig(stats_interval_s=30)
        async with cluster(dead_pre=1, cfg=cfg) as (client, router, (pre,), _):
            for i in range(3):
                r = await client.post("/generate", json={"input_ids": [1] * 10, "rid": f"c{i}"})
                assert r.status == 200
            dead = [n for n, e in router.engines.items() if e.bootstrap_port == 9][0]
            assert router.up[dead] is False and len(pre.bodies) == 3
            rids = sorted(b["rid"] for b in pre.bodies)  # a client's id; a retry's is its own
            assert len([x for x in rids if x.endswith("-retry1")]) == 1
            assert sorted(x.removesuffix("-retry1") for x in rids) == ["c0", "c1", "c2"]
            metrics = await (await client.get("/metrics")).text()
            assert f'dualpath_router_retries_total{{engine="{dead}"}} 1.0' in metrics
            listed = {e["name"]: e["up"] for e in await (await client.get("/engines")).json()}
            assert listed[dead] is False
    run(main())


def test_all_engines_dead_is_502():
    async def main():
        async with cluster(cfg=RouterConfig(stats_interval_s=30)) as (client, router, pres, _):
            await pres[0].close()
            r = await client.post("/generate", json={"input_ids": [1]})
            assert r.status in (502, 503)
    run(main())


def test_prefill_error_is_returned_and_decode_dropped():
    async def main():
        async with cluster() as (client, router, (pre,), (dec,)):
            pre.status = 400
            r = await client.post("/generate", json={"input_ids": [1, 2, 3]})
            assert r.status == 400 and "fake failure" in await r.text()
            await asyncio.sleep(0.05)
            assert not router.scheduler.running
    run(main())


def test_engines_added_and_removed_at_runtime():
    async def main():
        async with cluster() as (client, router, _, _):
            rooms = Rooms()
            extra = await FakeEngine("decode", rooms).start()
            try:
                r = await client.post("/engines", json={"role": "decode", "url": extra.url,
                                                        "name": "d-extra"})
                assert r.status == 201
                assert (await client.post("/engines", json={"role": "decode", "url": extra.url,
                                                            "name": "d-extra"})).status == 409
                assert (await client.post("/engines", json={"role": "prefill",
                                                            "url": extra.url})).status == 400
                assert (await client.post("/engines", json={"url": "x"})).status == 400
                names = [e["name"] for e in await (await client.get("/engines")).json()]
                assert "d-extra" in names and len(names) == 3
                assert (await client.delete("/engines/d-extra")).status == 200
                assert (await client.delete("/engines/d-extra")).status == 404
                r = await client.post("/generate", json={"input_ids": [1]})
                assert r.status == 200 and extra.bodies == []
            finally:
                await extra.close()
    run(main())


def test_stats_feed_the_scheduler():
    async def main():
        async with cluster(kv=10**6) as (client, router, (pre,), (dec,)):
            dec.stats = EngineStats(engine="d", role="decode", seq=0, tok=0, free_kv_tokens=777,
                                    read_queue_tokens=64)
            for _ in range(100):
                await asyncio.sleep(0.02)
                if router.scheduler.de.free_kv[0] == 777:
                    break
            assert router.scheduler.de.free_kv[0] == 777
            assert router.scheduler.de_read_q[0] == 64
            assert (await client.get("/health")).status == 200
    run(main())


def test_flush_cache_fans_out_and_models_forward():
    async def main():
        async with cluster(n_pre=1, n_de=2) as (client, _, _, _):
            r = await client.post("/flush_cache")
            assert r.status == 200 and len(await r.json()) == 3
            r = await client.get("/v1/models")
            assert (await r.json())["data"][0]["id"] == "fake"
            info = await (await client.get("/server_info")).json()
            assert len(info["prefill"]) == 1 and len(info["decode"]) == 2
    run(main())


def test_baseline_policy_round_robin():
    async def main():
        cfg = RouterConfig(policy="round_robin")
        async with cluster(n_pre=2, n_de=2, cfg=cfg) as (client, _, pres, des):
            for _ in range(4):
                assert (await client.post("/generate", json={"input_ids": [1]})).status == 200
            assert [len(p.bodies) for p in pres] == [2, 2]
    run(main())


def test_contract_round_trip_and_rejections():
    s = EngineStats(engine="e", role="prefill", seq=1, tok=2, free_kv_tokens=3,
                    read_tokens_total=4, read_busy_s_total=0.5)
    assert EngineStats.decode(s.encode()) == s
    assert EngineStats.decode({**json.loads(s.encode()), "future_field": 1}) == s
    with pytest.raises(ContractError, match="version"):
        EngineStats.decode({**json.loads(s.encode()), "version": 2})
    with pytest.raises(ContractError, match="non-negative"):
        EngineStats.decode({**json.loads(s.encode()), "tok": -1})
    with pytest.raises(ContractError, match="JSON"):
        EngineStats.decode(b"{")
    with pytest.raises(ContractError, match="role"):
        EngineStats(engine="e", role="both", seq=0, tok=0, free_kv_tokens=0)


def test_cli_starts_serves_and_stops(tmp_path):
    import sys
    import urllib.request

    from dualpath.bench.servers import ServerProcess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = ServerProcess("router", ["-m", "dualpath.router", "--prefill", dead_url(), "8998",
                                   "--decode", dead_url(), "--port", str(port),
                                   "--stats-interval-s", "60", "--warm-timeout-s", "1"],
                        port, tmp_path / "router.log",
                        python=sys.executable)
    srv.start()
    try:
        srv.wait_healthy(30)
        with urllib.request.urlopen(srv.url + "/engines", timeout=5) as r:
            engines = json.loads(r.read())
        assert sorted(e["role"] for e in engines) == ["decode", "prefill"]
        assert engines[0]["bootstrap_port"] == 8998
    finally:
        srv.stop()
    text = (tmp_path / "router.log").read_text()
    assert "router config" in text
    assert "not warmed within 1 s" in text  # dead engines: given up on, then healthy


def test_request_larger_than_any_decode_engine_is_413():
    async def main():
        async with cluster(kv=1000) as (client, _, (pre,), _):
            r = await client.post("/generate", json={"input_ids": [1] * 10,
                                                     "sampling_params": {"max_new_tokens": 5000}})
            assert r.status == 413 and "KV capacity" in (await r.json())["error"]["message"]
            assert pre.bodies == []
    run(main())


def test_prefill_failing_mid_stream_ends_the_stream_with_an_error():
    async def main():
        async with cluster(cfg=RouterConfig(stats_interval_s=30)) as (client, router, (pre,),
                                                                      (dec,)):
            pre.late_status, pre.delay_s = 500, 0.2  # fails after the decode started streaming
            dec.chunk_delay_s = 1.0
            t0 = asyncio.get_running_loop().time()
            r = await client.post("/generate", json={"input_ids": [1, 2], "stream": True})
            text = await r.text()
            assert r.status == 200 and "prefill" in text and "failed" in text
            assert asyncio.get_running_loop().time() - t0 < 1.5, "the stream was cut short"
            assert not router.scheduler.running
    run(main())


def test_removed_and_readded_engine_stays_down_until_it_answers():
    async def main():
        async with cluster(cfg=RouterConfig(stats_interval_s=30)) as (client, router, _, _):
            name = next(n for n, e in router.engines.items() if e.role == "prefill")
            e = router.engines[name]
            router.set_up(name, False)
            router.remove_engine(name)
            router.add_engine(e)
            router.up[name] = False
            router._rebuild()
            assert name in router.scheduler._down
    run(main())


@pytest.mark.parametrize("side", ["de", "split", "pe"])
def test_plans_reach_both_agents_before_the_request(side):
    async def main():
        sched = SchedulerConfig(read_side=side)
        async with cluster(sched=sched, agent=True) as (client, router, (pre,), (dec,)):
            for f, role in ((pre, "prefill"), (dec, "decode")):
                f.stats = EngineStats(engine=role, role=role, seq=0, tok=0, free_kv_tokens=10**6)
            for _ in range(100):  # the router learns the agents from the stats
                await asyncio.sleep(0.02)
                if len(router.agents) == 2:
                    break
            body = {"input_ids": list(range(640)), "sampling_params": {"max_new_tokens": 3}}
            assert (await client.post("/generate", json=body)).status == 200
            (pb,), (db,) = pre.bodies, dec.bodies
            assert pb["rid"] == db["rid"], "both servers know the request by one id"
            if side == "pe":  # the default needs no message
                assert pre.plans == dec.plans == []
                return
            (pp,), (dp,) = pre.plans, dec.plans
            assert pp == dp and pp["rid"] == pb["rid"] and pp["de_agent"] == dec.url
            assert pp["de_fraction"] == (1.0 if side == "de" else pytest.approx(0.5, abs=0.5))
            for f in (pre, dec):
                assert f.events.index(f"plan:{pb['rid']}") < f.events.index(
                    f"request:{pb['rid']}")
    run(main())


async def _health(client):
    r = await client.get("/health")
    return r.status, await r.json()


def test_pairs_are_warmed_before_health_and_again_when_added():
    async def main():
        async with cluster(n_de=2, warm=True, delay_s=0.3) as (client, router, (pre,), des):
            status, body = await _health(client)
            assert status == 503 and len(body["warming"]) == 2  # one per pair, in flight
            for _ in range(100):
                if (await _health(client))[0] == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await _health(client))[0] == 200
            assert len(pre.bodies) == 2 and all(len(d.bodies) == 1 for d in des)
            rooms = sorted(b["bootstrap_room"] for b in pre.bodies)
            assert rooms == sorted(d.bodies[0]["bootstrap_room"] for d in des)
            for b in pre.bodies:
                assert b["input_ids"] == [0] and b["sampling_params"]["max_new_tokens"] == 1
                assert b["rid"].startswith("dualpath-warmup-")
            # an engine added later: only its new pair is warmed
            extra = await FakeEngine("prefill", pre.rooms).start()
            try:
                r = await client.post("/engines", json={"role": "prefill", "url": extra.url,
                                                        "bootstrap_port": 9000, "name": "p2"})
                assert r.status == 201
                for _ in range(100):
                    if (await _health(client))[0] == 200 and len(extra.bodies) == 2:
                        break
                    await asyncio.sleep(0.05)
                assert len(extra.bodies) == 2 and len(pre.bodies) == 2
                assert router.warmer.done == dict.fromkeys(router.warmer.done, True)
                assert len(router.warmer.done) == 4
                assert (await client.delete("/engines/p2")).status == 200
                assert len(router.warmer.done) == 2  # re-added: warmed again
            finally:
                await extra.close()
    run(main())


def test_failing_pair_is_retried_then_given_up_and_health_recovers(caplog):
    async def main():
        cfg = RouterConfig(stats_interval_s=30, warm_timeout_s=0.6)
        async with cluster(cfg=cfg, warm=True, status=500) as (client, router, (pre,), (dec,)):
            assert (await _health(client))[0] == 503
            for _ in range(60):
                if (await _health(client))[0] == 200:
                    break
                await asyncio.sleep(0.05)
            status, body = await _health(client)
            assert status == 200 and body["warming"] == []
            assert list(router.warmer.done.values()) == [False]
            assert len(pre.bodies) >= 2  # retried before giving up
    with caplog.at_level("WARNING", logger="dualpath.router"):
        run(main())
    assert "not warmed within" in caplog.text
