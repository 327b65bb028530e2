"""The one place AWS clients are made: one long-lived client per service per process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from buildq.errors import ConflictError, ResourceMissingError, UnavailableError
from buildq.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_sqs import SQSClient


@dataclass(frozen=True)
class AwsClients:
    dynamodb: DynamoDBClient
    sqs: SQSClient


def client_config(settings: Settings) -> AioConfig:
    return AioConfig(
        connect_timeout=settings.aws_connect_timeout,
        read_timeout=settings.aws_read_timeout,
        retries={"mode": "standard", "max_attempts": settings.aws_max_attempts},
        max_pool_connections=settings.aws_max_pool_connections,
    )


@asynccontextmanager
async def aws_clients(settings: Settings) -> AsyncIterator[AwsClients]:
    """Open the DynamoDB and SQS clients; the endpoint comes from AWS_ENDPOINT_URL."""
    session = get_session()
    config = client_config(settings)
    async with AsyncExitStack() as stack:
        dynamodb = await stack.enter_async_context(
            session.create_client("dynamodb", region_name=settings.aws_region, config=config)
        )
        sqs = await stack.enter_async_context(
            session.create_client("sqs", region_name=settings.aws_region, config=config)
        )
        yield AwsClients(dynamodb=dynamodb, sqs=sqs)


# Error codes that mean "AWS is overloaded or failing", not "your request is wrong".
_UNAVAILABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "InternalServerError",
        "InternalFailure",
        "ServiceUnavailable",
        "RequestThrottled",
        "AWS.SimpleQueueService.RequestThrottled",
    }
)


# Error codes that mean "the table or queue does not exist (yet)".
_MISSING_CODES = frozenset(
    {
        "ResourceNotFoundException",
        "AWS.SimpleQueueService.NonExistentQueue",
        "QueueDoesNotExist",
    }
)


@contextmanager
def translate_errors(operation: str) -> Iterator[None]:
    """Turn botocore errors into buildq's own, so nothing above the adapters sees botocore."""
    try:
        yield
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _MISSING_CODES:
            raise ResourceMissingError(f"{operation}: {code}") from exc
        if code == "ConditionalCheckFailedException":
            item = cast("dict[str, Any] | None", exc.response.get("Item"))
            raise ConflictError(f"{operation}: condition failed", item) from None
        if code in _UNAVAILABLE_CODES or status >= 500:
            raise UnavailableError(f"{operation}: {code or status}") from exc
        raise
    except ParamValidationError:
        raise
    except BotoCoreError as exc:  # connection refused, timeouts, closed connections
        raise UnavailableError(f"{operation}: {exc}") from exc
