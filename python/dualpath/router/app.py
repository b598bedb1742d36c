"""HTTP surface of the router (aiohttp).

  POST /generate, /v1/completions, /v1/chat/completions   proxied to a prefill + decode pair
  GET  /health      200 when at least one prefill and one decode engine take requests and no
                    engine pair is still being warmed (router/warmup.py)
  GET  /metrics     Prometheus text
  GET  /engines     the registry with each engine's state;  POST /engines {engine}  adds one;
  DELETE /engines/{name}  removes one
  POST /flush_cache fanned out to every engine
  GET  /server_info every engine's, by role;  GET /v1/models  answered by a decode engine

Errors: 400 malformed JSON or request, 413 body or prompt too large, 503 + Retry-After when no
engine pair is free (queue full or waited too long), 502 when every attempt hit a dead engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dualpath.router.core import EngineUnreachable, Overloaded, Router, new_rid
from dualpath.router.engines import Engine
from dualpath.scheduler import Request

log = logging.getLogger("dualpath.router")
ROUTER_KEY = web.AppKey("router", Router)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status,
                             headers=headers or None)


def prompt_tokens(body: dict, kind: str, chars_per_token: float) -> int:
    """The prompt length the scheduler counts: exact for token ids, estimated for text."""
    def from_text(text: str) -> int:
        return max(1, round(len(text) / chars_per_token))

    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest(400, "'messages' must be a non-empty list")
        n = 0
        for m in msgs:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # OpenAI content parts
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            n += 8 + (from_text(content) if isinstance(content, str) else 0)
        return n
    prompt = body.get("input_ids") if kind == "generate" else body.get("prompt")
    if prompt is None and kind == "generate":
        prompt = body.get("text")
    if isinstance(prompt, str):
        return from_text(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list) and prompt:
        raise BadRequest(400, "batch requests are not supported by the router: send one "
                              "prompt per request")
    field = "'input_ids' or 'text'" if kind == "generate" else "'prompt'"
    raise BadRequest(400, f"missing or empty {field}")


def max_new_tokens(body: dict, kind: str, default: int) -> int:
    if kind == "generate":
        v = (body.get("sampling_params") or {}).get("max_new_tokens", default)
    else:
        v = body.get("max_completion_tokens", body.get("max_tokens", default))
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise BadRequest(400, f"max tokens must be a non-negative integer, got {v!r}")
    return v


ENDPOINTS = {"/generate": "generate", "/v1/completions": "completions",
             "/v1/chat/completions": "chat"}


def make_app(router: Router) -> web.Application:
    cfg = router.cfg
    app = web.Application(client_max_size=cfg.max_body_bytes)
    app[ROUTER_KEY] = router
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)

    async def proxy(request: web.Request) -> web.StreamResponse:
        path = request.path
        kind = ENDPOINTS[path]
        t0 = time.perf_counter()
        status = 500
        try:
            if request.content_length and request.content_length > cfg.max_body_bytes:
                raise BadRequest(413, f"body over {cfg.max_body_bytes} bytes")
            try:
                body = await request.json()
            except web.HTTPRequestEntityTooLarge:
                raise BadRequest(413, f"body over {cfg.max_body_bytes} bytes") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(400, f"body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise BadRequest(400, "body must be a JSON object")
            n = prompt_tokens(body, kind, cfg.chars_per_token)
            if n > cfg.max_prompt_tokens:
                raise BadRequest(413, f"prompt of ~{n} tokens exceeds {cfg.max_prompt_tokens}")
            block = router.sched_cfg.block_tokens
            hit = n - n % block if cfg.hit_estimate == "prompt" else 0
            req = Request(new_rid(), n, hit, max_new_tokens(body, kind,
                                                            cfg.default_max_new_tokens))
            if req.kv_tokens > router.max_decode_kv():  # would wait forever and block others
                raise BadRequest(413, f"prompt + max tokens (~{req.kv_tokens}) exceed every "
                                      f"decode engine's KV capacity ({router.max_decode_kv()})")
            resp = await router.handle(request, body, path, req)
            status = resp.status
            return resp
        except BadRequest as e:
            status = e.status
            return _error(e.status, str(e))
        except Overloaded as e:
            status = 503
            return _error(503, f"overloaded: {e}", **{"Retry-After": str(cfg.retry_after_s)})
        except EngineUnreachable as e:
            status = 502
            return _error(502, f"no reachable engine pair after {cfg.max_attempts} "
                               f"attempt(s): {e}")
        finally:
            router.metrics.requests.labels(kind, str(status)).inc()
            router.metrics.latency.labels(kind).observe(time.perf_counter() - t0)

    async def health(request: web.Request) -> web.Response:
        roles = {router.engines[n].role for n, up in router.up.items() if up}
        warming = router.warmer.warming
        ok = {"prefill", "decode"} <= roles and not warming
        return web.json_response({"ok": ok, "engines": router.up, "warming": warming},
                                 status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        data = generate_latest(router.metrics.registry)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_engines(request: web.Request) -> web.Response:
        return web.json_response([{**e.to_dict(), "up": router.up.get(e.name, False)}
                                  for e in router.engines.values()])

    async def add_engine(request: web.Request) -> web.Response:
        try:
            e = Engine.from_dict(await request.json())
            router.add_engine(e)
        except (ValueError, TypeError, json.JSONDecodeError) as err:
            return _error(400, str(err))
        except KeyError as err:
            return _error(409, str(err.args[0]))
        return web.json_response(e.to_dict(), status=201)

    async def remove_engine(request: web.Request) -> web.Response:
        try:
            e = router.remove_engine(request.match_info["name"])
        except KeyError:
            return _error(404, f"no engine {request.match_info['name']!r}")
        return web.json_response(e.to_dict())

    async def flush_cache(request: web.Request) -> web.Response:
        async def one(e: Engine):
            try:
                async with router.session.post(e.url + "/flush_cache") as r:
                    return e.name, r.status
            except Exception as err:  # noqa: BLE001  (report per engine, never fail the fan-out)
                return e.name, f"error: {err}"
        results = dict(await asyncio.gather(*(one(e) for e in router.engines.values())))
        ok = all(v == 200 for v in results.values())
        return web.json_response(results, status=200 if ok else 502)

    async def server_info(request: web.Request) -> web.Response:
        """Each engine's /server_info, grouped by role (as SGLang's mini load balancer does)."""
        async def one(e: Engine):
            try:
                async with router.session.get(e.url + "/server_info") as r:
                    return e.role, (await r.json()) if r.status == 200 else {"status": r.status}
            except Exception as err:  # noqa: BLE001
                return e.role, {"error": str(err)}
        out: dict[str, list] = {"prefill": [], "decode": []}
        for role, info in await asyncio.gather(*(one(e) for e in router.engines.values())):
            out[role].append(info)
        return web.json_response(out)

    async def models(request: web.Request) -> web.Response:
        dec = [e for e in router.engines.values() if e.role == "decode" and router.up.get(e.name)]
        if not dec:
            return _error(503, "no decode engine is up")
        async with router.session.get(dec[0].url + "/v1/models") as r:
            return web.Response(status=r.status, body=await r.read(),
                                content_type="application/json")

    for path in ENDPOINTS:
        app.router.add_post(path, proxy)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/engines", list_engines)
    app.router.add_post("/engines", add_engine)
    app.router.add_delete("/engines/{name}", remove_engine)
    app.router.add_post("/flush_cache", flush_cache)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/server_info", server_info)
    return app
