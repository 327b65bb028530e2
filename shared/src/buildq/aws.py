"""The one place AWS clients are made: one long-lived client per service per process."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
    nullcontext,
    suppress,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
from botocore.loaders import JSONFileLoader, create_loader
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from buildq.clock import CLOCK
from buildq.errors import BuildqError, ConflictError, ResourceMissingError, UnavailableError
from buildq.limits import too_large_error
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
    (throttling, 5xx, connection errors), never for a request AWS refused.

    With ``max_in_flight`` (from_settings: the clients' connection pool size), at most
    that many calls per client are under way at once, the rest wait their turn here,
    first come first served. The pool would make them wait anyway, but only after
    botocore has built, signed and handed each one to aiohttp: under a burst (the API
    at 256 concurrent creates) those waiting requests held about 3 MiB.

    The budget is also a hard deadline: each attempt (its wait for a slot included)
    gets what is left of it, and one that has not answered by then is cut and counts
    as unavailable. So an endpoint that accepts and never answers costs a caller its
    budget, not botocore's read timeout (the API's 5 s), exactly like one that refuses
    connections. A long poll is given its wait on top (``allowance``: by default a
    call's ``WaitTimeSeconds``, and SQS's 20 s for a ReceiveMessage without one), so a
    worker's 20 s ReceiveMessage is never cut by its 10 s budget."""

    attempts: int = 3
    budget_seconds: float = 10.0
    max_in_flight: int | None = None
    _slots: dict[object, asyncio.Semaphore] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            attempts=settings.aws_max_attempts,
            budget_seconds=settings.aws_retry_seconds,
            max_in_flight=settings.aws_max_pool_connections,
        )

    async def call(
        self,
        operation: str,
        fn: Callable[..., Awaitable[T]],
        /,
        *,
        allowance: float | None = None,
        **kwargs: Any,
    ) -> T:
        """``fn(**kwargs)``, retried while AWS is unavailable, within the budget (plus
        ``allowance`` for a long poll; see the class)."""
        started = time.monotonic()
        if allowance is None:
            allowance = _long_poll_seconds(operation, kwargs)
        deadline = asyncio.get_running_loop().time() + self.budget_seconds + allowance
        try:
            return await self._attempt(operation, fn, kwargs, deadline)
        except UnavailableError as exc:
            if not _transient(exc) or self.attempts <= 1:
                raise
            failed: UnavailableError | None = exc
        # Only a failed first try builds a retrying object: one per call is a web of
        # reference cycles that, under load, piles up in the oldest GC generation.
        # tenacity counts that first try as its attempt 1 (re-raised, not re-run).
        # stop_before_delay: no backoff sleeps past the budget, only to be cut.
        retrying = AsyncRetrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_attempt(self.attempts)
            | stop_before_delay(max(0.0, self.budget_seconds - (time.monotonic() - started))),
            wait=wait_random_exponential(multiplier=0.05, max=1.0),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if failed is not None:
                    error, failed = failed, None
                    raise error
                return await self._attempt(operation, fn, kwargs, deadline)
        raise AssertionError("unreachable")  # pragma: no cover: reraise=True

    async def _attempt(
        self,
        operation: str,
        fn: Callable[..., Awaitable[T]],
        kwargs: dict[str, Any],
        deadline: float,
    ) -> T:
        # timed() sees the translated error: it sits outside translate_errors(). It
        # includes the wait for a slot, as it included the wait for a pooled connection;
        # so does the deadline.
        with timed(operation):
            try:
                async with asyncio.timeout_at(deadline):
                    with translate_errors(operation):
                        async with self._slot(fn):
                            return await fn(**kwargs)
            except TimeoutError as exc:  # the deadline's, or botocore's own timeout
                raise UnavailableError(f"{operation}: no answer within the time budget") from exc

    def _slot(self, fn: Callable[..., Awaitable[Any]]) -> AbstractAsyncContextManager[Any]:
        if self.max_in_flight is None:
            return nullcontext()
        client = getattr(fn, "__self__", None)  # fn: a method of an aiobotocore client
        slots = self._slots.get(client)
        if slots is None:
            slots = self._slots[client] = asyncio.Semaphore(self.max_in_flight)
        return slots


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


