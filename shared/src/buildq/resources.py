"""The AWS resources buildq needs, defined once, and an idempotent bootstrap.

Terraform (infra/terraform) declares the same key schema, index and queue
attributes for production; a test compares the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from buildq.aws import AwsClients, translate_errors
from buildq.items import SWEEP_INDEX, TTL_ATTRIBUTE
from buildq.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient

RETENTION_SECONDS = 14 * 24 * 3600  # the SQS maximum: on-call has two weeks to replay
QUEUE_VISIBILITY_TIMEOUT = 60  # workers set their own at receive; this is the fallback


def redrive_max_receive_count(max_attempts: int) -> int:
    """The queue's own redrive backstop: a little above the worker's attempt budget,
    so it only fires for a message that crashes the worker itself."""
    return max_attempts + 2


def table_definition(table_name: str) -> dict[str, Any]:
    return {
        "TableName": table_name,
        "BillingMode": "PAY_PER_REQUEST",
        "KeySchema": [
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        "AttributeDefinitions": [
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
            {"AttributeName": "sweep_shard", "AttributeType": "S"},
            {"AttributeName": "sweep_at", "AttributeType": "N"},
        ],
        "GlobalSecondaryIndexes": [
            {
                # Sparse: only QUEUED and BUILDING projects (and FAILED ones until the
                # DLQ holds their failure) carry sweep_shard, each status in its own shards.
                "IndexName": SWEEP_INDEX,
                "KeySchema": [
                    {"AttributeName": "sweep_shard", "KeyType": "HASH"},
                    {"AttributeName": "sweep_at", "KeyType": "RANGE"},
                ],
                "Projection": {
                    "ProjectionType": "INCLUDE",
                    "NonKeyAttributes": [
                        "tenant_id",
                        "project_id",
                        "status",
                        "attempt",
                        "lease_expires_at",
                    ],
                },
            }
        ],
    }


def dlq_attributes() -> dict[str, str]:
    return {"MessageRetentionPeriod": str(RETENTION_SECONDS)}


def queue_attributes(dlq_arn: str, max_attempts: int) -> dict[str, str]:
    return {
        "VisibilityTimeout": str(QUEUE_VISIBILITY_TIMEOUT),
        "MessageRetentionPeriod": str(RETENTION_SECONDS),
        "ReceiveMessageWaitTimeSeconds": "20",
        "RedrivePolicy": json.dumps(
            {
                "deadLetterTargetArn": dlq_arn,
                "maxReceiveCount": redrive_max_receive_count(max_attempts),
            }
        ),
    }


@dataclass(frozen=True)
class BootstrapResult:
    table_name: str
    table_created: bool
    queue_url: str
    dlq_url: str


async def _ensure_queue(sqs: SQSClient, name: str, attributes: dict[str, str]) -> str:
    """Create the queue, or bring an existing one's attributes to ``attributes``."""
    try:
        with translate_errors("CreateQueue"):
            response = await sqs.create_queue(QueueName=name, Attributes=attributes)  # type: ignore[arg-type]
        return response["QueueUrl"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in (
            "QueueAlreadyExists",
            "QueueNameExists",
        ):
            raise
    with translate_errors("SetQueueAttributes"):
        url = (await sqs.get_queue_url(QueueName=name))["QueueUrl"]
        await sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)  # type: ignore[arg-type]
    return url


async def bootstrap(clients: AwsClients, settings: Settings) -> BootstrapResult:
    """Create the table, the DLQ and the build queue; a second run reuses them."""
    dynamodb, sqs = clients.dynamodb, clients.sqs
    created = True
    try:
        with translate_errors("CreateTable"):
            await dynamodb.create_table(**table_definition(settings.table_name))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ResourceInUseException":
            raise
        created = False
    with translate_errors("DescribeTable"):
        waiter = dynamodb.get_waiter("table_exists")
        await waiter.wait(TableName=settings.table_name, WaiterConfig={"Delay": 1})
        ttl = await dynamodb.describe_time_to_live(TableName=settings.table_name)
        if ttl["TimeToLiveDescription"].get("TimeToLiveStatus") not in ("ENABLED", "ENABLING"):
            await dynamodb.update_time_to_live(
                TableName=settings.table_name,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
            )

    dlq_url = await _ensure_queue(sqs, settings.dlq_name, dlq_attributes())
    with translate_errors("GetQueueAttributes"):
        dlq_arn = (await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"]))[
            "Attributes"
        ]["QueueArn"]
    queue_url = await _ensure_queue(
        sqs, settings.queue_name, queue_attributes(dlq_arn, settings.max_attempts)
    )
    return BootstrapResult(
        table_name=settings.table_name,
        table_created=created,
        queue_url=queue_url,
        dlq_url=dlq_url,
    )
