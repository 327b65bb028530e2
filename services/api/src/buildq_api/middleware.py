"""Pure ASGI middleware (no per-request task or body copy): request ids, one
canonical log line per request, and the request metrics."""

from __future__ import annotations

import json
import re
import time
import uuid

import structlog
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from buildq_api.metrics import HTTP_REQUEST_SECONDS, HTTP_REQUESTS
from buildq_api.problems import PROBLEM_JSON, problem_body

REQUEST_ID_HEADER = b"x-request-id"
_SAFE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")

UNMATCHED_ROUTE = "<unmatched>"  # the route label of a request no route matched
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(scope: Scope) -> str:
    """The template of the route that served ``scope`` (``/v1/projects/{project_id}``),
    never the raw path, so the metric labels stay few.

    FastAPI leaves the matched route in the scope; its plain Starlette routes (the docs)
    do not, so those are matched here. Anything else (a 404, or a body refused for its
    size before routing) is ``UNMATCHED_ROUTE``.
    """
    template = getattr(scope.get("route"), "path_format", None)
    if isinstance(template, str):
        return template
    for route in getattr(getattr(scope.get("app"), "router", None), "routes", ()):
        template = getattr(route, "path_format", None)
        if isinstance(template, str) and route.matches(scope)[0] is not Match.NONE:
            return template
    return UNMATCHED_ROUTE


class RequestContextMiddleware:
    """Binds ``request_id`` (taken from X-Request-ID if sane) to every log line,
    echoes it on the response, logs ``request.finished`` with the status and
    duration, and counts and times the request by route template, method and status.

    Bodies over ``max_body_bytes`` get a problem+json 413: at once when the
    Content-Length says so, else as soon as the streamed bytes pass the limit.
    (FastAPI's own ``max_body_size`` answers in plain text, so it is not used.)
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(REQUEST_ID_HEADER, b"")
        request_id = given.decode() if _SAFE_REQUEST_ID.match(given) else uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER, request_id.encode()),
                ]
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # An HTTPException passes through FastAPI's body parsing to the
                    # problem handlers.
                    raise HTTPException(413)
            return message

        try:
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                await self._too_large(scope, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            method = scope["method"]
            labels = {
                "route": route_template(scope),
                "method": method if method in _METHODS else "OTHER",
                "status": str(status),
            }
            HTTP_REQUESTS.labels(**labels).inc()
            HTTP_REQUEST_SECONDS.labels(**labels).observe(duration)
            structlog.get_logger().info(
                "request.finished",
                method=method,
                path=scope["path"],
                route=labels["route"],
                status=status,
                duration_ms=round(duration * 1000, 2),
            )

    async def _too_large(self, scope: Scope, send: Send) -> None:
        detail = f"Request body exceeds {self.max_body_bytes} bytes"
        body = json.dumps(problem_body(413, detail, instance=scope["path"])).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", PROBLEM_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
