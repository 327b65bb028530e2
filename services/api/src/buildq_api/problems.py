"""Every error answer in one place: RFC 9457 problem+json, with a stable ``type``."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from buildq.errors import ConflictError, NotFoundError, UnavailableError, UnknownWorkflowError
from buildq.store import IdempotencyMismatchError
from buildq_api.auth import UnauthorizedError

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_SECONDS = 2

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Request validation failed",
    500: "Internal server error",
    503: "Service unavailable",
}
_SLUGS = {
    400: "bad-request",
    401: "unauthorized",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "validation-error",
    500: "internal-error",
    503: "unavailable",
}


def problem_body(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    instance: str | None = None,
    request_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": f"urn:buildq:problem:{slug or _SLUGS.get(status, 'error')}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": instance,
        "request_id": request_id or structlog.contextvars.get_contextvars().get("request_id"),
    }
    body.update({key: value for key, value in extra.items() if value is not None})
    return body


def problem(
    request: Request,
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, detail, slug=slug, instance=request.url.path, **extra),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


def validation_errors(errors: list[Any]) -> list[dict[str, Any]]:
    return [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]} for err in errors]


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, APIRoute) and route.path_regex.match(request.url.path):
            methods |= route.methods or set()
    return sorted(methods)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(list(exc.errors()))
        detail = "; ".join(f"{_location(err['loc'])}: {err['msg']}" for err in errors[:5])
        if any(err["type"] == "json_invalid" for err in errors):
            return problem(request, 400, f"Body is not valid JSON: {detail}", slug="invalid-json")
        return problem(request, 422, detail or "invalid request", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 413:
            detail = f"Request body exceeds {request.app.state.settings.max_body_bytes} bytes"
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; list them all.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return problem(request, exc.status_code, detail, headers=headers)

    @app.exception_handler(UnknownWorkflowError)
    async def _unknown_workflow(request: Request, exc: UnknownWorkflowError) -> JSONResponse:
        return problem(
            request,
            422,
            str(exc),
            slug="unknown-workflow",
            errors=[{"loc": ["body", "workflow"], "msg": str(exc), "type": "unknown_workflow"}],
        )

    @app.exception_handler(UnauthorizedError)
    async def _unauthorized(request: Request, exc: UnauthorizedError) -> JSONResponse:
        return problem(request, 401, str(exc), headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(IdempotencyMismatchError)
    async def _idempotency(request: Request, exc: IdempotencyMismatchError) -> JSONResponse:
        return problem(request, 422, str(exc), slug="idempotency-key-reused")

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return problem(request, 404, str(exc))

    @app.exception_handler(ConflictError)
    async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return problem(request, 409, str(exc))

    @app.exception_handler(UnavailableError)
    async def _unavailable(request: Request, exc: UnavailableError) -> JSONResponse:
        structlog.get_logger().warning("aws.unavailable", error=str(exc))
        return problem(
            request,
            503,
            "A backing AWS service is unavailable; retry shortly.",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        structlog.get_logger().exception("request.unhandled_error")
        return problem(request, 500, "An unexpected error occurred; it has been logged.")
