"""Projects as clients see them: create (idempotently), read, list, cancel, and
on-call's replay of a FAILED one."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

from buildq.clock import epoch_ms, iso, utcnow
from buildq.errors import ConflictError, NotFoundError, UnavailableError
from buildq.items import (
    TTL_ATTRIBUTE,
    idempotency_sk,
    project_from_item,
    project_key,
    project_sk,
    project_to_item,
    sweep_shard,
    tenant_pk,
)
from buildq.limits import DYNAMODB_ITEM_MAX_BYTES, check_item, check_new_project
from buildq.models import Project, ProjectStatus
from buildq.store.base import DynamoTable, Update

IDEMPOTENCY_TTL_SECONDS = 24 * 3600
LIST_MAX_QUERIES = 5


@dataclass(frozen=True)
class Idempotency:
    """A client's Idempotency-Key and the hash of the request it came with."""

    key: str
    request_hash: str


@dataclass(frozen=True)
class Created:
    project: Project
    replayed: bool  # True: the key was seen before; this is the first request's project


class IdempotencyMismatchError(ConflictError):
    """The Idempotency-Key was first used with a different request."""


class Projects(Protocol):
    """A tenant's projects: what the API and on-call read and change."""

    async def create(
        self, project: Project, *, idempotency: Idempotency | None = None
    ) -> Created: ...
    async def get(self, tenant_id: str, project_id: str) -> Project | None: ...
    async def list_projects(
        self,
        tenant_id: str,
        *,
        limit: int,
        after: str | None = None,
        status: ProjectStatus | None = None,
    ) -> tuple[list[Project], str | None]: ...
    async def request_cancel(self, tenant_id: str, project_id: str) -> Project: ...
    async def replay(self, tenant_id: str, project_id: str) -> Project: ...
    async def scan_projects(
        self, *, limit: int, status: ProjectStatus | None = None, project_id: str | None = None
    ) -> list[Project]: ...


