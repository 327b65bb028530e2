"""The projects table: every DynamoDB call buildq makes, with its conditions.

Invariant 3 lives here: a claim is one conditional UpdateItem that takes the
lease and increments ``attempt`` (the fencing token); every later write of that
run is conditional on the same owner and attempt, so a worker that lost its
lease cannot overwrite anything.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from buildq.aws import RetryPolicy
from buildq.clock import epoch_ms, iso, utcnow
from buildq.errors import ConflictError, LeaseLostError, NotFoundError
from buildq.items import (
    SWEEP_INDEX,
    SWEEP_SHARDS,
    TTL_ATTRIBUTE,
    api_key_key,
    from_attr,
    idempotency_sk,
    project_from_item,
    project_key,
    project_sk,
    project_to_item,
    shard_key,
    stage_to_plain,
    sweep_shard,
    tenant_pk,
    to_attr,
)
from buildq.models import (
    ErrorInfo,
    Project,
    ProjectStatus,
    StageSnapshot,
    StageStatus,
    WorkerInfo,
)
from buildq.settings import Settings
from buildq.transitions import ClaimRefusal, check_transition, claim_refusal, next_stage

IDEMPOTENCY_TTL_SECONDS = 24 * 3600
WORKERS_PK = "WORKERS"  # one partition: a Query lists the fleet
LIST_MAX_QUERIES = 5
CLAIM_TRIES = 3  # on the hints, on the truth, and once more if it moved meanwhile

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


@dataclass(frozen=True)
class RunToken:
    """Who runs a project, and which attempt: the fencing token of every run write."""

    tenant_id: str
    project_id: str
    worker_id: str
    attempt: int


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


@dataclass(frozen=True)
class SweepCandidate:
    """An active project in the sweeper index: QUEUED since, or BUILDING with a lease
    that expires (expired) at, ``sweep_at``."""

    tenant_id: str
    project_id: str
    status: ProjectStatus
    sweep_at: int
    lease_expires_at: int | None


class ClaimRefusedError(ConflictError):
    def __init__(self, refusal: ClaimRefusal, current: Project | None) -> None:
        super().__init__(f"claim refused: {refusal}")
        self.refusal = refusal
        self.current = current


class ProjectStore(Protocol):
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
    async def tenant_for_key(self, key_hash: str) -> str | None: ...
    async def put_api_key(self, key_hash: str, tenant_id: str, *, label: str) -> None: ...
    async def delete_api_key(self, key_hash: str) -> bool: ...
    async def claim(
        self,
        tenant_id: str,
        project_id: str,
        *,
        worker_id: str,
        lease_seconds: float,
        start: str | None = None,
        seen_attempt: int = 0,
    ) -> Project: ...
    async def save_stages(self, token: RunToken, *stages: StageSnapshot) -> bool: ...
    async def extend_lease(self, token: RunToken, lease_seconds: float) -> bool: ...
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
    async def release(self, token: RunToken, *, stages: Sequence[StageSnapshot] = ()) -> None: ...
    async def request_cancel(self, tenant_id: str, project_id: str) -> Project: ...
    async def replay(self, tenant_id: str, project_id: str) -> Project: ...
    async def put_worker(self, worker: WorkerInfo, *, ttl_seconds: float) -> None: ...
    async def delete_worker(self, worker_id: str) -> None: ...
    async def list_workers(self) -> list[WorkerInfo]: ...
    async def scan_projects(
        self, *, limit: int, status: ProjectStatus | None = None, project_id: str | None = None
    ) -> list[Project]: ...
    async def oldest_queued_since(self) -> int | None: ...
    async def acquire_lock(self, name: str, owner: str, seconds: float) -> bool: ...
    async def due_for_sweep(
        self, shard: int, *, before: int, limit: int
    ) -> list[SweepCandidate]: ...
    async def mark_swept(self, candidate: SweepCandidate) -> bool: ...
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

    def set(self, attribute: str, value: Any) -> _Update:
        self.sets.append(f"{self.name(attribute)} = {self.value(value)}")
        return self

    def increment(self, attribute: str) -> _Update:
        name = self.name(attribute)
        self.sets.append(f"{name} = if_not_exists({name}, {self.value(0)}) + {self.value(1)}")
        return self

    def set_stages(self, stages: Sequence[StageSnapshot]) -> _Update:
        for stage in stages:
            path = f"{self.name('stages')}.{self.name(stage.name)}"
            self.sets.append(f"{path} = {self.value(stage_to_plain(stage))}")
        return self

    def start_stage(self, stage: StageSnapshot) -> str:
        """Set ``stage`` (its RUNNING snapshot) as one map, which is what a stage write
        would store; returns the condition to AND in: the stage exists, not yet done."""
        path = f"{self.name('stages')}.{self.name(stage.name)}"
        self.sets.append(f"{path} = {self.value(stage_to_plain(stage))}")
        state = f"{path}.{self.name('status')}"
        allowed = (StageStatus.PENDING, StageStatus.RUNNING, StageStatus.FAILED)
        return f" AND {state} IN ({', '.join(self.value(status.value) for status in allowed)})"

    def remove(self, *attributes: str) -> _Update:
        self.removes.extend(self.name(attribute) for attribute in attributes)
        return self

    def expression(self) -> str:
        parts = []
        if self.sets:
            parts.append("SET " + ", ".join(self.sets))
        if self.removes:
            parts.append("REMOVE " + ", ".join(self.removes))
        return " ".join(parts)


@dataclass(frozen=True)
class _ClaimHint:
    """What a claim assumes of the project: the attempt it is at, and the first stage
    it will run (None: the claim starts no stage)."""

    attempt: int
    stage: str | None

    def corrected(self, project: Project) -> _ClaimHint:
        """The truth, from the item a refused claim read: its attempt, and its first
        pending stage (only if this hint named a stage at all)."""
        first = next_stage(project) if self.stage is not None else None
        return _ClaimHint(project.attempt, first)


class _WrongHintError(Exception):
    """A claim refused only because it assumed the wrong attempt or first stage."""

    def __init__(self, truth: _ClaimHint) -> None:
        super().__init__(truth)
        self.truth = truth


class DynamoProjectStore:
    """``ProjectStore`` on one DynamoDB table (async, aiobotocore)."""

    # Every active project carries ``sweep_at`` in the sweeper index: when it was
    # queued, or when its lease expires. The sweeper alone decides how old is too
    # old, so the API and the workers need not agree on any threshold.

    def __init__(
        self, client: DynamoDBClient, table_name: str, *, retry: RetryPolicy | None = None
    ) -> None:
        self._client = client
        self._table = table_name
        self._retry = retry or RetryPolicy()

    @classmethod
    def from_settings(cls, client: DynamoDBClient, settings: Settings) -> DynamoProjectStore:
        return cls(client, settings.table_name, retry=RetryPolicy.from_settings(settings))

    # -- the API's side ------------------------------------------------------

    async def create(self, project: Project, *, idempotency: Idempotency | None = None) -> Created:
        """Write a new project (QUEUED). With ``idempotency``, the project and its key
        are written in one transaction, and a repeat of the same key returns the first
        project (``replayed``) or raises ``IdempotencyMismatchError`` for another body."""
        item = project_to_item(project, sweep_at=epoch_ms())
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
            raise ConflictError("the idempotency key is being written; retry")
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

    async def oldest_queued_since(self) -> int | None:
        """When the longest-waiting QUEUED project was queued (epoch ms), from the
        sweeper index: the age of the backlog without reading the queue."""
        oldest: int | None = None
        for shard in range(SWEEP_SHARDS):
            response = await self._retry.call(
                "Query(oldest)",
                self._client.query,
                TableName=self._table,
                IndexName=SWEEP_INDEX,
                KeyConditionExpression="sweep_shard = :shard",
                FilterExpression="#status = :queued",
                ExpressionAttributeNames={"#status": "status"},
                ExpressionAttributeValues={
                    ":shard": {"S": shard_key(shard)},
                    ":queued": {"S": ProjectStatus.QUEUED.value},
                },
                ScanIndexForward=True,
                Limit=100,
            )
            for item in response.get("Items", [])[:1]:
                since = int(item["sweep_at"]["N"])
                oldest = since if oldest is None else min(oldest, since)
        return oldest

    async def replay(self, tenant_id: str, project_id: str) -> Project:
        """FAILED → QUEUED with a fresh attempt budget (on-call's DLQ replay).

        Conditional: only one of two replays running at once wins; the other gets a
        ``ConflictError`` (with the project as it is) and must not send a message.
        """
        current = await self.get(tenant_id, project_id)
        if current is None:
            raise NotFoundError(f"project {project_id} not found")
        update = (
            _Update()
            .set("status", ProjectStatus.QUEUED.value)
            .set("attempt_base", current.attempt - current.releases)
            .set("updated_at", iso(utcnow()))
            .set("sweep_shard", sweep_shard(project_id))
            .set("sweep_at", epoch_ms())
            .set("cancel_requested", False)
            .remove("finished_at")
        )
        # Same attempt as read: a concurrent replay (or anything else) makes this lose.
        condition = (
            f"{update.name('status')} = {update.value(ProjectStatus.FAILED.value)}"
            f" AND {update.name('attempt')} = {update.value(current.attempt)}"
        )
        key = project_key(tenant_id, project_id)
        return project_from_item(await self._update(key, update, condition, what="replay"))

    # -- workers --------------------------------------------------------------------

    async def put_worker(self, worker: WorkerInfo, *, ttl_seconds: float) -> None:
        """Announce (or refresh) a live worker; the item expires if it stops refreshing."""
        plain = worker.model_dump()
        plain["running"] = list(worker.running)
        item = {key: to_attr(value) for key, value in plain.items()}
        await self._retry.call(
            "PutItem(worker)",
            self._client.put_item,
            TableName=self._table,
            Item={
                **item,
                "pk": {"S": WORKERS_PK},
                "sk": {"S": f"WORKER#{worker.worker_id}"},
                "seen_ms": {"N": str(epoch_ms())},
                "alive_until_ms": {"N": str(epoch_ms() + int(ttl_seconds * 1000))},
                TTL_ATTRIBUTE: {"N": str(epoch_ms() // 1000 + int(ttl_seconds))},
            },
        )

    async def delete_worker(self, worker_id: str) -> None:
        await self._retry.call(
            "DeleteItem(worker)",
            self._client.delete_item,
            TableName=self._table,
            Key={"pk": {"S": WORKERS_PK}, "sk": {"S": f"WORKER#{worker_id}"}},
        )

    async def list_workers(self) -> list[WorkerInfo]:
        """Workers that refreshed their entry recently (expired entries are skipped even
        where TTL deletion lags, as in moto, which never deletes)."""
        response = await self._retry.call(
            "Query(workers)",
            self._client.query,
            TableName=self._table,
            KeyConditionExpression="pk = :pk",
            FilterExpression="alive_until_ms > :now",
            ExpressionAttributeValues={
                ":pk": {"S": WORKERS_PK},
                ":now": {"N": str(epoch_ms())},
            },
            ConsistentRead=True,
        )
        workers = []
        for item in response.get("Items", []):
            plain = {k: v for k, v in item.items() if k in WorkerInfo.model_fields}
            workers.append(WorkerInfo.model_validate({k: from_attr(v) for k, v in plain.items()}))
        return sorted(workers, key=lambda worker: worker.worker_id)

    # -- API keys -----------------------------------------------------------------

    async def tenant_for_key(self, key_hash: str) -> str | None:
        """The tenant of a hashed API key, or None."""
        response = await self._retry.call(
            "GetItem",
            self._client.get_item,
            TableName=self._table,
            Key=api_key_key(key_hash),
            ConsistentRead=True,
        )
        item = response.get("Item")
        return item["tenant_id"]["S"] if item else None

    async def put_api_key(self, key_hash: str, tenant_id: str, *, label: str) -> None:
        await self._retry.call(
            "PutItem",
            self._client.put_item,
            TableName=self._table,
            Item={
                **api_key_key(key_hash),
                "tenant_id": {"S": tenant_id},
                "label": {"S": label},
                "created_at": {"S": iso(utcnow())},
            },
        )

    async def delete_api_key(self, key_hash: str) -> bool:
        response = await self._retry.call(
            "DeleteItem",
            self._client.delete_item,
            TableName=self._table,
            Key=api_key_key(key_hash),
            ReturnValues="ALL_OLD",
        )
        return bool(response.get("Attributes"))

    async def request_cancel(self, tenant_id: str, project_id: str) -> Project:
        """Cancel a project: a QUEUED one becomes CANCELLED at once, a BUILDING one is
        flagged and its worker stops at the next checkpoint. Returns the project after.

        Raises ``NotFoundError`` if it does not exist, ``ConflictError`` if it has ended.
        """
        for _ in range(3):  # the status can change between the two conditional writes
            now = iso(utcnow())
            cancelled = (
                _Update()
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
            flagged = _Update().set("cancel_requested", True).set("updated_at", now)
            try:
                return await self._update_from(
                    tenant_id, project_id, flagged, expect=ProjectStatus.BUILDING
                )
            except ConflictError:
                continue
        raise ConflictError(f"project {project_id} kept changing; try again")

    # -- a worker's run --------------------------------------------------------

    async def claim(
        self,
        tenant_id: str,
        project_id: str,
        *,
        worker_id: str,
        lease_seconds: float,
        start: str | None = None,
        seen_attempt: int = 0,
    ) -> Project:
        """Take the lease and the next attempt, or raise ``ClaimRefusedError`` saying why.

        ``start`` and ``seen_attempt`` are the message's hints: the stage the run will
        likely begin with, and the attempt the project was at when the message was sent
        (0: a new project). The claim is one write that assumes both. It sets the next
        attempt outright, conditional on the one seen (so two claims never both win),
        and marks ``start`` RUNNING for it, which saves the run its first stage write. A
        stale hint costs one more try, with the truth read from the refused write's old
        item.
        """
        hint = _ClaimHint(seen_attempt, start)
        for _ in range(CLAIM_TRIES):
            try:
                return await self._claim(tenant_id, project_id, worker_id, lease_seconds, hint)
            except _WrongHintError as wrong:
                hint = wrong.truth  # claimable: only the guess was wrong
        raise ConflictError(f"project {project_id} kept changing under its claim; try again")

    async def _claim(
        self,
        tenant_id: str,
        project_id: str,
        worker_id: str,
        lease_seconds: float,
        hint: _ClaimHint,
    ) -> Project:
        now = utcnow()
        now_ms = epoch_ms(now)
        expires = now_ms + int(lease_seconds * 1000)
        token = uuid.uuid4().hex  # tells a retry of this claim from someone else's
        attempt = hint.attempt + 1
        update = (
            _Update()
            .set("status", ProjectStatus.BUILDING.value)
            .set("claim_token", token)
            .set("attempt", attempt)
            .set("lease_owner", worker_id)
            .set("lease_expires_at", expires)
            .set("worker_id", worker_id)
            .set("updated_at", iso(now))
            .set("sweep_at", expires)
        )
        started = update.name("started_at")
        update.sets.append(f"{started} = if_not_exists({started}, {update.value(iso(now))})")
        status, lease = update.name("status"), update.name("lease_expires_at")
        # Every project item has an attempt: comparing it also refuses a missing one.
        condition = (
            f"{update.name('attempt')} = {update.value(hint.attempt)}"
            f" AND ({status} = {update.value(ProjectStatus.QUEUED.value)}"
            f" OR ({status} = {update.value(ProjectStatus.BUILDING.value)}"
            f" AND {lease} < {update.value(now_ms)}))"
        )
        if hint.stage is not None:
            running = StageSnapshot(
                name=hint.stage,
                status=StageStatus.RUNNING,
                attempt=attempt,
                worker_id=worker_id,
                started_at=iso(now),
            )
            condition += update.start_stage(running)
        try:
            item = await self._update(
                project_key(tenant_id, project_id), update, condition, what="claim"
            )
        except ConflictError as exc:
            if exc.item and exc.item.get("claim_token", {}).get("S") == token:
                return project_from_item(exc.item)  # a retry: the first try had landed
            current = project_from_item(exc.item) if exc.item else None
            refusal = claim_refusal(current, now_ms)
            if refusal is None and current is not None:
                raise _WrongHintError(hint.corrected(current)) from None
            raise ClaimRefusedError(refusal or ClaimRefusal.LEASED, current) from None
        return project_from_item(item)

    async def save_stages(self, token: RunToken, *stages: StageSnapshot) -> bool:
        """Write stage snapshots, unless a cancel has been requested: then nothing is
        written (the run's final write carries them) and this returns True.

        The refusal itself tells of the cancel (with the item as it was), so the write
        asks for nothing back: no copy of the stages map on every stage boundary.
        """
        update = _Update().set_stages(stages).set("updated_at", iso(utcnow()))
        flag = update.name("cancel_requested")
        not_cancelled = f"(attribute_not_exists({flag}) OR {flag} = {update.value(False)})"
        try:
            await self._fenced(token, update, "save_stages", also=not_cancelled)
        except LeaseLostError as lost:
            old = project_from_item(lost.item) if lost.item else None
            if (
                old is not None
                and (old.lease_owner, old.attempt) == (token.worker_id, token.attempt)
                and old.cancel_requested
            ):
                return True  # still ours: refused only because of the cancel
            raise
        return False

    async def extend_lease(self, token: RunToken, lease_seconds: float) -> bool:
        """Push the lease out; returns whether a cancel has been requested."""
        expires = epoch_ms() + int(lease_seconds * 1000)
        update = _Update().set("lease_expires_at", expires).set("sweep_at", expires)
        return await self._fenced(token, update, "extend_lease", want_cancel=True)

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
        update = (
            _Update()
            .set_stages(stages)
            .set("status", status.value)
            .set("finished_at", now)
            .set("updated_at", now)
            .remove("lease_owner", "lease_expires_at", "sweep_shard", "sweep_at")
        )
        if error is not None:
            update.set("last_error", error.model_dump())
        await self._fenced(token, update, f"finish({status})")

    async def requeue(
        self, token: RunToken, *, error: ErrorInfo | None, stages: Sequence[StageSnapshot] = ()
    ) -> None:
        """Back to QUEUED for a retry after a transient failure."""
        update = self._back_to_queue(stages)
        if error is not None:
            update.set("last_error", error.model_dump())
        await self._fenced(token, update, "requeue")

    async def release(self, token: RunToken, *, stages: Sequence[StageSnapshot] = ()) -> None:
        """Hand the project back unfinished (a draining worker): QUEUED, lease cleared,
        and ``releases`` counts it, so the claim it used costs no attempt."""
        await self._fenced(token, self._back_to_queue(stages).increment("releases"), "release")

    def _back_to_queue(self, stages: Sequence[StageSnapshot]) -> _Update:
        return (
            _Update()
            .set_stages(stages)
            .set("status", ProjectStatus.QUEUED.value)
            .set("updated_at", iso(utcnow()))
            .set("sweep_at", epoch_ms())
            .remove("lease_owner", "lease_expires_at")
        )

    # -- the sweeper ---------------------------------------------------------

    async def acquire_lock(self, name: str, owner: str, seconds: float) -> bool:
        """Take (or renew) a short named lock; False if someone else holds it."""
        now_ms = epoch_ms()
        until = now_ms + int(seconds * 1000)
        try:
            await self._retry.call(
                "PutItem(lock)",
                self._client.put_item,
                TableName=self._table,
                Item={
                    "pk": {"S": f"LOCK#{name}"},
                    "sk": {"S": "LOCK"},
                    "owner": {"S": owner},
                    "lock_until": {"N": str(until)},
                    # TTL (seconds) tidies up locks nobody renews.
                    TTL_ATTRIBUTE: {"N": str(until // 1000 + 3600)},
                },
                ConditionExpression=(
                    "attribute_not_exists(pk) OR lock_until < :now OR #owner = :owner"
                ),
                ExpressionAttributeNames={"#owner": "owner"},
                ExpressionAttributeValues={
                    ":now": {"N": str(now_ms)},
                    ":owner": {"S": owner},
                },
            )
        except ConflictError:
            return False
        return True

    async def due_for_sweep(self, shard: int, *, before: int, limit: int) -> list[SweepCandidate]:
        """Active projects of one index shard with ``sweep_at`` before ``before``, oldest
        first."""
        response = await self._retry.call(
            "Query(sweep)",
            self._client.query,
            TableName=self._table,
            IndexName=SWEEP_INDEX,
            KeyConditionExpression="sweep_shard = :shard AND sweep_at <= :before",
            ExpressionAttributeValues={
                ":shard": {"S": shard_key(shard)},
                ":before": {"N": str(before)},
            },
            Limit=limit,
        )
        candidates = []
        for item in response.get("Items", []):
            lease = item.get("lease_expires_at", {}).get("N")
            candidates.append(
                SweepCandidate(
                    tenant_id=item["tenant_id"]["S"],
                    project_id=item["project_id"]["S"],
                    status=ProjectStatus(item["status"]["S"]),
                    sweep_at=int(item["sweep_at"]["N"]),
                    lease_expires_at=int(lease) if lease else None,
                )
            )
        return candidates

    async def mark_swept(self, candidate: SweepCandidate) -> bool:
        """Restart the candidate's clock (``sweep_at`` = now), if nothing changed it
        meanwhile; False if something did (another sweeper, or the project moved on)."""
        update = _Update().set("sweep_at", epoch_ms())
        condition = (
            f"{update.name('sweep_at')} = {update.value(candidate.sweep_at)}"
            f" AND {update.name('status')} = {update.value(candidate.status.value)}"
        )
        key = project_key(candidate.tenant_id, candidate.project_id)
        try:
            await self._update(key, update, condition, what="sweep", returns="NONE")
        except ConflictError:
            return False
        return True

    async def ping(self) -> None:
        await self._retry.call("DescribeTable", self._client.describe_table, TableName=self._table)

    # -- conditional writes ------------------------------------------------------

    async def _fenced(
        self,
        token: RunToken,
        update: _Update,
        what: str,
        *,
        want_cancel: bool = False,
        also: str | None = None,
    ) -> bool:
        """An UpdateItem that lands only while ``token`` still holds the project.

        ``also`` is ANDed into the condition. With ``want_cancel`` the result says
        whether a cancel was requested (heartbeats learn of cancels this way): the
        write asks for the attributes it changed (UPDATED_NEW), not the whole item;
        ``cancel_seen`` copies ``cancel_requested`` so that a new cancel changes it
        and comes back. (An attribute written with its old value may not
        come back: moto leaves it out, so the copy must change to be seen. A cancel
        seen once stays seen by the run; its claim reads the flag itself.)
        """
        if want_cancel:
            seen, flag = update.name("cancel_seen"), update.name("cancel_requested")
            update.sets.append(f"{seen} = if_not_exists({flag}, {update.value(False)})")
        owner, attempt = update.name("lease_owner"), update.name("attempt")
        condition = (
            f"{owner} = {update.value(token.worker_id)}"
            f" AND {attempt} = {update.value(token.attempt)}"
        )
        if also is not None:
            condition += f" AND {also}"
        key = project_key(token.tenant_id, token.project_id)
        try:
            item = await self._update(
                key, update, condition, what=what, returns="UPDATED_NEW" if want_cancel else "NONE"
            )
        except ConflictError as exc:
            raise LeaseLostError(
                f"{what}: project {token.project_id} is no longer held by "
                f"{token.worker_id} at attempt {token.attempt}",
                item=exc.item,
            ) from None
        return bool(item.get("cancel_seen", {}).get("BOOL", False))

    async def _update_from(
        self, tenant_id: str, project_id: str, update: _Update, *, expect: ProjectStatus
    ) -> Project:
        """One UpdateItem conditional on the current status; returns the new project."""
        condition = f"{update.name('status')} = {update.value(expect.value)}"
        key = project_key(tenant_id, project_id)
        return project_from_item(await self._update(key, update, condition, what=f"from {expect}"))

    async def _update(
        self,
        key: dict[str, Any],
        update: _Update,
        condition: str,
        *,
        what: str,
        returns: Literal["ALL_NEW", "UPDATED_NEW", "NONE"] = "ALL_NEW",
    ) -> dict[str, Any]:
        """The one conditional UpdateItem: returns what ``returns`` asks for (the new
        item, the attributes it set, or {}), or raises ``ConflictError`` carrying the
        item as it was."""
        response = await self._retry.call(
            f"UpdateItem({what})",
            self._client.update_item,
            TableName=self._table,
            Key=key,
            UpdateExpression=update.expression(),
            ConditionExpression=condition,
            ExpressionAttributeNames=update.names,
            ExpressionAttributeValues=update.values,
            ReturnValues=returns,
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
        )
        return dict(response.get("Attributes", {}))
