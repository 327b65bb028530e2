"""The sweeper against the emulator, over HTTP: a pass reads only what is due, and
repeat sweeps of one wait back off."""

from __future__ import annotations

import asyncio
import io
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ulid import ULID

from buildq.aws import aws_clients
from buildq.clock import epoch_ms, now_iso
from buildq.items import SWEEP_SHARDS, project_key, project_to_item
from buildq.models import Project, ProjectStatus
from buildq.queue import SqsBuildQueue
from buildq.settings import Settings
from buildq.store import DynamoProjectStore, RunToken
from buildq.transitions import new_project
from buildq_worker.sweeper import Sweeper
from tests.harness import Stack

T = TypeVar("T")
QUEUED_AFTER = 300.0
BUILDING_AFTER = 60.0


def in_shard(shard: int) -> str:
    """A project id whose sweeper shard is ``shard``."""
    while True:
        project_id = str(ULID())
        if zlib.crc32(project_id.encode()) % SWEEP_SHARDS == shard:
            return project_id


def project(project_id: str, status: ProjectStatus, **fields: Any) -> Project:
    base = new_project(
        tenant_id="t1",
        project_id=project_id,
        name="p",
        workflow="demo",
        stage_names=["plan"],
        parameters={},
        now=now_iso(),
    )
    return base.model_copy(update={"status": status, **fields})


def with_sweeper(stack: Stack, fn: Callable[[Sweeper, DynamoProjectStore], Awaitable[T]]) -> T:
    settings = Settings(
        table_name=stack.table_name, queue_name=stack.queue_name, dlq_name=stack.dlq_name
    )

    async def main() -> T:
        async with aws_clients(settings) as clients:
            store = DynamoProjectStore.from_settings(clients.dynamodb, settings)
            queue = SqsBuildQueue.from_settings(clients.sqs, settings)
            sweeper = Sweeper(
                store,
                queue,
                owner="sweeper-test",
                queue_name=stack.queue_name,
                interval=30,
                queued_after=QUEUED_AFTER,
                building_after=BUILDING_AFTER,
                out=io.StringIO(),
            )
            return await fn(sweeper, store)

    return asyncio.run(main())


def put(stack: Stack, item: dict[str, Any]) -> None:
    stack.client("dynamodb").put_item(TableName=stack.table_name, Item=item)


def test_a_pass_reads_only_what_is_due_whatever_the_backlog(stack: Stack) -> None:
    """Suspected 12: one index read per shard with the loosest cutoff was used up by
    projects not yet due (QUEUED for 200 s, past BUILDING's 60 s cutoff but not
    QUEUED's 300 s) and skipped client-side; a due BUILDING project behind them was
    never reached. Now each status has its own shards and its own cutoff."""
    now = epoch_ms()
    shard = 5
    for _ in range(120):  # a backlog, all in one shard, none due
        waiting = project(in_shard(shard), ProjectStatus.QUEUED)
        put(stack, project_to_item(waiting, sweep_at=now - 200_000))
    dead_id = in_shard(shard)
    dead = project(
        dead_id,
        ProjectStatus.BUILDING,
        attempt=1,
        lease_owner="gone",
        lease_expires_at=now - 90_000,
    )
    put(stack, project_to_item(dead, sweep_at=now - 90_000))  # due: 90 s past its lease

    swept = with_sweeper(stack, lambda sweeper, _: sweeper.sweep())
    assert swept == 1
    [message] = stack.client("sqs").receive_message(QueueUrl=stack.queue_url())["Messages"]
    assert dead_id in message["Body"]


def test_repeat_sweeps_of_one_wait_back_off(stack: Stack) -> None:
    """Suspected 12: every project QUEUED past the threshold got a duplicate message
    every period, so a long backlog kept growing by its own duplicates. Now each sweep
    of the same wait restarts its clock further ahead (1, 2, 4… periods), until the
    project goes back to the queue by itself."""
    project_id = in_shard(0)
    now = epoch_ms()
    put(stack, project_to_item(project(project_id, ProjectStatus.QUEUED), sweep_at=now - 400_000))
    key = project_key("t1", project_id)
    table = stack.client("dynamodb")

    def clock() -> int:
        item = table.get_item(TableName=stack.table_name, Key=key)["Item"]
        return int(item["sweep_at"]["N"])

    def make_due() -> None:  # as if the time had passed
        table.update_item(
            TableName=stack.table_name,
            Key=key,
            UpdateExpression="SET sweep_at = :t",
            ExpressionAttributeValues={":t": {"N": str(epoch_ms() - 400_000)}},
        )

    ahead = []
    for _ in range(3):
        assert with_sweeper(stack, lambda sweeper, _: sweeper.sweep()) == 1
        ahead.append(clock() - epoch_ms())
        # Not due again at once: the next pass sends nothing.
        assert with_sweeper(stack, lambda sweeper, _: sweeper.sweep()) == 0
        make_due()
    period = QUEUED_AFTER * 1000
    assert ahead[0] < 5_000  # the first sweep restarts the clock now
    assert period - 5_000 < ahead[1] <= period
    assert 2 * period - 5_000 < ahead[2] <= 2 * period

    async def claim_and_requeue(sweeper: Sweeper, store: DynamoProjectStore) -> None:
        claimed = await store.claim("t1", project_id, worker_id="w", lease_seconds=30)
        await store.requeue(RunToken("t1", project_id, "w", claimed.attempt), error=None)

    with_sweeper(stack, claim_and_requeue)
    item = table.get_item(TableName=stack.table_name, Key=key)["Item"]
    assert "sweep_backoff" not in item
    assert item["sweep_shard"]["S"].startswith("SWEEP#Q#")
