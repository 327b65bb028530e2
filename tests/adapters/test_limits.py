"""Size limits against the emulator, over HTTP: writes over DynamoDB's limits are refused
before they are sent (moto enforces neither the item nor the expression limit reliably),
the table is left as it was, and long error text is stored bounded."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from ulid import ULID

from buildq import limits
from buildq.aws import RetryPolicy, aws_clients
from buildq.clock import now_iso
from buildq.errors import WriteTooLargeError
from buildq.items import idempotency_sk, project_key, tenant_pk
from buildq.models import ErrorInfo, Project, ProjectStatus, StageSnapshot, StageStatus
from buildq.settings import Settings
from buildq.store import DynamoProjectStore, Idempotency, RunToken
from buildq.store.base import Update
from buildq.transitions import new_project, stage_finished, stage_started
from tests.harness import Stack

T = TypeVar("T")
Scenario = Callable[
    [DynamoProjectStore, Callable[[Project], Awaitable[dict[str, Any]]]], Awaitable[T]
]


def run(stack: Stack, fn: Scenario[T]) -> T:
    """Run ``fn(store, raw)``; ``raw(project)`` reads the project's item as stored."""

    async def main() -> T:
        async with aws_clients(Settings()) as clients:
            store = DynamoProjectStore(clients.dynamodb, stack.table_name)

            async def raw(project: Project) -> dict[str, Any]:
                response = await clients.dynamodb.get_item(
                    TableName=stack.table_name,
                    Key=project_key(project.tenant_id, project.project_id),
                    ConsistentRead=True,
                )
                return dict(response.get("Item", {}))

            return await fn(store, raw)

    return asyncio.run(main())


def a_project(stage_names: list[str] | None = None, **parameters: Any) -> Project:
    return new_project(
        tenant_id="t1",
        project_id=str(ULID()),
        name="p",
        workflow="demo",
        stage_names=stage_names or ["plan", "build"],
        parameters=parameters,
        now=now_iso(),
    )


async def claimed(store: DynamoProjectStore, project: Project) -> RunToken:
    await store.create(project)
    got = await store.claim("t1", project.project_id, worker_id="w1", lease_seconds=30)
    return RunToken("t1", project.project_id, "w1", got.attempt)


def test_an_oversized_stage_write_is_refused_before_it_is_sent(stack: Stack) -> None:
    project = a_project()

    async def scenario(store: DynamoProjectStore, raw: Any) -> tuple[Any, Any, str]:
        token = await claimed(store, project)
        before = await raw(project)
        running = stage_started(project.stages[0], attempt=1, worker_id="w1", now=now_iso())
        huge = stage_finished(running, now=now_iso(), output={"o": "x" * 600_000})
        with pytest.raises(WriteTooLargeError) as refused:
            await store.save_stages(token, huge)
        with pytest.raises(WriteTooLargeError):
            await store.finish(token, ProjectStatus.SUCCEEDED, stages=[huge])
        return before, await raw(project), str(refused.value)

    before, after, message = run(stack, scenario)
    assert after == before  # nothing landed, not even updated_at
    assert "stages.plan" in message
    assert "is 600,127 bytes; one value may be at most 12,288" in message


def test_an_update_expression_over_4_kb_is_refused_before_it_is_sent(stack: Stack) -> None:
    project = a_project()

    async def scenario(store: DynamoProjectStore, raw: Any) -> tuple[Any, Any]:
        await store.create(project)
        before = await raw(project)
        update = Update()
        for i in range(400):  # small values, but a long expression
            update.set(f"attribute_{i}", i)
        key = project_key(project.tenant_id, project.project_id)
        with pytest.raises(WriteTooLargeError, match="UpdateExpression is"):
            await store._update(key, update, "attribute_exists(pk)", what="test")
        return before, await raw(project)

    before, after = run(stack, scenario)
    assert after == before


def test_a_create_over_the_budget_is_refused_before_it_is_sent(stack: Stack) -> None:
    too_big = a_project(blob="x" * 40_000)
    too_many = a_project([f"s{i}" for i in range(limits.MAX_STAGES + 1)])
    key = Idempotency(key="k-" + too_big.project_id, request_hash="h")

    async def scenario(store: DynamoProjectStore, raw: Any) -> list[Any]:
        with pytest.raises(WriteTooLargeError, match="at most 32,768"):
            await store.create(too_big)
        with pytest.raises(WriteTooLargeError, match="at most 32,768"):
            await store.create(too_big, idempotency=key)  # the TransactWriteItems path
        with pytest.raises(WriteTooLargeError, match="25 stages; at most 24"):
            await store.create(too_many)
        idempotency_item = await store._client.get_item(
            TableName=store._table,
            Key={"pk": {"S": tenant_pk("t1")}, "sk": {"S": idempotency_sk(key.key)}},
            ConsistentRead=True,
        )
        return [await raw(too_big), await raw(too_many), idempotency_item.get("Item")]

    assert run(stack, scenario) == [{}, {}, None]