# SQS's longest long poll: a ReceiveMessage that names no wait may get the queue's.
MAX_LONG_POLL_SECONDS = 20.0


def _long_poll_seconds(operation: str, kwargs: dict[str, Any]) -> float:
    """How long a call may wait by design, on top of the budget: a long poll's wait."""
    wait = kwargs.get("WaitTimeSeconds")
    if isinstance(wait, int | float):
        return max(0.0, float(wait))
    if aws_operation(operation.rpartition(".")[2]) == "ReceiveMessage":  # "SQS.ReceiveMessage"
        return MAX_LONG_POLL_SECONDS
    return 0.0


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


# The services whose entries botocore's endpoint resolver keeps (see aws_session), by
# endpoint prefix (what the resolver is asked for): the two buildq calls, and those
# botocore's credential and token providers make clients for (assume-role and web
# identity: sts; SSO: sso as portal.sso, sso-oidc as oidc; console login: signin).
ENDPOINT_PREFIXES = frozenset({"dynamodb", "sqs", "sts", "portal.sso", "oidc", "signin"})


class _LeanEndpointsFileLoader(JSONFileLoader):
    """botocore's JSON data file loader, except for ``endpoints.json``.

    That file describes every service in every partition (1.2 MB of JSON, about
    7 MiB once parsed into the OrderedDicts botocore uses), and the session keeps it
    for its whole life, though a client consults it only while it is created. Here
    each partition's ``services`` is cut down to ENDPOINT_PREFIXES as soon as it is
    parsed (into plain dicts), so the whole file never exists as objects at once;
    every partition's own data (regions, defaults, DNS suffix) stays, so endpoints
    resolve exactly as before for those services.
    """

    def load_file(self, file_path: str) -> Any:
        if os.path.basename(file_path) != "endpoints":
            return super().load_file(file_path)
        for extension, opener in ((".json", open), (".json.gz", gzip.open)):
            if os.path.isfile(file_path + extension):
                with opener(file_path + extension, "rb") as handle:
                    data = json.loads(handle.read(), object_pairs_hook=_services_cut_early)
                for partition in data.get("partitions", ()):
                    partition["services"] = _our_services(partition.get("services", {}).items())
                return data
        return None


