"""The projects table: every DynamoDB call buildq makes, with its conditions.

Invariant 3 lives here: a claim is one conditional UpdateItem that takes the
lease and increments ``attempt`` (the fencing token); every later write of that
run is conditional on the same owner and attempt, so a worker that lost its
lease cannot overwrite anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from buildq.aws import translate_errors
from buildq.clock import epoch_ms, iso, utcnow
from buildq.errors import ConflictError, LeaseLostError
from buildq.items import (
    project_from_item,
    project_key,
    project_sk,
    project_to_item,
    stage_to_plain,
    tenant_pk,
    to_attr,
)
from buildq.models import ErrorInfo, Project, ProjectStatus, StageSnapshot
from buildq.transitions import ClaimRefusal, check_transition, claim_refusal

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


@dataclass(frozen=True)
class RunToken:
    """Who runs a project, and which attempt: the fencing token of every run write."""

    tenant_id: str
    project_id: str
    worker_id: str
    attempt: int


class ClaimRefusedError(ConflictError):
    def __init__(self, refusal: ClaimRefusal, current: Project | None) -> None:
        super().__init__(f"claim refused: {refusal}")
        self.refusal = refusal
        self.current = current


class ProjectStore(Protocol):
    async def create(self, project: Project) -> None: ...
    async def get(self, tenant_id: str, project_id: str) -> Project | None: ...
    async def list_projects(
        self, tenant_id: str, *, limit: int, after: str | None = None
    ) -> tuple[list[Project], str | None]: ...
    async def claim(
        self, tenant_id: str, project_id: str, *, worker_id: str, lease_seconds: float
    ) -> Project: ...
    async def save_stages(self, token: RunToken, *stages: StageSnapshot) -> None: ...
    async def extend_lease(self, token: RunToken, lease_seconds: float) -> None: ...
    async def finish(
        self,
        token: RunToken,
        status: ProjectStatus,
        *,
        error: ErrorInfo | None = None,
        stages: Sequence[StageSnapshot] = (),
    ) -> None: ...
    async def requeue(
        self, token: RunToken, *, error: ErrorInfo | None, stages: Sequence[StageSnapshot] = ()
    ) -> None: ...
    async def ping(self) -> None: ...


@dataclass
class _Update:
    """Builds one UpdateExpression with generated placeholder names."""

    sets: list[str] = field(default_factory=list)
    removes: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    def name(self, attribute: str) -> str:
        placeholder = f"#n{len(self.names)}"
        self.names[placeholder] = attribute
        return placeholder

    def value(self, value: Any) -> str:
        placeholder = f":v{len(self.values)}"
        self.values[placeholder] = to_attr(value)
        return placeholder

    def set(self, attribute: str, value: Any) -> None:
        self.sets.append(f"{self.name(attribute)} = {self.value(value)}")

    def set_stage(self, stage: StageSnapshot) -> None:
        path = f"{self.name('stages')}.{self.name(stage.name)}"
        self.sets.append(f"{path} = {self.value(stage_to_plain(stage))}")

    def remove(self, *attributes: str) -> None:
        self.removes.extend(self.name(attribute) for attribute in attributes)

    def expression(self) -> str:
        parts = []
        if self.sets:
            parts.append("SET " + ", ".join(self.sets))
        if self.removes:
            parts.append("REMOVE " + ", ".join(self.removes))
        return " ".join(parts)


class DynamoProjectStore:
    """``ProjectStore`` on one DynamoDB table (async, aiobotocore)."""

    def __init__(
        self,
        client: DynamoDBClient,
        table_name: str,
        *,
        sweep_queued_after: float = 300.0,
        sweep_building_after: float = 60.0,
    ) -> None:
        self._client = client
        self._table = table_name
        # When an active project becomes "suspicious" for the sweeper: QUEUED for
        # this long, or BUILDING this long past its lease expiry.
        self._sweep_queued_ms = int(sweep_queued_after * 1000)
        self._sweep_building_ms = int(sweep_building_after * 1000)

    async def create(self, project: Project) -> None:
        item = project_to_item(project, sweep_at=epoch_ms() + self._sweep_queued_ms)
        with translate_errors("PutItem"):
            await self._client.put_item(
                TableName=self._table,
                Item=item,
                ConditionExpression="attribute_not_exists(pk)",
            )

    async def get(self, tenant_id: str, project_id: str) -> Project | None:
        with translate_errors("GetItem"):
            response = await self._client.get_item(
                TableName=self._table, Key=project_key(tenant_id, project_id), ConsistentRead=True
            )
        item = response.get("Item")
        return project_from_item(item) if item else None

    async def list_projects(
        self, tenant_id: str, *, limit: int, after: str | None = None
    ) -> tuple[list[Project], str | None]:
        """A tenant's projects, newest first; ``after`` is the last id of the previous page."""
        kwargs: dict[str, Any] = {}
        if after is not None:
            kwargs["ExclusiveStartKey"] = project_key(tenant_id, after)
        with translate_errors("Query"):
            response = await self._client.query(
                TableName=self._table,
                KeyConditionExpression="pk = :pk AND begins_with(sk, :prefix)",
                ExpressionAttributeValues={
                    ":pk": {"S": tenant_pk(tenant_id)},
                    ":prefix": {"S": project_sk("")},
                },
                ScanIndexForward=False,
                Limit=limit,
                **kwargs,
            )
        projects = [project_from_item(item) for item in response.get("Items", [])]
        last = response.get("LastEvaluatedKey")
        next_after = projects[-1].project_id if last and projects else None
        return projects, next_after

    async def claim(
        self, tenant_id: str, project_id: str, *, worker_id: str, lease_seconds: float
    ) -> Project:
        """Take the lease and the next attempt, or raise ``ClaimRefusedError`` saying why."""
        now = utcnow()
        now_ms = epoch_ms(now)
        expires = now_ms + int(lease_seconds * 1000)
        update = _Update()
        update.set("status", ProjectStatus.BUILDING.value)
        attempt = update.name("attempt")
        update.sets.append(
            f"{attempt} = if_not_exists({attempt}, {update.value(0)}) + {update.value(1)}"
        )
        update.set("lease_owner", worker_id)
        update.set("lease_expires_at", expires)
        update.set("worker_id", worker_id)
        update.set("updated_at", iso(now))
        started = update.name("started_at")
        update.sets.append(f"{started} = if_not_exists({started}, {update.value(iso(now))})")
        update.set("sweep_at", expires + self._sweep_building_ms)
        status, lease = update.name("status"), update.name("lease_expires_at")
        condition = (
            f"attribute_exists(pk) AND ({status} = {update.value(ProjectStatus.QUEUED.value)}"
            f" OR ({status} = {update.value(ProjectStatus.BUILDING.value)}"
            f" AND {lease} < {update.value(now_ms)}))"
        )
        try:
            with translate_errors("UpdateItem(claim)"):
                response = await self._client.update_item(
                    TableName=self._table,
                    Key=project_key(tenant_id, project_id),
                    UpdateExpression=update.expression(),
                    ConditionExpression=condition,
                    ExpressionAttributeNames=update.names,
                    ExpressionAttributeValues=update.values,
                    ReturnValues="ALL_NEW",
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
        except ConflictError as exc:
            current = project_from_item(exc.item) if exc.item else None
            refusal = claim_refusal(current, now_ms) or ClaimRefusal.LEASED
            raise ClaimRefusedError(refusal, current) from None
        return project_from_item(response["Attributes"])

    async def save_stages(self, token: RunToken, *stages: StageSnapshot) -> None:
        update = _Update()
        for stage in stages:
            update.set_stage(stage)
        update.set("updated_at", iso(utcnow()))
        await self._fenced(token, update, "save_stages")

    async def extend_lease(self, token: RunToken, lease_seconds: float) -> None:
        expires = epoch_ms() + int(lease_seconds * 1000)
        update = _Update()
        update.set("lease_expires_at", expires)
        update.set("sweep_at", expires + self._sweep_building_ms)
        await self._fenced(token, update, "extend_lease")

    async def finish(
        self,
        token: RunToken,
        status: ProjectStatus,
        *,
        error: ErrorInfo | None = None,
        stages: Sequence[StageSnapshot] = (),
    ) -> None:
        """End the run in a terminal status; the project leaves the sweeper index."""
        check_transition(ProjectStatus.BUILDING, status)
        if not status.terminal:
            raise ValueError(f"finish() takes a terminal status, not {status}")
        now = iso(utcnow())
        update = _Update()
        for stage in stages:
            update.set_stage(stage)
        update.set("status", status.value)
        update.set("finished_at", now)
        update.set("updated_at", now)
        if error is not None:
            update.set("last_error", error.model_dump())
        update.remove("lease_owner", "lease_expires_at", "sweep_shard", "sweep_at")
        await self._fenced(token, update, f"finish({status})")

    async def requeue(
        self, token: RunToken, *, error: ErrorInfo | None, stages: Sequence[StageSnapshot] = ()
    ) -> None:
        """Back to QUEUED (a retry after a transient failure, or a release)."""
        update = _Update()
        for stage in stages:
            update.set_stage(stage)
        update.set("status", ProjectStatus.QUEUED.value)
        update.set("updated_at", iso(utcnow()))
        update.set("sweep_at", epoch_ms() + self._sweep_queued_ms)
        if error is not None:
            update.set("last_error", error.model_dump())
        update.remove("lease_owner", "lease_expires_at")
        await self._fenced(token, update, "requeue")

    async def ping(self) -> None:
        with translate_errors("DescribeTable"):
            await self._client.describe_table(TableName=self._table)

    async def _fenced(self, token: RunToken, update: _Update, what: str) -> None:
        owner, attempt = update.name("lease_owner"), update.name("attempt")
        condition = (
            f"{owner} = {update.value(token.worker_id)}"
            f" AND {attempt} = {update.value(token.attempt)}"
        )
        try:
            with translate_errors(f"UpdateItem({what})"):
                await self._client.update_item(
                    TableName=self._table,
                    Key=project_key(token.tenant_id, token.project_id),
                    UpdateExpression=update.expression(),
                    ConditionExpression=condition,
                    ExpressionAttributeNames=update.names,
                    ExpressionAttributeValues=update.values,
                )
        except ConflictError:
            raise LeaseLostError(
                f"{what}: project {token.project_id} is no longer held by "
                f"{token.worker_id} at attempt {token.attempt}"
            ) from None
