"""The one place AWS clients are made: one long-lived client per service per process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from buildq.errors import ConflictError, ResourceMissingError, UnavailableError
from buildq.metrics import AWS_CALL_SECONDS, aws_operation
from buildq.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_sqs import SQSClient


T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """The one retry loop for AWS calls: bounded attempts within a time budget,
    exponential backoff with full jitter, and only for "AWS is unavailable"
    (throttling, 5xx, connection errors), never for a request AWS refused."""

    attempts: int = 3
    budget_seconds: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(attempts=settings.aws_max_attempts, budget_seconds=settings.aws_retry_seconds)

    async def call(self, operation: str, fn: Callable[..., Awaitable[T]], /, **kwargs: Any) -> T:
        retrying = AsyncRetrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.budget_seconds),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        )
        async for attempt in retrying:
            # timed() sees the translated error: it sits outside translate_errors().
            with attempt, timed(operation), translate_errors(operation):
                return await fn(**kwargs)
        raise AssertionError("unreachable")  # pragma: no cover: reraise=True


@contextmanager
def timed(operation: str) -> Iterator[None]:
    """Record one attempt of an AWS call in ``buildq_aws_call_duration_seconds``."""
    started = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except BaseException as exc:
        outcome = _outcome(exc)
        raise
    finally:
        AWS_CALL_SECONDS.labels(operation=aws_operation(operation), outcome=outcome).observe(
            time.perf_counter() - started
        )


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, ConflictError):
        return "conflict"  # a condition that failed: an answer, not a failure
    if isinstance(exc, ResourceMissingError):
        return "missing"
    if isinstance(exc, UnavailableError):
        return "unavailable"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "error"


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, UnavailableError) and not isinstance(exc, ResourceMissingError)


@dataclass(frozen=True)
class AwsClients:
    dynamodb: DynamoDBClient
    sqs: SQSClient
    retry: RetryPolicy


def client_config(settings: Settings) -> AioConfig:
    return AioConfig(
        connect_timeout=settings.aws_connect_timeout,
        read_timeout=settings.aws_read_timeout,
        # No botocore retries: RetryPolicy is the only retry layer, so the time an
        # unavailable AWS costs a caller stays within its budget.
        retries={"mode": "standard", "total_max_attempts": 1},
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
        yield AwsClients(dynamodb=dynamodb, sqs=sqs, retry=RetryPolicy.from_settings(settings))


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
        if code in ("ConditionalCheckFailedException", "TransactionCanceledException"):
            item = cast("dict[str, Any] | None", exc.response.get("Item"))
            raise ConflictError(f"{operation}: condition failed", item) from None
        if code in _UNAVAILABLE_CODES or status >= 500:
            raise UnavailableError(f"{operation}: {code or status}") from exc
        raise
    except ParamValidationError:
        raise
    except BotoCoreError as exc:  # connection refused, timeouts, closed connections
        raise UnavailableError(f"{operation}: {exc}") from exc
