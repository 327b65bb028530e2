"""The FastAPI application: built by ``create_app(settings)``, no import-time globals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from buildq.aws import aws_clients
from buildq.queue import SqsBuildQueue
from buildq.settings import ApiSettings
from buildq.store import DynamoProjectStore
from buildq.workflows.registry import load_registry
from buildq_api.auth import ApiKeyAuthenticator
from buildq_api.deps import reject_unknown_query_parameters
from buildq_api.middleware import RequestContextMiddleware
from buildq_api.problems import PROBLEM_JSON, install_problem_handlers
from buildq_api.routes import health, metrics, projects
from buildq_api.watch import ProjectWatch

DESCRIPTION = """
buildq runs long build workflows behind an HTTP API. `POST /v1/projects` records
the project and queues its build, answering `202 Accepted` at once; a separately
scaled worker fleet runs it. Poll `GET /v1/projects/{id}` for its status
(`QUEUED → BUILDING → SUCCEEDED | FAILED | CANCELLED`) and per-stage snapshots.
Every error is an RFC 9457 `application/problem+json` body.
"""


def _openapi_with_problems(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents every response body as application/json; errors are
    application/problem+json, so say so."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if status[0] in "45" and "application/json" in content:
                        content[PROBLEM_JSON] = content.pop("application/json")
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()
    registry = load_registry(settings.workflows)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with aws_clients(settings) as clients:
            store = DynamoProjectStore.from_settings(clients.dynamodb, settings)
            app.state.store = store
            app.state.queue = SqsBuildQueue.from_settings(clients.sqs, settings)
            app.state.authenticator = ApiKeyAuthenticator(
                settings.static_api_keys(), store, settings.api_key_cache_seconds
            )
            app.state.watch = ProjectWatch(store, settings.long_poll_interval)
            structlog.get_logger().info(
                "api.started",
                url=f"http://{settings.api_host}:{settings.api_port}",
                table=settings.table_name,
                queue=settings.queue_name,
            )
            try:
                yield
            finally:
                await app.state.watch.close()

    app = FastAPI(
        title="buildq",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(reject_unknown_query_parameters)],
        openapi_tags=[
            {"name": "projects", "description": "Create projects and follow their builds"},
            {"name": "health", "description": "Probes for load balancers and orchestrators"},
        ],
    )
    app.openapi = lambda: _openapi_with_problems(app)  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.registry = registry
    install_problem_handlers(app)
    app.include_router(projects.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes)
    return app
