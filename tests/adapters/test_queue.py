"""The SQS adapter against the emulator, over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from buildq.aws import aws_clients
from buildq.messages import BuildReason, build_message, decode
from buildq.models import ErrorInfo
from buildq.queue import (
    DLQ_ATTEMPTS,
    DLQ_ERROR_MESSAGE,
    DLQ_ERROR_TYPE,
    DLQ_WORKER_ID,
    DeadLetter,
    SqsBuildQueue,
)
from buildq.settings import Settings
from tests.harness import Stack

T = TypeVar("T")


def run(fn: Callable[[SqsBuildQueue], Awaitable[T]], stack: Stack) -> T:
    async def main() -> T:
        async with aws_clients(Settings()) as clients:
            return await fn(SqsBuildQueue(clients.sqs, stack.queue_name, stack.dlq_name))

    return asyncio.run(main())


def test_send_receive_extend_and_delete(stack: Stack) -> None:
    message = build_message("t1", "p1", BuildReason.CREATE)

    async def scenario(queue: SqsBuildQueue) -> None:
        await queue.send(message)
        received = await queue.receive(5, wait_seconds=1, visibility_timeout=30)
        assert len(received) == 1
        assert decode(received[0].body) == message
        assert received[0].receive_count == 1
        assert await queue.change_visibility_batch([received[0].receipt_handle], 60) == []
        # Invisible while held: a second receive gets nothing.
        assert await queue.receive(5, wait_seconds=0, visibility_timeout=30) == []
        await queue.change_visibility(received[0].receipt_handle, 0)
        again = await queue.receive(5, wait_seconds=1, visibility_timeout=30)
        assert [m.receive_count for m in again] == [2]
        await queue.delete(again[0].receipt_handle)

    run(scenario, stack)
    assert stack.queue_depth() == {"visible": 0, "in_flight": 0, "delayed": 0}


def test_delete_batch_deletes_past_ten_and_names_the_handles_it_could_not(stack: Stack) -> None:
    async def scenario(queue: SqsBuildQueue) -> list[str]:
        for i in range(12):
            await queue.send(build_message("t1", f"p{i}", BuildReason.CREATE))
        handles: list[str] = []
        while len(handles) < 12:
            got = await queue.receive(10, wait_seconds=1, visibility_timeout=30)
            handles += [m.receipt_handle for m in got]
        return await queue.delete_batch([*handles, "not-a-receipt-handle"])

    assert run(scenario, stack) == ["not-a-receipt-handle"]
    assert stack.queue_depth() == {"visible": 0, "in_flight": 0, "delayed": 0}


def test_receive_never_asks_for_more_than_it_was_told(stack: Stack) -> None:
    async def scenario(queue: SqsBuildQueue) -> list[int]:
        for i in range(6):
            await queue.send(build_message("t1", f"p{i}", BuildReason.CREATE))
        sizes = []
        for _ in range(3):
            sizes.append(len(await queue.receive(2, wait_seconds=1, visibility_timeout=30)))
        return sizes

    assert run(scenario, stack) == [2, 2, 2]


def test_dead_letter_carries_the_reason(stack: Stack) -> None:
    async def scenario(queue: SqsBuildQueue) -> None:
        await queue.dead_letter(
            '{"not": "ours"}',
            DeadLetter(ErrorInfo(type="PoisonMessage", message="bad"), attempts=3, worker_id="w9"),
        )

    run(scenario, stack)
    sqs = stack.client("sqs")
    got = sqs.receive_message(
        QueueUrl=stack.queue_url(dlq=True), MessageAttributeNames=["All"], WaitTimeSeconds=1
    )["Messages"]
    assert len(got) == 1
    attributes = {k: v["StringValue"] for k, v in got[0]["MessageAttributes"].items()}
    assert attributes[DLQ_ERROR_TYPE] == "PoisonMessage"
    assert attributes[DLQ_ERROR_MESSAGE] == "bad"
    assert attributes[DLQ_ATTEMPTS] == "3"
    assert attributes[DLQ_WORKER_ID] == "w9"
    assert got[0]["Body"] == '{"not": "ours"}'
