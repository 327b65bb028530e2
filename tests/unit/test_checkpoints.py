"""The write-behind checkpoint writer (buildq_worker.checkpoints) against an
in-memory store whose writes the test holds open."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from buildq.errors import LeaseLostError, UnavailableError
from buildq.models import StageSnapshot, StageStatus
from buildq.store import RunToken
from buildq_worker.checkpoints import CheckpointWriter, merged

TOKEN = RunToken("tenant-a", "01HZXCHECKPOINT", "worker-1", 1)
PENDING, RUNNING, SUCCEEDED = StageStatus.PENDING, StageStatus.RUNNING, StageStatus.SUCCEEDED


def snap(name: str, status: StageStatus = RUNNING) -> StageSnapshot:
    return StageSnapshot(name=name, status=status)


class HeldStore:
    """Each ``save_stages`` waits until the test lets it through (``gate``), and can
    be told to fail or to report a cancel."""

    def __init__(self) -> None:
        self.saves: list[list[tuple[str, StageStatus]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail_with: list[Exception] = []
        self.cancel = False

    async def save_stages(self, token: RunToken, *stages: StageSnapshot) -> bool:
        assert token == TOKEN
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            if self.fail_with:
                raise self.fail_with.pop(0)
            if self.cancel:
                return True  # refused for a cancel: nothing written
            self.saves.append([(stage.name, stage.status) for stage in stages])
            return False
        finally:
            self.in_flight -= 1


class Log:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append((event, fields))


class Calls:
    def __init__(self) -> None:
        self.cancel = 0
        self.lease_lost = 0

    def writer(self, store: HeldStore, log: Log | None = None) -> CheckpointWriter:
        return CheckpointWriter(
            store,
            TOKEN,
            log or Log(),
            on_cancel=self._cancelled,
            on_lease_lost=self._lost,
            linger=0,
        )

    def _cancelled(self) -> None:
        self.cancel += 1

    def _lost(self) -> None:
        self.lease_lost += 1


async def settle_loop() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def settling_behind_a_held_write(store: HeldStore) -> asyncio.Task[list[StageSnapshot]]:
    """A run's first write in flight and held, its next snapshots queued behind it, and
    the run ending: its ``settle`` task, waiting."""
    writer = Calls().writer(store)
    store.gate.clear()
    writer.write(snap("plan"))
    await settle_loop()
    writer.write(snap("plan", SUCCEEDED), snap("generate"))
    settling = asyncio.create_task(writer.settle([snap("generate", SUCCEEDED)]))
    await settle_loop()
    return settling


def statuses(stages: list[StageSnapshot]) -> list[tuple[str, StageStatus]]:
    return [(stage.name, stage.status) for stage in stages]


def test_merged_keeps_the_latest_snapshot_of_each_stage_in_first_seen_order() -> None:
    stages = merged([snap("a"), snap("b")], [snap("a", SUCCEEDED), snap("c")])
    assert statuses(stages) == [("a", SUCCEEDED), ("b", RUNNING), ("c", RUNNING)]


def test_writes_while_one_is_in_flight_go_out_together_in_the_next() -> None:
    async def scenario() -> HeldStore:
        store = HeldStore()
        writer = Calls().writer(store)
        store.gate.clear()
        writer.write(snap("plan"))
        await settle_loop()  # the first write is in flight, held
        writer.write(snap("plan", SUCCEEDED), snap("generate"))
        writer.write(snap("generate", SUCCEEDED), snap("build"))
        await settle_loop()
        assert store.saves == []
        store.gate.set()
        await settle_loop()
        return store

    store = asyncio.run(scenario())
    assert store.saves == [
        [("plan", RUNNING)],
        [("plan", SUCCEEDED), ("generate", SUCCEEDED), ("build", RUNNING)],
    ]
    assert store.most_in_flight == 1  # in order: never two at once


def test_settle_waits_for_the_write_in_flight_and_returns_the_rest_with_the_final() -> None:
    async def scenario() -> tuple[HeldStore, list[StageSnapshot]]:
        store = HeldStore()
        settling = await settling_behind_a_held_write(store)
        assert not settling.done()  # the write in flight must land first
        store.gate.set()
        return store, await settling

    store, final = asyncio.run(scenario())
    assert store.saves == [[("plan", RUNNING)]]  # nothing more once the run has ended
    assert statuses(final) == [("plan", SUCCEEDED), ("generate", SUCCEEDED)]


def test_a_run_that_ends_before_its_first_write_goes_out_writes_nothing_until_its_end() -> None:
    async def scenario() -> tuple[HeldStore, list[StageSnapshot]]:
        store = HeldStore()
        writer = Calls().writer(store)
        writer.write(snap("plan", SUCCEEDED), snap("generate"))
        return store, await writer.settle([snap("generate", SUCCEEDED)])

    store, final = asyncio.run(scenario())
    assert store.saves == []
    assert statuses(final) == [("plan", SUCCEEDED), ("generate", SUCCEEDED)]


def test_a_failed_write_keeps_its_snapshots_for_the_next_one_and_the_run_goes_on() -> None:
    async def scenario() -> tuple[HeldStore, Log, list[StageSnapshot]]:
        store = HeldStore()
        log = Log()
        writer = Calls().writer(store, log)
        store.fail_with = [UnavailableError("dynamodb: throttled")]
        writer.write(snap("plan"))
        await settle_loop()
        assert store.saves == []
        writer.write(snap("plan", SUCCEEDED), snap("generate"))
        await settle_loop()
        writer.write(snap("generate", SUCCEEDED), snap("build"))
        store.fail_with = [UnavailableError("dynamodb: throttled")]
        await settle_loop()
        return store, log, await writer.settle([snap("build", SUCCEEDED)])

    store, log, final = asyncio.run(scenario())
    assert store.saves == [[("plan", SUCCEEDED), ("generate", RUNNING)]]
    # The failed one is carried by the final write.
    assert statuses(final) == [("generate", SUCCEEDED), ("build", SUCCEEDED)]
    assert [event for event, _ in log.warnings] == ["checkpoint.write_failed"] * 2


def test_a_write_refused_for_a_cancel_stops_the_run_and_its_snapshots_go_last() -> None:
    async def scenario() -> tuple[HeldStore, Calls, list[StageSnapshot]]:
        store = HeldStore()
        calls = Calls()
        writer = calls.writer(store)
        store.cancel = True
        writer.write(snap("plan"))
        await settle_loop()
        writer.write(snap("plan", SUCCEEDED), snap("generate"))  # not sent: cancelled
        await settle_loop()
        return store, calls, await writer.settle([snap("generate", PENDING)])

    store, calls, final = asyncio.run(scenario())
    assert calls.cancel == 1
    assert store.saves == []
    assert statuses(final) == [("plan", SUCCEEDED), ("generate", PENDING)]


def test_a_lost_lease_stops_the_run_and_every_later_write() -> None:
    async def scenario() -> tuple[HeldStore, Calls, CheckpointWriter]:
        store = HeldStore()
        calls = Calls()
        writer = calls.writer(store)
        store.fail_with = [LeaseLostError("save_stages: lease lost")]
        writer.write(snap("plan"))
        await settle_loop()
        writer.write(snap("plan", SUCCEEDED), snap("generate"))
        await settle_loop()
        with pytest.raises(LeaseLostError):
            await writer.settle([snap("generate", SUCCEEDED)])
        return store, calls, writer

    store, calls, _ = asyncio.run(scenario())
    assert calls.lease_lost == 1
    assert store.saves == []


def test_a_lease_lost_while_settling_is_raised_without_stopping_the_run_again() -> None:
    async def scenario() -> Calls:
        store = HeldStore()
        calls = Calls()
        writer = calls.writer(store)
        store.gate.clear()
        store.fail_with = [LeaseLostError("save_stages: lease lost")]
        writer.write(snap("plan"))
        await settle_loop()
        settling = asyncio.create_task(writer.settle())
        await settle_loop()
        store.gate.set()
        with pytest.raises(LeaseLostError):
            await settling
        return calls

    assert asyncio.run(scenario()).lease_lost == 0


def test_a_stop_request_while_settling_neither_cuts_the_write_short_nor_loses_snapshots() -> None:
    async def scenario() -> tuple[HeldStore, list[StageSnapshot], bool]:
        store = HeldStore()
        settling = await settling_behind_a_held_write(store)
        settling.cancel()  # the worker draining, just as the run ended
        await settle_loop()
        store.gate.set()
        final = await settling
        return store, final, settling.cancelled()

    store, final, cancelled = asyncio.run(scenario())
    assert store.saves == [[("plan", RUNNING)]]
    assert statuses(final) == [("plan", SUCCEEDED), ("generate", SUCCEEDED)]
    assert cancelled is False


def test_a_write_from_an_idle_writer_waits_the_linger_for_company() -> None:
    async def scenario() -> tuple[HeldStore, list[list[tuple[str, StageStatus]]]]:
        store = HeldStore()
        writer = CheckpointWriter(
            store, TOKEN, Log(), on_cancel=lambda: None, on_lease_lost=lambda: None, linger=0.05
        )
        writer.write(snap("plan", SUCCEEDED), snap("generate"))
        await settle_loop()
        writer.write(snap("generate", SUCCEEDED), snap("build"))
        during = list(store.saves)
        await asyncio.sleep(0.2)
        return store, during

    store, during = asyncio.run(scenario())
    assert during == []
    assert store.saves == [[("plan", SUCCEEDED), ("generate", SUCCEEDED), ("build", RUNNING)]]


def test_settling_during_the_linger_sends_nothing_and_returns_it_all() -> None:
    async def scenario() -> tuple[HeldStore, list[StageSnapshot]]:
        store = HeldStore()
        writer = CheckpointWriter(
            store, TOKEN, Log(), on_cancel=lambda: None, on_lease_lost=lambda: None, linger=0.05
        )
        writer.write(snap("plan", SUCCEEDED), snap("generate"))
        final = await writer.settle([snap("generate", SUCCEEDED)])
        await asyncio.sleep(0.1)  # the linger would have run out by now
        return store, final

    store, final = asyncio.run(scenario())
    assert store.saves == []
    assert statuses(final) == [("plan", SUCCEEDED), ("generate", SUCCEEDED)]