class DynamoProjects(DynamoTable):
    """``Projects`` on the projects table."""

    async def create(self, project: Project, *, idempotency: Idempotency | None = None) -> Created:
        """Write a new project (QUEUED). With ``idempotency``, the project and its key
        are written in one transaction, and a repeat of the same key returns the first
        project (``replayed``) or raises ``IdempotencyMismatchError`` for another body.

        Raises ``WriteTooLargeError``, before anything is sent, for a project item over
        the create budget (``buildq.limits.check_new_project``)."""
        item = project_to_item(project, sweep_at=epoch_ms())
        check_new_project(item, [stage.name for stage in project.stages], what="create")
        if idempotency is None:
            # A conflict can only be a retry of this very write (ULIDs do not collide),
            # whose first try landed.
            with contextlib.suppress(ConflictError):
                await self._retry.call(
                    "PutItem",
                    self._client.put_item,
                    TableName=self._table,
                    Item=item,
                    ConditionExpression="attribute_not_exists(pk)",
                )
            return Created(project, replayed=False)
        now_s = epoch_ms() // 1000
        key_item = {
            "pk": {"S": tenant_pk(project.tenant_id)},
            "sk": {"S": idempotency_sk(idempotency.key)},
            "project_id": {"S": project.project_id},
            "request_hash": {"S": idempotency.request_hash},
            TTL_ATTRIBUTE: {"N": str(now_s + IDEMPOTENCY_TTL_SECONDS)},
        }
        check_item(key_item, limit=DYNAMODB_ITEM_MAX_BYTES, what="create(idempotency key)")
        try:
            await self._retry.call(
                "TransactWriteItems",
                self._client.transact_write_items,
                TransactItems=[
                    {
                        "Put": {
                            "TableName": self._table,
                            "Item": item,
                            "ConditionExpression": "attribute_not_exists(pk)",
                        }
                    },
                    {
                        "Put": {
                            "TableName": self._table,
                            "Item": key_item,
                            # moto never expires TTL items, and AWS deletes them late:
                            # an expired key counts as absent.
                            "ConditionExpression": "attribute_not_exists(pk) OR #exp < :now",
                            "ExpressionAttributeNames": {"#exp": TTL_ATTRIBUTE},
                            "ExpressionAttributeValues": {":now": {"N": str(now_s)}},
                        }
                    },
                ],
            )
        except ConflictError:
            return await self._replay(project, idempotency)
        return Created(project, replayed=False)

    async def _replay(self, attempted: Project, idempotency: Idempotency) -> Created:
        """The key was taken: by the same request (replay) or another one (mismatch)."""
        response = await self._retry.call(
            "GetItem",
            self._client.get_item,
            TableName=self._table,
            Key={
                "pk": {"S": tenant_pk(attempted.tenant_id)},
                "sk": {"S": idempotency_sk(idempotency.key)},
            },
            ConsistentRead=True,
        )
        stored = response.get("Item")
        if stored is None:
            # A condition failed on a key that is not there (any more): nothing to
            # conflict with, so a retry passes. Unavailable (503, Retry-After), not 409.
            raise UnavailableError("the idempotency key is being written; retry")
        if stored["request_hash"]["S"] != idempotency.request_hash:
            raise IdempotencyMismatchError(
                "this Idempotency-Key was used with a different request body"
            )
        first = await self.get(attempted.tenant_id, stored["project_id"]["S"])
        if first is None:  # pragma: no cover: both were written in one transaction
            raise ConflictError("the idempotency key points at no project")
        return Created(first, replayed=True)

    async def get(self, tenant_id: str, project_id: str) -> Project | None:
        response = await self._retry.call(
            "GetItem",
            self._client.get_item,
            TableName=self._table,
            Key=project_key(tenant_id, project_id),
            ConsistentRead=True,
        )
        item = response.get("Item")
        return project_from_item(item) if item else None

    async def list_projects(
        self,
        tenant_id: str,
        *,
        limit: int,
        after: str | None = None,
        status: ProjectStatus | None = None,
    ) -> tuple[list[Project], str | None]:
        """A tenant's projects, newest first, optionally of one status; ``after`` is the
        last id of the previous page. Returns the page and the id to continue after."""
        values: dict[str, Any] = {
            ":pk": {"S": tenant_pk(tenant_id)},
            ":prefix": {"S": project_sk("")},
        }
        kwargs: dict[str, Any] = {}
        if status is not None:
            kwargs["FilterExpression"] = "#status = :status"
            kwargs["ExpressionAttributeNames"] = {"#status": "status"}
            values[":status"] = {"S": status.value}
        projects: list[Project] = []
        last: dict[str, Any] | None = project_key(tenant_id, after) if after else None
        # A filtered page can come back short; read on, a bounded number of times.
        for _ in range(LIST_MAX_QUERIES):
            if last is not None:
                kwargs["ExclusiveStartKey"] = last
            response = await self._retry.call(
                "Query",
                self._client.query,
                TableName=self._table,
                KeyConditionExpression="pk = :pk AND begins_with(sk, :prefix)",
                ExpressionAttributeValues=values,
                ScanIndexForward=False,
                Limit=limit - len(projects) if status is None else limit,
                **kwargs,
            )
            for item in response.get("Items", []):
                if len(projects) < limit:
                    projects.append(project_from_item(item))
            last = response.get("LastEvaluatedKey")
            if last is None or len(projects) >= limit:
                break
        if len(projects) >= limit:
            return projects, projects[-1].project_id
        if last is not None:  # stopped reading early: continue where the reads stopped
            return projects, last["sk"]["S"].removeprefix(project_sk(""))
        return projects, None

    async def scan_projects(
        self, *, limit: int, status: ProjectStatus | None = None, project_id: str | None = None
    ) -> list[Project]:
        """Projects of every tenant, for operators who do not know the tenant (a table
        scan: fine for an on-call look-up, not for a hot path)."""
        conditions = ["begins_with(sk, :prefix)"]
        values: dict[str, Any] = {":prefix": {"S": project_sk("")}}
        kwargs: dict[str, Any] = {}
        if status is not None:
            conditions.append("#status = :status")
            kwargs["ExpressionAttributeNames"] = {"#status": "status"}
            values[":status"] = {"S": status.value}
        if project_id is not None:
            conditions.append("project_id = :id")
            values[":id"] = {"S": project_id}
        kwargs["FilterExpression"] = " AND ".join(conditions)
        kwargs["ExpressionAttributeValues"] = values
        projects: list[Project] = []
        while len(projects) < limit:
            response = await self._retry.call(
                "Scan", self._client.scan, TableName=self._table, **kwargs
            )
            projects += [project_from_item(item) for item in response.get("Items", [])]
            if "LastEvaluatedKey" not in response:
                break
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        projects.sort(key=lambda project: project.project_id, reverse=True)
        return projects[:limit]

    async def replay(self, tenant_id: str, project_id: str) -> Project:
        """FAILED → QUEUED with a fresh attempt budget (on-call's DLQ replay).

        Conditional: only one of two replays running at once wins; the other gets a
        ``ConflictError`` (with the project as it is) and must not send a message.
        """
        current = await self.get(tenant_id, project_id)
        if current is None:
            raise NotFoundError(f"project {project_id} not found")
        update = (
            Update()
            .set("status", ProjectStatus.QUEUED.value)
            .set("attempt_base", current.attempt - current.releases)
            .set("updated_at", iso(utcnow()))
            .set("sweep_shard", sweep_shard(project_id))
            .set("sweep_at", epoch_ms())
            .set("cancel_requested", False)
            .remove("finished_at", "sweep_backoff")
        )
        # Same attempt as read: a concurrent replay (or anything else) makes this lose.
        condition = (
            f"{update.name('status')} = {update.value(ProjectStatus.FAILED.value)}"
            f" AND {update.name('attempt')} = {update.value(current.attempt)}"
        )
        key = project_key(tenant_id, project_id)
        return project_from_item(await self._update(key, update, condition, what="replay"))

    async def request_cancel(self, tenant_id: str, project_id: str) -> Project:
        """Cancel a project: a QUEUED one becomes CANCELLED at once, a BUILDING one is
        flagged and its worker stops at the next checkpoint. Returns the project after.

        Raises ``NotFoundError`` if it does not exist, ``ConflictError`` if it has ended.
        """
        for _ in range(3):  # the status can change between the two conditional writes
            now = iso(utcnow())
            cancelled = (
                Update()
                .set("status", ProjectStatus.CANCELLED.value)
                .set("cancel_requested", True)
                .set("finished_at", now)
                .set("updated_at", now)
                .remove("sweep_shard", "sweep_at")
            )
            try:
                return await self._update_from(
                    tenant_id, project_id, cancelled, expect=ProjectStatus.QUEUED
                )
            except ConflictError as exc:
                current = project_from_item(exc.item) if exc.item else None
            if current is None:
                raise NotFoundError(f"project {project_id} not found")
            if current.status is not ProjectStatus.BUILDING:
                raise ConflictError(f"project {project_id} is already {current.status}")
            flagged = Update().set("cancel_requested", True).set("updated_at", now)
            try:
                return await self._update_from(
                    tenant_id, project_id, flagged, expect=ProjectStatus.BUILDING
                )
            except ConflictError:
                continue
        raise ConflictError(f"project {project_id} kept changing; try again")

    async def _update_from(
        self, tenant_id: str, project_id: str, update: Update, *, expect: ProjectStatus
    ) -> Project:
        """One UpdateItem conditional on the current status; returns the new project."""
        condition = f"{update.name('status')} = {update.value(expect.value)}"
        key = project_key(tenant_id, project_id)
        return project_from_item(await self._update(key, update, condition, what=f"from {expect}"))
