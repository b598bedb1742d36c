"""Routes DualPath adds to a SGLang server's own HTTP app (the FastAPI app of
`sglang.srt.entrypoints.http_server`, 0.5.17), installed in the server's main process.

The agent lives in the scheduler process on its own port; these routes proxy to it so that the
router needs only the server's URL: ``GET /dualpath/stats`` answers the router's `EngineStats`
(which names the agent URL the router then sends plans to).
"""

from __future__ import annotations

import logging

log = logging.getLogger("dualpath.http_routes")
_installed = False


def agent_url() -> str:
    from dualpath import env
    from dualpath.config import PluginConfig

    cfg = PluginConfig.from_json(env.PLUGIN_CONFIG.get())
    return f"http://{cfg.agent_host}:{cfg.agent_port}"


def install() -> None:
    global _installed
    if _installed:
        return
    import aiohttp
    from fastapi.responses import JSONResponse, Response
    from sglang.srt.entrypoints.http_server import app

    url = agent_url()

    async def dualpath_stats():
        try:
            async with aiohttp.ClientSession() as s, s.get(
                    url + "/dualpath/stats", timeout=aiohttp.ClientTimeout(total=5)) as r:
                return Response(content=await r.read(), status_code=r.status,
                                media_type="application/json")
        except (aiohttp.ClientError, TimeoutError) as e:
            return JSONResponse({"error": f"dualpath agent {url} unreachable: {e}"},
                                status_code=503)

    app.add_api_route("/dualpath/stats", dualpath_stats, methods=["GET"])
    _installed = True
    log.info("dualpath: GET /dualpath/stats on the server port proxies to the agent at %s", url)
