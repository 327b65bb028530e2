"""The worker's own small HTTP server, on its event loop: ``/metrics`` (Prometheus text
format) and ``/healthz`` (200 while the receive loop goes round, 503 once it stalls)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from buildq_worker.worker import Worker

log = structlog.get_logger()


def make_app(worker: Worker) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        stalled = worker.receive_stalled_for()
        body: dict[str, str | int | float] = {
            "status": "ok" if stalled is None else "stalled",
            "active": worker.active,
            "slots": worker.capacity,
        }
        if stalled is not None:
            body["receive_loop_stalled_seconds"] = round(stalled, 1)
        return web.json_response(body, status=200 if stalled is None else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


@asynccontextmanager
async def serving(worker: Worker, host: str, port: int) -> AsyncIterator[None]:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` while the block runs;
    port 0 serves nothing."""
    if port == 0:
        yield
        return
    runner = web.AppRunner(make_app(worker), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("worker.metrics_serving", url=f"http://{host}:{port}/metrics")
        yield
    finally:
        await runner.cleanup()
