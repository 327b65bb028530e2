"""Dependencies, as ``Annotated`` aliases so route signatures read like sentences."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from buildq.queue import BuildQueue
from buildq.settings import ApiSettings
from buildq.store import ProjectStore
from buildq.workflows.registry import WorkflowRegistry
from buildq_api.auth import ApiKeyAuthenticator
from buildq_api.watch import ProjectWatch


async def get_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


async def get_store(request: Request) -> ProjectStore:
    store: ProjectStore = request.app.state.store
    return store


async def get_queue(request: Request) -> BuildQueue:
    queue: BuildQueue = request.app.state.queue
    return queue


async def get_registry(request: Request) -> WorkflowRegistry:
    registry: WorkflowRegistry = request.app.state.registry
    return registry


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key: `Authorization: Bearer <key>`",
)


async def get_tenant(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's tenant, from its API key; every read and write is keyed by it."""
    authenticator: ApiKeyAuthenticator = request.app.state.authenticator
    tenant = await authenticator.tenant_for(request.headers.get("authorization"))
    structlog.contextvars.bind_contextvars(tenant_id=tenant)
    return tenant


async def get_watch(request: Request) -> ProjectWatch:
    watch: ProjectWatch = request.app.state.watch
    return watch


async def reject_unknown_query_parameters(request: Request) -> None:
    """A misspelt query parameter (``?stauts=``) is an error, not silently ignored."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = {param.alias for param in route.dependant.query_params}
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise RequestValidationError(
            [
                {
                    "loc": ("query", name),
                    "msg": "unknown query parameter",
                    "type": "extra_forbidden",
                }
                for name in unknown
            ]
        )


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
StoreDep = Annotated[ProjectStore, Depends(get_store)]
QueueDep = Annotated[BuildQueue, Depends(get_queue)]
RegistryDep = Annotated[WorkflowRegistry, Depends(get_registry)]
TenantDep = Annotated[str, Depends(get_tenant)]
WatchDep = Annotated[ProjectWatch, Depends(get_watch)]