def test_a_600_kb_error_is_stored_truncated(stack: Stack) -> None:
    project = a_project()
    stderr = "error: cannot compile\n" + "warning: noise\n" * 40_000 + "fatal: out of memory"
    assert len(stderr) > 600_000

    async def scenario(store: DynamoProjectStore, raw: Any) -> tuple[Project | None, int]:
        token = await claimed(store, project)
        error = ErrorInfo(type="PermanentError", message=stderr)
        running = stage_started(project.stages[0], attempt=1, worker_id="w1", now=now_iso())
        failed = stage_finished(running, now=now_iso(), error=error)
        await store.finish(token, ProjectStatus.FAILED, error=error, stages=[failed])
        return await store.get("t1", project.project_id), limits.item_size(await raw(project))

    stored, size = run(stack, scenario)
    assert stored is not None
    assert stored.status is ProjectStatus.FAILED
    for error in (stored.last_error, stored.stage("plan").error):
        assert error is not None
        assert len(error.message.encode()) <= limits.MAX_ERROR_MESSAGE_BYTES
        assert error.message.startswith("error: cannot compile\n")
        assert error.message.endswith("fatal: out of memory")
        head, marker, tail = re.split(r"( … \[truncated [\d,]+ bytes\] … )", error.message)
        cut = int(marker.split()[2].replace(",", ""))
        assert cut == len(stderr) - len(head) - len(tail)  # all ASCII: a byte a character
    assert size < 3 * limits.MAX_ERROR_MESSAGE_BYTES


def test_the_worst_case_project_is_written_and_fits(stack: Stack) -> None:
    """The largest project and the largest final write: both pass the checks, land, and
    the item as stored stays within the worst case, with margin under 400 KB."""
    names = [f"{i:02d}".ljust(limits.MAX_STAGE_NAME_BYTES, "s") for i in range(limits.MAX_STAGES)]
    project = a_project(names, blob="x" * (limits.MAX_PARAMETERS_BYTES - 11))
    error = ErrorInfo(type="E" * 500, message="誤" * 100_000)
    output = {"o": "x" * (limits.MAX_STAGE_OUTPUT_BYTES - 8)}

    async def scenario(store: DynamoProjectStore, raw: Any) -> tuple[Project | None, int]:
        token = await claimed(store, project)
        stages = [
            StageSnapshot(
                name=name,
                status=StageStatus.FAILED,
                attempt=token.attempt,
                worker_id="w1",
                started_at=now_iso(),
                finished_at=now_iso(),
                output=output,
                error=error,
            )
            for name in names
        ]
        await store.finish(token, ProjectStatus.FAILED, error=error, stages=stages)
        return await store.get("t1", project.project_id), limits.item_size(await raw(project))

    stored, size = run(stack, scenario)
    assert stored is not None
    assert [stage.output for stage in stored.stages] == [output] * limits.MAX_STAGES
    assert size > 250_000  # it is a big one
    assert size <= limits.WORST_CASE_ITEM_BYTES
    assert size + limits.ITEM_MARGIN_BYTES <= limits.DYNAMODB_ITEM_MAX_BYTES


def test_dynamodbs_own_item_size_refusal_is_write_too_large(stack: Stack) -> None:
    """What the emulator itself refuses (a top-level attribute over 400 KB, sent with
    no check of ours in the way) comes back as WriteTooLargeError, not retried."""

    async def scenario(store: DynamoProjectStore, raw: Any) -> None:
        item = {
            "pk": {"S": tenant_pk("t1")},
            "sk": {"S": f"LIMITS#{ULID()}"},
            "blob": {"S": "x" * 410_000},
        }
        with pytest.raises(WriteTooLargeError, match="Item size has exceeded"):
            await RetryPolicy(attempts=3).call(
                "PutItem", store._client.put_item, TableName=store._table, Item=item
            )

    run(stack, scenario)
