"""The build queue and its dead-letter queue: every SQS call buildq makes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from buildq.aws import RetryPolicy
from buildq.clock import now_iso
from buildq.messages import BuildMessage
from buildq.models import ErrorInfo
from buildq.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import MessageAttributeValueTypeDef

SQS_BATCH = 10  # SQS's own limit for ReceiveMessage and every *Batch call

# Message attributes a dead-lettered message carries: why it failed.
DLQ_ERROR_TYPE = "buildq-error-type"
DLQ_ERROR_MESSAGE = "buildq-error-message"
DLQ_ATTEMPTS = "buildq-attempts"
DLQ_WORKER_ID = "buildq-worker-id"
DLQ_FAILED_AT = "buildq-failed-at"
# The project's attempt that failed: copies of one failure (a send retried after its
# answer was lost, say) carry the same value.
DLQ_PROJECT_ATTEMPT = "buildq-project-attempt"


@dataclass(frozen=True)
class ReceivedMessage:
    message_id: str
    receipt_handle: str
    body: str
    receive_count: int
    sent_at_ms: int
    attributes: dict[str, str]


@dataclass(frozen=True)
class DeadLetter:
    """Why a message is being dead-lettered."""

    error: ErrorInfo
    attempts: int
    worker_id: str
    project_attempt: int | None = None  # None: no project (a poison message)


@dataclass(frozen=True)
class QueueDepth:
    """Approximate message counts (SQS's own): the build queue's visible, in-flight
    (received, not yet deleted) and delayed messages, and the DLQ's visible ones."""

    visible: int
    in_flight: int
    delayed: int
    dlq_visible: int


class BuildQueue(Protocol):
    async def send(self, message: BuildMessage, *, delay_seconds: int = 0) -> str: ...
    async def receive(
        self, max_messages: int, *, wait_seconds: int, visibility_timeout: int, dlq: bool = False
    ) -> list[ReceivedMessage]: ...
    async def delete(self, receipt_handle: str, *, dlq: bool = False) -> None: ...
    async def change_visibility(self, receipt_handle: str, seconds: int) -> None: ...
    async def change_visibility_batch(
        self, receipt_handles: Sequence[str], seconds: int, *, dlq: bool = False
    ) -> list[str]: ...
    async def delete_batch(
        self, receipt_handles: Sequence[str], *, dlq: bool = False
    ) -> list[str]: ...
    async def dead_letter(self, body: str, reason: DeadLetter) -> str: ...
    async def depth(self) -> QueueDepth: ...
    async def ping(self) -> None: ...


class SqsBuildQueue:
    """``BuildQueue`` on SQS (async, aiobotocore). Queue URLs are looked up once."""

    def __init__(
        self,
        client: SQSClient,
        queue_name: str,
        dlq_name: str,
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._client = client
        self._retry = retry or RetryPolicy()
        self._names = (queue_name, dlq_name)
        self._urls: tuple[str, str] | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, client: SQSClient, settings: Settings) -> SqsBuildQueue:
        return cls(
            client,
            settings.queue_name,
            settings.dlq_name,
            retry=RetryPolicy.from_settings(settings),
        )

    async def urls(self) -> tuple[str, str]:
        """(build queue URL, dead-letter queue URL)."""
        if self._urls is None:
            async with self._lock:
                if self._urls is None:
                    main = await self._retry.call(
                        "GetQueueUrl", self._client.get_queue_url, QueueName=self._names[0]
                    )
                    dlq = await self._retry.call(
                        "GetQueueUrl", self._client.get_queue_url, QueueName=self._names[1]
                    )
                    self._urls = (main["QueueUrl"], dlq["QueueUrl"])
        return self._urls

    async def _url(self, dlq: bool) -> str:
        main, dead = await self.urls()
        return dead if dlq else main

    async def send(self, message: BuildMessage, *, delay_seconds: int = 0) -> str:
        url, _ = await self.urls()
        response = await self._retry.call(
            "SendMessage",
            self._client.send_message,
            QueueUrl=url,
            MessageBody=message.encode(),
            DelaySeconds=delay_seconds,
        )
        return response["MessageId"]

    async def receive(
        self, max_messages: int, *, wait_seconds: int, visibility_timeout: int, dlq: bool = False
    ) -> list[ReceivedMessage]:
        """Receive from the build queue (or, for operators, the dead-letter queue)."""
        url = await self._url(dlq)
        response = await self._retry.call(
            "ReceiveMessage",
            self._client.receive_message,
            QueueUrl=url,
            MaxNumberOfMessages=max(1, min(max_messages, SQS_BATCH)),
            WaitTimeSeconds=wait_seconds,
            VisibilityTimeout=visibility_timeout,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
            MessageAttributeNames=["All"],
        )
        return [
            ReceivedMessage(
                message_id=raw["MessageId"],
                receipt_handle=raw["ReceiptHandle"],
                body=raw["Body"],
                receive_count=int(raw.get("Attributes", {}).get("ApproximateReceiveCount", 1)),
                sent_at_ms=int(raw.get("Attributes", {}).get("SentTimestamp", 0)),
                attributes={
                    name: value.get("StringValue", "")
                    for name, value in raw.get("MessageAttributes", {}).items()
                },
            )
            for raw in response.get("Messages", [])
        ]

    async def delete(self, receipt_handle: str, *, dlq: bool = False) -> None:
        url = await self._url(dlq)
        await self._retry.call(
            "DeleteMessage", self._client.delete_message, QueueUrl=url, ReceiptHandle=receipt_handle
        )

    async def change_visibility(self, receipt_handle: str, seconds: int) -> None:
        url, _ = await self.urls()
        await self._retry.call(
            "ChangeMessageVisibility",
            self._client.change_message_visibility,
            QueueUrl=url,
            ReceiptHandle=receipt_handle,
            VisibilityTimeout=seconds,
        )

    async def change_visibility_batch(
        self, receipt_handles: Sequence[str], seconds: int, *, dlq: bool = False
    ) -> list[str]:
        """Change many visibilities in batches of ten; returns the handles that failed."""
        return await self._in_batches(
            "ChangeMessageVisibilityBatch",
            self._client.change_message_visibility_batch,
            receipt_handles,
            dlq=dlq,
            VisibilityTimeout=seconds,
        )

    async def delete_batch(self, receipt_handles: Sequence[str], *, dlq: bool = False) -> list[str]:
        """Delete many messages in batches of ten; returns the handles that failed."""
        return await self._in_batches(
            "DeleteMessageBatch", self._client.delete_message_batch, receipt_handles, dlq=dlq
        )

    async def _in_batches(
        self,
        what: str,
        call: Callable[..., Awaitable[Any]],
        receipt_handles: Sequence[str],
        *,
        dlq: bool,
        **per_entry: Any,
    ) -> list[str]:
        url = await self._url(dlq)
        failed: list[str] = []
        for start in range(0, len(receipt_handles), SQS_BATCH):
            chunk = receipt_handles[start : start + SQS_BATCH]
            response = await self._retry.call(
                what,
                call,
                QueueUrl=url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": handle, **per_entry}
                    for i, handle in enumerate(chunk)
                ],
            )
            failed += [chunk[int(entry["Id"])] for entry in response.get("Failed", [])]
        return failed

    async def dead_letter(self, body: str, reason: DeadLetter) -> str:
        """Put ``body`` on the DLQ with attributes saying why it failed."""
        _, dlq = await self.urls()
        attributes: dict[str, MessageAttributeValueTypeDef] = {
            DLQ_ERROR_TYPE: {"DataType": "String", "StringValue": reason.error.type},
            DLQ_ERROR_MESSAGE: {
                "DataType": "String",
                "StringValue": reason.error.message[:1024] or "-",
            },
            DLQ_ATTEMPTS: {"DataType": "Number", "StringValue": str(reason.attempts)},
            DLQ_WORKER_ID: {"DataType": "String", "StringValue": reason.worker_id},
            DLQ_FAILED_AT: {"DataType": "String", "StringValue": now_iso()},
        }
        if reason.project_attempt is not None:
            attributes[DLQ_PROJECT_ATTEMPT] = {
                "DataType": "Number",
                "StringValue": str(reason.project_attempt),
            }
        response = await self._retry.call(
            "SendMessage(dlq)",
            self._client.send_message,
            QueueUrl=dlq,
            MessageBody=body,
            MessageAttributes=attributes,
        )
        return response["MessageId"]

    async def depth(self) -> QueueDepth:
        """How many messages wait (GetQueueAttributes on the build queue and the DLQ)."""
        url, dlq = await self.urls()
        main, dead = await asyncio.gather(
            self._retry.call(
                "GetQueueAttributes",
                self._client.get_queue_attributes,
                QueueUrl=url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                    "ApproximateNumberOfMessagesDelayed",
                ],
            ),
            self._retry.call(
                "GetQueueAttributes",
                self._client.get_queue_attributes,
                QueueUrl=dlq,
                AttributeNames=["ApproximateNumberOfMessages"],
            ),
        )
        counts, dead_counts = main.get("Attributes", {}), dead.get("Attributes", {})
        return QueueDepth(
            visible=int(counts.get("ApproximateNumberOfMessages", 0)),
            in_flight=int(counts.get("ApproximateNumberOfMessagesNotVisible", 0)),
            delayed=int(counts.get("ApproximateNumberOfMessagesDelayed", 0)),
            dlq_visible=int(dead_counts.get("ApproximateNumberOfMessages", 0)),
        )

    async def ping(self) -> None:
        url, _ = await self.urls()
        await self._retry.call(
            "GetQueueAttributes",
            self._client.get_queue_attributes,
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages"],
        )