def _our_services(services: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    return {name: entry for name, entry in services if name in ENDPOINT_PREFIXES}


def _services_cut_early(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The JSON decoder's hook for every object of endpoints.json, innermost first: a
    partition's ``services`` (the one kind of object keyed by ``dynamodb``) is cut down
    before the next partition is parsed."""
    if any(name == "dynamodb" for name, _ in pairs):
        return _our_services(pairs)
    return dict(pairs)


def aws_session() -> AioSession:
    """An aiobotocore session whose data loader keeps only the endpoint data buildq
    can use (``AWS_DATA_PATH`` is honoured as botocore's own loader does)."""
    session = get_session()
    loader = create_loader(session.get_config_variable("data_path"))
    loader.file_loader = _LeanEndpointsFileLoader()
    session.register_component("data_loader", loader)
    return session


_SENT_AT = "buildq_sent_at"  # in botocore's context of one call: when its request left


def track_server_clock(client: Any) -> None:
    """Feed the ``Date`` header of every response ``client`` gets (error responses
    included) to ``buildq.clock.CLOCK``, which keeps the process on AWS's clock. The
    local times at ``before-call`` (before signing and sending) and ``after-call``
    (after parsing) bracket the moment the server wrote the header."""
    client.meta.events.register("before-call", _note_sent, unique_id="buildq-clock-sent")
    client.meta.events.register("after-call", _note_date, unique_id="buildq-clock-date")


def _note_sent(context: dict[str, Any], **_: Any) -> None:
    context[_SENT_AT] = CLOCK.local()


def _note_date(http_response: Any, parsed: Any, context: dict[str, Any], **_: Any) -> None:
    received = CLOCK.local()
    sent = context.get(_SENT_AT)
    metadata = parsed.get("ResponseMetadata") if isinstance(parsed, dict) else None
    headers = metadata.get("HTTPHeaders") if isinstance(metadata, dict) else None
    date = headers.get("date") if isinstance(headers, dict) else None
    raw = getattr(http_response, "headers", None)
    if date is None and raw is not None:  # the response's own headers, case-insensitive
        date = raw.get("Date")
    if isinstance(sent, float):
        with suppress(Exception):  # the clock (its log line, say) never fails a call
            CLOCK.observe(date, sent=sent, received=received)


@asynccontextmanager
async def aws_clients(settings: Settings) -> AsyncIterator[AwsClients]:
    """Open the DynamoDB and SQS clients; the endpoint comes from AWS_ENDPOINT_URL."""
    session = aws_session()
    config = client_config(settings)
    async with AsyncExitStack() as stack:
        dynamodb = await stack.enter_async_context(
            session.create_client("dynamodb", region_name=settings.aws_region, config=config)
        )
        sqs = await stack.enter_async_context(
            session.create_client("sqs", region_name=settings.aws_region, config=config)
        )
        track_server_clock(dynamodb)
        track_server_clock(sqs)
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
        # Another transaction holds the item, or this one's token is still under way.
        "TransactionConflictException",
        "TransactionInProgressException",
    }
)


# Why a transaction was cancelled (one reason per item, "None" for the items that were
# fine): these pass if the same transaction is tried again.
_TRANSIENT_CANCELLATIONS = frozenset(
    {
        "ThrottlingError",
        "ProvisionedThroughputExceeded",
        "TransactionConflict",
        "RequestLimitExceeded",
        "InternalServerError",
    }
)
_CONDITION_FAILED = "ConditionalCheckFailed"
_REASONS_IN_MESSAGE = re.compile(r"\[([A-Za-z, ]*)\]\s*$")


def _cancellation_reasons(exc: ClientError) -> list[dict[str, Any]]:
    """A TransactionCanceledException's reasons, one per item. botocore puts them in the
    response; an endpoint that sends none still names them at the end of its message
    ("... specific reasons [ConditionalCheckFailed, None]")."""
    reasons: Any = exc.response.get("CancellationReasons")
    if isinstance(reasons, list):
        return [reason for reason in reasons if isinstance(reason, dict)]
    message = str(exc.response.get("Error", {}).get("Message", ""))
    match = _REASONS_IN_MESSAGE.search(message)
    if match is None:
        return []
    return [{"Code": code.strip()} for code in match.group(1).split(",") if code.strip()]


def _cancelled_transaction(operation: str, exc: ClientError) -> BuildqError | None:
    """What a cancelled transaction means: a condition failed (``ConflictError``, with
    the refused item when it came back), or it was in the way of something passing
    (throttled, another transaction on an item: ``UnavailableError``, retried); None for
    a transaction that can never pass (a validation error: a bug)."""
    reasons = _cancellation_reasons(exc)
    codes = [str(reason.get("Code", "None")) for reason in reasons]
    if _CONDITION_FAILED in codes or not reasons:
        refused = next(
            (r.get("Item") for r in reasons if r.get("Code") == _CONDITION_FAILED and "Item" in r),
            exc.response.get("Item"),
        )
        return ConflictError(f"{operation}: condition failed", cast("Any", refused))
    if any(code in _TRANSIENT_CANCELLATIONS for code in codes):
        return UnavailableError(f"{operation}: transaction cancelled ({', '.join(codes)})")
    return None


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
        if code == "TransactionCanceledException":
            meaning = _cancelled_transaction(operation, exc)
            if isinstance(meaning, ConflictError):
                raise meaning from None
            if meaning is not None:
                raise meaning from exc
            raise
        if code in _UNAVAILABLE_CODES or status >= 500:
            raise UnavailableError(f"{operation}: {code or status}") from exc
        message = str(exc.response.get("Error", {}).get("Message", ""))
        too_large = too_large_error(operation, code, message)
        if too_large is not None:  # never retried: the same write is refused again
            raise too_large from exc
        raise
    except ParamValidationError:
        raise
    except BotoCoreError as exc:  # connection refused, timeouts, closed connections
        raise UnavailableError(f"{operation}: {exc}") from exc
