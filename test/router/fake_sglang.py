"""In-process stand-ins for SGLang prefill and decode servers that speak the PD request protocol:
both get the same body with bootstrap_host/port/room; the decode answers only once "its" prefill
(same bootstrap_room) has arrived, as SGLang's decode waits for the prefill's KV."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer

from dualpath.router.contract import EngineStats


@dataclass
class Rooms:
    """Shared between fakes: which bootstrap rooms prefills have seen."""

    seen: dict[int, asyncio.Event] = field(default_factory=dict)

    def event(self, room: int) -> asyncio.Event:
        return self.seen.setdefault(room, asyncio.Event())


@dataclass
class FakeEngine:
    role: str
    rooms: Rooms
    delay_s: float = 0.0
    status: int = 200
    stats: EngineStats | None = None
    late_status: int | None = None  # prefill: accept the room, then fail after delay_s
    chunk_delay_s: float = 0.0  # decode: pause between streamed chunks
    bodies: list[dict] = field(default_factory=list)
    agent: bool = False  # also act as the engine's dualpath agent (stats name it; takes plans)
    plans: list[dict] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # "plan:<rid>" / "request:<rid>", in order
    server: TestServer | None = None

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def app(self) -> web.Application:
        app = web.Application()

        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.bodies.append(body)
            self.events.append(f"request:{body.get('rid')}")
            room = body.get("bootstrap_room")
            if self.status != 200:
                return web.json_response({"error": {"message": "fake failure"}},
                                         status=self.status)
            if self.role == "prefill":
                self.rooms.event(room).set()
                await asyncio.sleep(self.delay_s)
                if self.late_status:
                    return web.json_response({"error": {"message": "late failure"}},
                                             status=self.late_status)
                return web.json_response({"meta_info": {"id": "p"}, "output_ids": [1]})
            try:  # decode: wait for the prefill with the same room, like SGLang's bootstrap
                await asyncio.wait_for(self.rooms.event(room).wait(), 2.0)
            except TimeoutError:
                return web.json_response({"error": "bootstrap timeout"}, status=500)
            await asyncio.sleep(self.delay_s)
            ids = [7, 8, 9]
            if not body.get("stream"):
                return web.json_response({"output_ids": ids, "text": "abc",
                                          "meta_info": {"completion_tokens": 3}})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(1, 4):
                chunk = {"output_ids": ids[:i], "meta_info": {"completion_tokens": i}}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(self.chunk_delay_s)
            await resp.write(b"data: [DONE]\n\n")
            return resp

        async def stats(request: web.Request) -> web.Response:
            if self.stats is None:
                return web.Response(status=404)
            obj = json.loads(self.stats.encode())
            if self.agent:
                obj["agent"] = self.url
            return web.json_response(obj)

        async def plan(request: web.Request) -> web.Response:
            body = await request.json()
            self.plans.append(body)
            self.events.append(f"plan:{body.get('rid')}")
            return web.json_response({"ok": True})

        async def ok(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        async def models(request: web.Request) -> web.Response:
            return web.json_response({"data": [{"id": "fake"}]})

        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, handle)
        app.router.add_get("/dualpath/stats", stats)
        app.router.add_post("/dualpath/plan", plan)
        app.router.add_get("/health", ok)
        app.router.add_post("/flush_cache", ok)
        app.router.add_get("/v1/models", models)
        app.router.add_get("/server_info", ok)
        return app

    async def start(self) -> FakeEngine:
        self.server = TestServer(self.app())
        await self.server.start_server()
        return self

    async def close(self) -> None:
        await self.server.close()
