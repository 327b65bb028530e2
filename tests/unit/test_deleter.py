"""The worker's background deleter against an in-memory queue: batches of ten, a
flush that waits for them, and a failure that never stops it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from buildq.errors import UnavailableError
from buildq_worker import deleter
from buildq_worker.deleter import Deleter


class FakeQueue:
    """Records each DeleteMessageBatch; raises the queued ``errors`` first."""

    def __init__(self, errors: Sequence[Exception] = ()) -> None:
        self.batches: list[list[str]] = []
        self.errors = list(errors)

    async def delete_batch(self, receipt_handles: Sequence[str], *, dlq: bool = False) -> list[str]:
        if self.errors:
            raise self.errors.pop(0)
        self.batches.append(list(receipt_handles))
        return []


def run(queue: FakeQueue, handles: list[str]) -> None:
    async def main() -> None:
        batcher = Deleter(queue, linger=0.01)
        task = asyncio.create_task(batcher.run())
        for handle in handles:
            batcher.delete(handle)
        await batcher.flush()
        task.cancel()

    asyncio.run(main())


def test_deletes_go_ten_per_call_and_flush_waits_for_all() -> None:
    queue = FakeQueue()
    handles = [f"h{i}" for i in range(25)]
    run(queue, handles)
    assert [len(batch) for batch in queue.batches] == [10, 10, 5]
    assert [h for batch in queue.batches for h in batch] == handles


@pytest.mark.parametrize(
    "error", [UnavailableError("throttled"), RuntimeError("a bug")], ids=["outage", "bug"]
)
def test_a_failed_call_is_tried_again_and_the_deleter_carries_on(
    error: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deleter, "RETRY_SECONDS", 0.01)
    queue = FakeQueue([error])
    run(queue, ["a", "b"])
    assert queue.batches == [["a", "b"]]
