"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from buildq.errors import UnavailableError
from buildq_api.deps import QueueDep, StoreDep
from buildq_api.problems import problem

router = APIRouter(tags=["health"])

READY_TIMEOUT_SECONDS = 2.0


@router.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: DynamoDB and SQS are reachable",
    responses={503: {"description": "A dependency is unreachable"}},
    response_model=None,
)
async def readyz(
    request: Request, store: StoreDep, queue: QueueDep
) -> dict[str, Any] | JSONResponse:
    checks = {"dynamodb": store.ping(), "sqs": queue.ping()}
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            await asyncio.wait_for(check, READY_TIMEOUT_SECONDS)
            results[name] = "ok"
        except (UnavailableError, TimeoutError) as exc:
            results[name] = f"unavailable: {exc or 'timed out'}"
        except Exception as exc:  # a missing table or queue is "not ready" too
            results[name] = f"error: {type(exc).__name__}: {exc}"
    if all(result == "ok" for result in results.values()):
        return {"status": "ok", "checks": results}
    return problem(
        request,
        503,
        "Not ready: " + ", ".join(f"{k} {v}" for k, v in results.items() if v != "ok"),
        headers={"Retry-After": "2"},
        checks=results,
    )
