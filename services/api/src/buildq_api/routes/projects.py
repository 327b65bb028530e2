"""``/v1/projects``: create, read and list projects."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Path, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from ulid import ULID

from buildq.clock import now_iso
from buildq.errors import NotFoundError, UnavailableError
from buildq.messages import BuildReason, build_message
from buildq.transitions import new_project
from buildq_api.deps import QueueDep, RegistryDep, StoreDep, TenantDep
from buildq_api.problems import PROBLEM_JSON
from buildq_api.schemas import Problem, ProjectCreate, ProjectPage, ProjectPublic

ULID_PATTERN = r"^[0-9A-HJKMNP-TV-Z]{26}$"

router = APIRouter(prefix="/v1/projects", tags=["projects"])

_problem: dict[str, Any] = {"model": Problem, "content": {PROBLEM_JSON: {}}}
_errors: dict[int | str, dict[str, Any]] = {
    status: {**_problem, "description": description}
    for status, description in {
        400: "The body is not valid JSON",
        413: "The body is larger than 64 KiB",
        422: "The request failed validation (unknown workflow, bad parameters, ...)",
        503: "DynamoDB or SQS is unavailable; retry after `Retry-After` seconds",
    }.items()
}


def _encode_cursor(project_id: str) -> str:
    return base64.urlsafe_b64encode(f"v1:{project_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        version, _, project_id = raw.partition(":")
        if version != "v1":
            raise ValueError(version)
        ULID.from_str(project_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise RequestValidationError(
            [
                {
                    "loc": ("query", "cursor"),
                    "msg": "cursor is not one this API returned",
                    "type": "value_error",
                }
            ]
        ) from None
    return project_id


@router.post(
    "",
    status_code=202,
    response_model=ProjectPublic,
    summary="Create a project and queue its build",
    description="Records the project and enqueues its build, then answers at once: the "
    "build runs on a worker. Poll `GET /v1/projects/{id}` (the `Location` header) for "
    "its status and stages.",
    responses={202: {"description": "Accepted: the project is QUEUED"}, **_errors},
)
async def create_project(
    body: ProjectCreate,
    response: Response,
    tenant: TenantDep,
    store: StoreDep,
    queue: QueueDep,
    registry: RegistryDep,
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
    log = structlog.get_logger().bind(project_id=project.project_id, tenant_id=tenant)
    await store.create(project)
    try:
        await queue.send(build_message(tenant, project.project_id, BuildReason.CREATE))
    except UnavailableError as exc:
        # The record is the truth and is safely written: the sweeper enqueues
        # projects left QUEUED without a message, so the client still gets 202.
        log.warning("project.enqueue_failed", error=str(exc))
    log.info("project.created", workflow=workflow.name)
    response.headers["Location"] = f"/v1/projects/{project.project_id}"
    return ProjectPublic.of(project)


@router.get(
    "/{project_id}",
    response_model=ProjectPublic,
    summary="Get a project's status and stages",
    responses={404: {**_problem, "description": "No such project"}, **_errors},
)
async def get_project(
    project_id: Annotated[str, Path(pattern=ULID_PATTERN, description="Project id (ULID)")],
    tenant: TenantDep,
    store: StoreDep,
) -> ProjectPublic:
    project = await store.get(tenant, project_id)
    if project is None:
        raise NotFoundError(f"project {project_id} not found")
    return ProjectPublic.of(project)


@router.post(
    "/{project_id}/cancel",
    status_code=202,
    response_model=ProjectPublic,
    summary="Cancel a project",
    description="A QUEUED project becomes CANCELLED at once; a BUILDING one is flagged "
    "(`cancel_requested`) and its worker stops it at the next checkpoint.",
    responses={
        404: {**_problem, "description": "No such project"},
        409: {**_problem, "description": "The project has already ended"},
        **_errors,
    },
)
async def cancel_project(
    project_id: Annotated[str, Path(pattern=ULID_PATTERN, description="Project id (ULID)")],
    tenant: TenantDep,
    store: StoreDep,
) -> ProjectPublic:
    project = await store.request_cancel(tenant, project_id)
    structlog.get_logger().info(
        "project.cancel_requested",
        project_id=project_id,
        tenant_id=tenant,
        status=project.status.value,
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
    limit: Annotated[int, Query(ge=1, le=100, description="Page size")] = 20,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page")
    ] = None,
) -> ProjectPage:
    after = _decode_cursor(cursor) if cursor else None
    projects, last = await store.list_projects(tenant, limit=limit, after=after)
    return ProjectPage(
        items=[ProjectPublic.of(project) for project in projects],
        next_cursor=_encode_cursor(last) if last else None,
    )
