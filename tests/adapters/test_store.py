"""The DynamoDB store against the emulator, over HTTP: claims, leases and fencing."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import pytest
from ulid import ULID

from buildq.aws import aws_clients
from buildq.clock import now_iso
from buildq.errors import LeaseLostError
from buildq.metrics import AWS_CALL_SECONDS
from buildq.models import ErrorInfo, Project, ProjectStatus, StageStatus
from buildq.settings import Settings
from buildq.store import ClaimRefusedError, DynamoProjectStore, RunToken
from buildq.transitions import (
    ClaimRefusal,
    claimed,
    new_project,
    stage_finished,
    stage_started,
)
from tests.harness import Stack

T = TypeVar("T")


def run(fn: Callable[[DynamoProjectStore], Awaitable[T]], stack: Stack) -> T:
    async def main() -> T:
        async with store_for(stack) as store:
            return await fn(store)

    return asyncio.run(main())


@asynccontextmanager
async def store_for(stack: Stack) -> AsyncIterator[DynamoProjectStore]:
    async with aws_clients(Settings()) as clients:
        yield DynamoProjectStore(clients.dynamodb, stack.table_name)


def a_project(tenant: str = "t1") -> Project:
    return new_project(
        tenant_id=tenant,
        project_id=str(ULID()),
        name="p",
        workflow="demo",
        stage_names=["plan", "build"],
        parameters={"stage_seconds": 0.5, "nested": {"x": [1, 2.5]}},
        now=now_iso(),
    )


def test_create_get_round_trip_and_missing(stack: Stack) -> None:
    project = a_project()

    async def scenario(store: DynamoProjectStore) -> tuple[Project | None, Project | None]:
        await store.create(project)
        return await store.get("t1", project.project_id), await store.get("t2", project.project_id)

    stored, other_tenant = run(scenario, stack)
    assert stored == project
    assert other_tenant is None  # keyed by tenant: another tenant cannot see it


def test_claim_takes_lease_and_attempt_like_the_pure_transition(stack: Stack) -> None:
    project = a_project()

    async def scenario(store: DynamoProjectStore) -> Project:
        await store.create(project)
        return await store.claim("t1", project.project_id, worker_id="w1", lease_seconds=30)

    got = run(scenario, stack)
    assert got.status is ProjectStatus.BUILDING
    assert got.attempt == 1
    assert got.lease_owner == "w1"
    assert got.lease_expires_at is not None
    expected = claimed(
        project,
        worker_id="w1",
        now=got.updated_at,
        now_ms=got.lease_expires_at - 30_000,
        lease_expires_at=got.lease_expires_at,
    )
    assert got == expected.model_copy(update={"started_at": got.started_at})


def test_second_claim_is_refused_while_the_lease_lives(stack: Stack) -> None:
    project = a_project()

    async def scenario(store: DynamoProjectStore) -> ClaimRefusedError:
        await store.create(project)
        await store.claim("t1", project.project_id, worker_id="w1", lease_seconds=30)
        with pytest.raises(ClaimRefusedError) as refused:
            await store.claim("t1", project.project_id, worker_id="w2", lease_seconds=30)
        return refused.value

    refused = run(scenario, stack)
    assert refused.refusal is ClaimRefusal.LEASED
    assert refused.current is not None
    assert refused.current.lease_owner == "w1"  # the loser learns who won, without a read


def test_a_lease_is_taken_over_only_the_clock_margin_past_its_expiry(stack: Stack) -> None:
    project = a_project()

    async def scenario(store: DynamoProjectStore) -> tuple[ClaimRefusedError, Project]:
        await store.create(project)
        await store.claim("t1", project.project_id, worker_id="w1", lease_seconds=0.05)
        await asyncio.sleep(0.1)  # expired, but not a margin ago
        with pytest.raises(ClaimRefusedError) as refused:
            await store.claim(
                "t1", project.project_id, worker_id="w2", lease_seconds=30, margin_seconds=1
            )
        await asyncio.sleep(1.0)
        taken = await store.claim(
            "t1", project.project_id, worker_id="w2", lease_seconds=30, margin_seconds=1
        )
        return refused.value, taken

    refused, taken = run(scenario, stack)
    assert refused.refusal is ClaimRefusal.LEASED
    assert refused.current is not None
    assert refused.current.lease_owner == "w1"
    assert (taken.attempt, taken.lease_owner) == (2, "w2")


def test_expired_lease_is_taken_over_and_the_old_owner_is_fenced_out(stack: Stack) -> None:
    project = a_project()

    async def scenario(store: DynamoProjectStore) -> Project | None:
        await store.create(project)
        first = await store.claim("t1", project.project_id, worker_id="w1", lease_seconds=0.05)
        old = RunToken("t1", project.project_id, "w1", first.attempt)
        await asyncio.sleep(0.1)
        second = await store.claim(
            "t1", project.project_id, worker_id="w2", lease_seconds=30, margin_seconds=0
        )
        assert second.attempt == 2
        stage = stage_started(first.stages[0], attempt=1, worker_id="w1", now=now_iso())
        with pytest.raises(LeaseLostError):
            await store.save_stages(old, stage)
        with pytest.raises(LeaseLostError):
            await store.extend_lease(old, 30)
        with pytest.raises(LeaseLostError):
            await store.finish(old, ProjectStatus.SUCCEEDED)
        with pytest.raises(LeaseLostError):
            await store.requeue(old, error=None)
        return await store.get("t1", project.project_id)

    after = run(scenario, stack)
    assert after is not None
    assert after.status is ProjectStatus.BUILDING
    assert after.lease_owner == "w2"
    assert after.stages[0].status is StageStatus.PENDING  # nothing of w1's landed


def test_finish_clears_the_lease_and_later_claims_see_a_terminal_project(stack: Stack) -> None:
    project = a_project()

    async def scenario(store: DynamoProjectStore) -> tuple[Project | None, ClaimRefusal]:
        await store.create(project)
        got = await store.claim("t1", project.project_id, worker_id="w1", lease_seconds=30)
        token = RunToken("t1", project.project_id, "w1", got.attempt)
        running = stage_started(got.stages[0], attempt=1, worker_id="w1", now=now_iso())
        await store.save_stages(token, running)
        await store.finish(token, ProjectStatus.SUCCEEDED)
        with pytest.raises(ClaimRefusedError) as refused:
            await store.claim("t1", project.project_id, worker_id="w2", lease_seconds=30)
        return await store.get("t1", project.project_id), refused.value.refusal

    after, refusal = run(scenario, stack)
    assert refusal is ClaimRefusal.TERMINAL
    assert after is not None
    assert after.status is ProjectStatus.SUCCEEDED
    assert after.lease_owner is None
    assert after.lease_expires_at is None
    assert after.finished_at is not None
    assert after.stages[0].status is StageStatus.RUNNING
    raw = stack.client("dynamodb").get_item(
        TableName=stack.table_name,
        Key={"pk": {"S": "TENANT#t1"}, "sk": {"S": f"PROJECT#{project.project_id}"}},
    )["Item"]
    assert "sweep_shard" not in raw
    assert "sweep_at" not in raw


def test_stage_writes_and_lease_extensions_learn_of_a_cancel(stack: Stack) -> None:
    async def first_write_after_a_cancel(store: DynamoProjectStore, heartbeat: bool) -> list[bool]:
        project = a_project()
        await store.create(project)
        got = await store.claim("t1", project.project_id, worker_id="w1", lease_seconds=30)
        token = RunToken("t1", project.project_id, "w1", got.attempt)
        running = stage_started(got.stages[0], attempt=1, worker_id="w1", now=now_iso())
        seen = [await store.save_stages(token, running), await store.extend_lease(token, 30)]
        await store.request_cancel("t1", project.project_id)
        if heartbeat:
            return [*seen, await store.extend_lease(token, 30)]
        done = stage_finished(running, now=now_iso(), output={"x": 1})
        refused = await store.save_stages(token, done)
        after = await store.get("t1", project.project_id)
        assert after is not None
        assert after.stages[0].status is StageStatus.RUNNING  # the refused write wrote nothing
        return [*seen, refused]

    async def scenario(store: DynamoProjectStore) -> list[list[bool]]:
        return [await first_write_after_a_cancel(store, heartbeat) for heartbeat in (False, True)]

    assert run(scenario, stack) == [[False, False, True], [False, False, True]]


def test_requeue_returns_the_project_for_the_next_attempt(stack: Stack) -> None:
    project = a_project()
    error = ErrorInfo(type="Boom", message="transient")

    async def scenario(store: DynamoProjectStore) -> Project:
        await store.create(project)
        got = await store.claim("t1", project.project_id, worker_id="w1", lease_seconds=30)
        await store.requeue(RunToken("t1", project.project_id, "w1", got.attempt), error=error)
        queued = await store.get("t1", project.project_id)
        assert queued is not None
        assert queued.status is ProjectStatus.QUEUED
        assert queued.last_error == error
        assert queued.lease_owner is None
        return await store.claim("t1", project.project_id, worker_id="w2", lease_seconds=30)

    again = run(scenario, stack)
    assert again.attempt == 2
    assert again.worker_id == "w2"


def test_claim_of_a_missing_project_says_so(stack: Stack) -> None:
    async def scenario(store: DynamoProjectStore) -> ClaimRefusedError:
        with pytest.raises(ClaimRefusedError) as refused:
            await store.claim("t1", str(ULID()), worker_id="w1", lease_seconds=30)
        return refused.value

    refused = run(scenario, stack)
    assert refused.refusal is ClaimRefusal.MISSING
    assert refused.current is None
    assert stack.table_items() == []  # the failed claim created nothing


def test_list_pages_newest_first(stack: Stack) -> None:
    projects = []
    for _ in range(5):
        projects.append(a_project())
        time.sleep(0.002)  # distinct ULID timestamps

    async def scenario(store: DynamoProjectStore) -> list[list[str]]:
        for project in projects:
            await store.create(project)
        await store.create(a_project(tenant="t2"))
        pages: list[list[str]] = []
        after: str | None = None
        while True:
            page, after = await store.list_projects("t1", limit=2, after=after)
            pages.append([p.project_id for p in page])
            if after is None:
                return pages

    pages = run(scenario, stack)
    flat = [pid for page in pages for pid in page]
    assert flat == [p.project_id for p in reversed(projects)]


def test_the_sweeper_lock_is_held_by_one_owner_until_it_expires(stack: Stack) -> None:
    async def scenario(store: DynamoProjectStore) -> list[bool]:
        results = [
            await store.acquire_lock("sweeper", "w1", 0.3),
            await store.acquire_lock("sweeper", "w2", 0.3),  # held by w1
            await store.acquire_lock("sweeper", "w1", 0.3),  # w1 renews
        ]
        await asyncio.sleep(0.4)
        results.append(await store.acquire_lock("sweeper", "w2", 0.3))  # expired: w2 takes it
        results.append(await store.acquire_lock("sweeper", "w1", 0.3))
        return results

    assert run(scenario, stack) == [True, False, True, True, False]


def test_sweep_candidates_come_from_the_index_and_leave_it_when_done(stack: Stack) -> None:
    from buildq.items import SWEEP_SHARDS, sweep_shard

    project = a_project()
    shard = int(sweep_shard(project.project_id).split("#")[2])
    assert 0 <= shard < SWEEP_SHARDS

    async def scenario(store: DynamoProjectStore) -> tuple[int, bool, bool, int]:
        await store.create(project)
        far = int(time.time() * 1000) + 60_000
        found = await store.due_for_sweep(shard, ProjectStatus.QUEUED, before=far, limit=10)
        mine = [c for c in found if c.project_id == project.project_id]
        assert [c.status for c in mine] == [ProjectStatus.QUEUED]
        await asyncio.sleep(0.01)  # so "now" differs from the creation time
        first = await store.mark_swept(mine[0], base_ms=1000)
        again = await store.mark_swept(mine[0], base_ms=1000)  # stale: sweep_at moved on
        got = await store.claim("t1", project.project_id, worker_id="w1", lease_seconds=30)
        await store.finish(
            RunToken("t1", project.project_id, "w1", got.attempt), ProjectStatus.SUCCEEDED
        )
        after = await store.due_for_sweep(shard, ProjectStatus.QUEUED, before=far, limit=10)
        return (
            len(mine),
            first,
            again,
            len([c for c in after if c.project_id == project.project_id]),
        )

    assert run(scenario, stack) == (1, True, False, 0)


def test_concurrent_claims_have_exactly_one_winner(stack: Stack) -> None:
    # The claim is the only thing between a duplicate message and a second run.
    async def scenario(store: DynamoProjectStore) -> list[int]:
        winners = []
        for _ in range(10):
            project = a_project()
            await store.create(project)

            async def claim(worker: str, project_id: str = project.project_id) -> int:
                try:
                    await store.claim("t1", project_id, worker_id=worker, lease_seconds=30)
                except ClaimRefusedError:
                    return 0
                return 1

            winners.append(sum(await asyncio.gather(*(claim(f"w{i}") for i in range(10)))))
        return winners

    assert run(scenario, stack) == [1] * 10


def test_a_claim_can_start_the_first_stage_in_the_same_write(stack: Stack) -> None:
    project = a_project()
    first, second = project.stages[0].name, project.stages[1].name

    async def scenario(store: DynamoProjectStore) -> tuple[Project, Project, Project]:
        await store.create(project)
        got = await store.claim(
            "t1", project.project_id, worker_id="w1", lease_seconds=30, start=first
        )
        token = RunToken("t1", project.project_id, "w1", got.attempt)
        done = stage_finished(got.stages[0], now=now_iso(), output={"ok": True})
        failed = stage_finished(
            stage_started(got.stages[1], attempt=1, worker_id="w1", now=now_iso()),
            now=now_iso(),
            error=ErrorInfo(type="Boom", message="transient"),
        )
        await store.save_stages(token, done, failed)
        await store.requeue(token, error=failed.error)
        # The retry's message still names the first stage: already done, so the claim
        # tries again with the first stage still to run.
        again = await store.claim(
            "t1", project.project_id, worker_id="w2", lease_seconds=30, start=first
        )
        await store.requeue(RunToken("t1", project.project_id, "w2", again.attempt), error=None)
        # A hint naming no stage of this workflow is only a wrong guess, too.
        third = await store.claim(
            "t1", project.project_id, worker_id="w3", lease_seconds=30, start="no-such-stage"
        )
        return got, again, third

    got, again, third = run(scenario, stack)
    assert got.status is ProjectStatus.BUILDING
    assert got.attempt == 1
    running = got.stages[0]
    assert (running.name, running.status, running.attempt, running.worker_id) == (
        first,
        StageStatus.RUNNING,
        1,
        "w1",
    )
    assert running.started_at is not None
    assert all(stage.status is StageStatus.PENDING for stage in got.stages[1:])
    assert again.attempt == 2
    assert again.stages[0].status is StageStatus.SUCCEEDED
    assert again.stages[0].attempt == 1  # untouched
    retried = again.stages[1]
    assert (retried.name, retried.status, retried.attempt, retried.worker_id) == (
        second,
        StageStatus.RUNNING,
        2,
        "w2",
    )
    assert retried.error is None
    assert retried.finished_at is None
    assert third.attempt == 3
    assert third.stages[1].status is StageStatus.RUNNING
    assert third.stages[1].worker_id == "w3"


def test_a_claim_with_a_start_stage_is_still_refused_when_leased(stack: Stack) -> None:
    project = a_project()
    first = project.stages[0].name

    async def scenario(store: DynamoProjectStore) -> ClaimRefusedError:
        await store.create(project)
        await store.claim("t1", project.project_id, worker_id="w1", lease_seconds=30, start=first)
        with pytest.raises(ClaimRefusedError) as refused:
            await store.claim(
                "t1", project.project_id, worker_id="w2", lease_seconds=30, start=first
            )
        return refused.value

    refused = run(scenario, stack)
    assert refused.refusal is ClaimRefusal.LEASED
    assert refused.current is not None
    assert refused.current.stages[0].worker_id == "w1"


def _update_items() -> float:
    """UpdateItem attempts this process has made so far, any outcome (its own metric)."""
    return sum(
        sample.value
        for metric in AWS_CALL_SECONDS.collect()
        for sample in metric.samples
        if sample.name.endswith("_count") and sample.labels["operation"] == "UpdateItem"
    )


def test_a_claim_on_the_right_hints_is_one_write_and_a_stale_one_costs_one_more(
    stack: Stack,
) -> None:
    project = a_project()
    first = project.stages[0].name

    async def scenario(store: DynamoProjectStore) -> tuple[list[float], Project, Project]:
        await store.create(project)
        writes = [_update_items()]
        got = await store.claim(
            "t1", project.project_id, worker_id="w1", lease_seconds=30, start=first
        )
        writes.append(_update_items())
        await store.release(RunToken("t1", project.project_id, "w1", got.attempt))
        writes.append(_update_items())
        # A message sent before that claim: it saw attempt 0, the project is at 1.
        again = await store.claim(
            "t1", project.project_id, worker_id="w2", lease_seconds=30, start=first
        )
        writes.append(_update_items())
        return writes, got, again

    writes, got, again = run(scenario, stack)
    assert [b - a for a, b in itertools.pairwise(writes)] == [1, 1, 2]
    assert (got.attempt, got.stages[0].attempt, got.stages[0].status) == (
        1,
        1,
        StageStatus.RUNNING,
    )
    assert (again.attempt, again.lease_owner) == (2, "w2")
    assert (again.stages[0].attempt, again.stages[0].worker_id) == (2, "w2")


def test_a_hinted_claim_of_a_missing_project_creates_nothing(stack: Stack) -> None:
    project_id = str(ULID())

    async def scenario(store: DynamoProjectStore) -> tuple[ClaimRefusal, Project | None]:
        with pytest.raises(ClaimRefusedError) as refused:
            await store.claim(
                "t1", project_id, worker_id="w1", lease_seconds=30, start="plan", seen_attempt=0
            )
        return refused.value.refusal, await store.get("t1", project_id)

    refusal, after = run(scenario, stack)
    assert refusal is ClaimRefusal.MISSING
    assert after is None


def test_claims_on_stale_hints_still_let_only_one_worker_win(stack: Stack) -> None:
    project = a_project()

    async def scenario(store: DynamoProjectStore) -> tuple[int, Project | None]:
        await store.create(project)
        first = await store.claim("t1", project.project_id, worker_id="w0", lease_seconds=30)
        await store.release(RunToken("t1", project.project_id, "w0", first.attempt))

        async def claim(worker: str) -> int:
            try:
                await store.claim(
                    "t1",
                    project.project_id,
                    worker_id=worker,
                    lease_seconds=30,
                    start=project.stages[0].name,
                    seen_attempt=0,  # stale: the project is at attempt 1
                )
            except ClaimRefusedError:
                return 0
            return 1

        winners = sum(await asyncio.gather(*(claim(f"w{i}") for i in range(1, 9))))
        return winners, await store.get("t1", project.project_id)

    winners, after = run(scenario, stack)
    assert winners == 1
    assert after is not None
    assert after.attempt == 2
