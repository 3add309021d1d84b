"""The aiohttp server: built here, run inside the Faust worker as a service."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import mode
from aiohttp import web

from personify.api.auth import auth_middleware, auth_routes
from personify.api.experiments import experiment_routes
from personify.api.items import item_routes
from personify.api.routes import HTTP_CLIENT, routes
from personify.api.schemas import json_error
from personify.api.segments import segment_routes
from personify.api.ws import close_sockets, ws_routes
from personify.engine.app import app as faust_app
from personify.engine.app import current_config
from personify.engine.logging import get_logger
from personify.engine.metrics import REQUEST_LATENCY

__all__ = ["ApiServer", "build_app"]

_log = get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors_and_timing(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as JSON and time every request."""
    start = time.perf_counter()
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            response = json_error(exc.status, exc.reason, "", exc.text or "")
        else:
            raise
    except Exception:
        _log.exception("request failed", path=request.path)
        response = json_error(500, "internal error", "", "see the server log")
    REQUEST_LATENCY.labels(request.method, name, str(response.status)).observe(
        time.perf_counter() - start
    )
    return response


def build_app() -> web.Application:
    """The aiohttp application with every route of the API."""
    web_app = web.Application(middlewares=[_errors_and_timing, auth_middleware])
    web_app.add_routes(routes)
    web_app.add_routes(item_routes)
    web_app.add_routes(ws_routes)
    web_app.add_routes(auth_routes)
    web_app.add_routes(experiment_routes)
    web_app.add_routes(segment_routes)
    web_app.cleanup_ctx.append(_http_client)
    web_app.on_shutdown.append(close_sockets)
    return web_app


async def _http_client(web_app: web.Application) -> AsyncIterator[None]:
    web_app[HTTP_CLIENT] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    yield
    await web_app[HTTP_CLIENT].close()


@faust_app.service
class ApiServer(mode.Service):  # type: ignore[misc] # mode is untyped
    """Serves the HTTP API on [server] host:port while the worker runs."""

    runner: web.AppRunner | None = None

    async def on_start(self) -> None:
        """Bind the port and start serving."""
        cfg = current_config().server
        self.runner = web.AppRunner(build_app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, cfg.host, cfg.port, reuse_address=True)
        await site.start()
        server: Any = site._server  # an asyncio.Server: it knows the port bound when port = 0
        sockets = server.sockets if server is not None else []
        port = sockets[0].getsockname()[1] if sockets else cfg.port
        print(f"Personify API listening on http://{cfg.host}:{port}", flush=True)
        if not current_config().auth.keys:
            print(
                "No API keys configured ([auth.keys]): the API answers on this machine only, "
                "without authentication.",
                flush=True,
            )
        _log.info("api listening", host=cfg.host, port=port)

    async def on_stop(self) -> None:
        """Stop serving; open requests finish first."""
        if self.runner is not None:
            await self.runner.cleanup()
