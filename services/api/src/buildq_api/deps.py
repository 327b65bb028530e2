"""Dependencies, as ``Annotated`` aliases so route signatures read like sentences."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from buildq.queue import BuildQueue
from buildq.settings import ApiSettings
from buildq.store import ProjectStore
from buildq.workflows.registry import WorkflowRegistry


def get_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


def get_store(request: Request) -> ProjectStore:
    store: ProjectStore = request.app.state.store
    return store


def get_queue(request: Request) -> BuildQueue:
    queue: BuildQueue = request.app.state.queue
    return queue


def get_registry(request: Request) -> WorkflowRegistry:
    registry: WorkflowRegistry = request.app.state.registry
    return registry


def get_tenant(settings: Annotated[ApiSettings, Depends(get_settings)]) -> str:
    # One tenant until API keys map callers to tenants.
    return settings.default_tenant


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
StoreDep = Annotated[ProjectStore, Depends(get_store)]
QueueDep = Annotated[BuildQueue, Depends(get_queue)]
RegistryDep = Annotated[WorkflowRegistry, Depends(get_registry)]
TenantDep = Annotated[str, Depends(get_tenant)]
