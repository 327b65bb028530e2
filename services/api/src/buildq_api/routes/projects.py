"""``/v1/projects``: create, read, long-poll, list and cancel projects."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from ulid import ULID

from buildq.clock import now_iso
from buildq.errors import NotFoundError, UnavailableError
from buildq.messages import BuildReason, build_message
from buildq.models import ProjectStatus
from buildq.store import Idempotency
from buildq.transitions import new_project
from buildq_api.cursors import BadCursorError, decode_cursor, encode_cursor
from buildq_api.deps import (
    QueueDep,
    RegistryDep,
    SettingsDep,
    StoreDep,
    TenantDep,
    WatchDep,
)
from buildq_api.metrics import PROJECTS_CREATED
from buildq_api.schemas import Problem, ProjectCreate, ProjectPage, ProjectPublic
from buildq_api.watch import etag

ULID_PATTERN = r"^[0-9A-HJKMNP-TV-Z]{26}$"
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"  # visible ASCII
MAX_WAIT_SECONDS = 20

router = APIRouter(prefix="/v1/projects", tags=["projects"])

ProjectId = Annotated[str, Path(pattern=ULID_PATTERN, description="Project id (a ULID)")]

_problem: dict[str, Any] = {"model": Problem}  # served as problem+json (see app.openapi)
_errors: dict[int | str, dict[str, Any]] = {
    status: {**_problem, "description": description}
    for status, description in {
        401: "No API key, or an unknown one",
        422: "The request failed validation",
        503: "DynamoDB or SQS is unavailable; retry after `Retry-After` seconds",
    }.items()
}
_not_found: dict[int | str, dict[str, Any]] = {
    404: {**_problem, "description": "No such project (for this API key's tenant)"}
}


def _invalid(where: tuple[str, ...], message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": where, "msg": message, "type": "value_error"}])


def _request_hash(body: ProjectCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@router.post(
    "",
    status_code=202,
    response_model=ProjectPublic,
    summary="Create a project and queue its build",
    description="Records the project and enqueues its build, then answers at once: the "
    "build runs on a worker. Follow it at `GET /v1/projects/{id}` (the `Location` header), "
    "best with `?wait=20`. Send an `Idempotency-Key` to make retries safe: the same key and "
    "body within 24 h return the first project (`Idempotent-Replayed: true`).",
    responses={
        202: {
            "description": "Accepted: the project is QUEUED",
            "headers": {
                "Location": {"description": "The project's URL", "schema": {"type": "string"}},
                "Idempotent-Replayed": {
                    "description": "`true` when this is the first request's project",
                    "schema": {"type": "string"},
                },
            },
        },
        400: {**_problem, "description": "The body is not valid JSON"},
        413: {**_problem, "description": "The body is larger than 64 KiB"},
        **_errors,
    },
)
async def create_project(
    body: ProjectCreate,
    response: Response,
    tenant: TenantDep,
    store: StoreDep,
    queue: QueueDep,
    registry: RegistryDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            pattern=IDEMPOTENCY_KEY_PATTERN,
            description="Up to 255 visible ASCII characters, unique per intended project",
        ),
    ] = None,
) -> ProjectPublic:
    workflow = registry.get(body.workflow)
    try:
        parameters = workflow.validate_parameters(body.parameters)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", "parameters", *err["loc"])} for err in exc.errors()]
        ) from None
    project = new_project(
        tenant_id=tenant,
        project_id=str(ULID()),
        name=body.name,
        workflow=workflow.name,
        stage_names=workflow.stage_names,
        parameters=parameters,
        now=now_iso(),
    )
    idempotency = (
        Idempotency(key=idempotency_key, request_hash=_request_hash(body))
        if idempotency_key
        else None
    )
    created = await store.create(project, idempotency=idempotency)
    project = created.project
    log = structlog.get_logger().bind(project_id=project.project_id)
    response.headers["Location"] = f"/v1/projects/{project.project_id}"
    if created.replayed:
        response.headers["Idempotent-Replayed"] = "true"
        log.info("project.create_replayed")
        if project.status is not ProjectStatus.QUEUED or project.attempt > 0:
            return ProjectPublic.of(project)
        # Still waiting: the first request may have died before its send. A
        # duplicate message is harmless (the claim decides), a missing one is not.
    try:
        first = project.stages[0].name if project.stages else None
        await queue.send(
            build_message(
                tenant,
                project.project_id,
                BuildReason.CREATE,
                next_stage=first,
                attempt=project.attempt,
            )
        )
    except UnavailableError as exc:
        # The record is the truth and is safely written: the sweeper enqueues
        # projects left QUEUED without a message, so the client still gets 202.
        log.warning("project.enqueue_failed", error=str(exc))
    if not created.replayed:
        PROJECTS_CREATED.labels(workflow=workflow.name).inc()
        log.info("project.created", workflow=workflow.name)
    return ProjectPublic.of(project)


@router.get(
    "/{project_id}",
    response_model=ProjectPublic,
    summary="Get a project's status and stages (optionally long-polling)",
    description="With `wait=N` the answer comes as soon as the project changes (status or "
    "a stage), or after N seconds with the project as it is. Send the previous answer's "
    "`ETag` as `If-None-Match` so that a change between two polls is never missed.",
    responses={
        200: {"headers": {"ETag": {"description": "The project's version"}}},
        **_not_found,
        **_errors,
    },
)
async def get_project(
    project_id: ProjectId,
    response: Response,
    tenant: TenantDep,
    store: StoreDep,
    watch: WatchDep,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_SECONDS, description="Seconds to wait for a change")
    ] = 0,
    if_none_match: Annotated[
        str | None,
        Header(max_length=100, description="An `ETag` seen before: wait for another version"),
    ] = None,
) -> ProjectPublic:
    project = await store.get(tenant, project_id)
    if project is None:
        raise NotFoundError(f"project {project_id} not found")
    if wait > 0:
        since = if_none_match or etag(project)
        if etag(project) == since and not project.status.terminal:
            project = await watch.wait_for_change(project, since, wait)
    response.headers["ETag"] = etag(project)
    return ProjectPublic.of(project)


@router.post(
    "/{project_id}/cancel",
    status_code=202,
    response_model=ProjectPublic,
    summary="Cancel a project",
    description="A QUEUED project becomes CANCELLED at once; a BUILDING one is flagged "
    "(`cancel_requested`) and its worker stops it at the next checkpoint.",
    responses={
        **_not_found,
        409: {**_problem, "description": "The project has already ended"},
        **_errors,
    },
)
async def cancel_project(
    project_id: ProjectId, tenant: TenantDep, store: StoreDep
) -> ProjectPublic:
    project = await store.request_cancel(tenant, project_id)
    structlog.get_logger().info(
        "project.cancel_requested", project_id=project_id, status=project.status.value
    )
    return ProjectPublic.of(project)


@router.get(
    "",
    response_model=ProjectPage,
    summary="List projects, newest first",
    responses=_errors,
)
async def list_projects(
    tenant: TenantDep,
    store: StoreDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size")] = 20,
    status: Annotated[ProjectStatus | None, Query(description="Only this status")] = None,
    cursor: Annotated[
        str | None, Query(max_length=500, description="`next_cursor` of the previous page")
    ] = None,
) -> ProjectPage:
    secret = settings.cursor_secret.get_secret_value().encode()
    status_value = status.value if status else None
    after = None
    if cursor:
        try:
            after = decode_cursor(secret, cursor, status=status_value)
        except BadCursorError as exc:
            raise _invalid(("query", "cursor"), str(exc)) from None
    projects, last = await store.list_projects(tenant, limit=limit, after=after, status=status)
    return ProjectPage(
        items=[ProjectPublic.of(project) for project in projects],
        next_cursor=encode_cursor(secret, after=last, status=status_value) if last else None,
    )
