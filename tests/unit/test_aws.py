"""The AWS plumbing that costs memory when it goes wrong: the retry loop (every AWS
call of every request runs in it), the endpoint data botocore keeps, the malloc cap."""

from __future__ import annotations

import asyncio
import gc
import platform
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from botocore.loaders import create_loader
from botocore.regions import EndpointResolver

from buildq.aws import ENDPOINT_PREFIXES, RetryPolicy, aws_session, translate_errors
from buildq.errors import ConflictError, ResourceMissingError, UnavailableError
from buildq.memory import limit_malloc_arenas
from buildq.settings import Settings


def failing(
    errors: list[Callable[[], BaseException]], result: str = "ok"
) -> tuple[Callable[[], Awaitable[str]], list[BaseException | None]]:
    """An AWS call that raises a new error from ``errors`` on each call, then answers
    ``result``; and what each call raised (None: it answered)."""
    raised: list[BaseException | None] = []

    async def call() -> str:
        if len(raised) < len(errors):
            error = errors[len(raised)]()
            raised.append(error)
            raise error
        raised.append(None)
        return result

    return call, raised


def run(policy: RetryPolicy, fn: Callable[..., Awaitable[Any]], **kwargs: Any) -> Any:
    return asyncio.run(policy.call("DynamoDB.GetItem", fn, **kwargs))


def test_an_answer_is_returned_after_one_call() -> None:
    async def get_item(**kwargs: Any) -> dict[str, Any]:
        return {"Item": kwargs}

    assert run(RetryPolicy(), get_item, Key={"pk": 1}) == {"Item": {"Key": {"pk": 1}}}


def test_unavailable_is_retried_until_it_answers() -> None:
    call, calls = failing([lambda: UnavailableError("throttled"), lambda: UnavailableError("503")])
    assert run(RetryPolicy(attempts=3), call) == "ok"
    assert len(calls) == 3


def test_unavailable_gives_up_after_the_attempts_with_the_last_error() -> None:
    call, calls = failing([lambda: UnavailableError("throttled")] * 3)
    with pytest.raises(UnavailableError) as caught:
        run(RetryPolicy(attempts=3), call)
    assert len(calls) == 3
    assert caught.value is calls[-1]


def test_unavailable_gives_up_when_the_time_budget_is_spent() -> None:
    call, calls = failing([lambda: UnavailableError("slow")] * 5)
    with pytest.raises(UnavailableError):
        run(RetryPolicy(attempts=5, budget_seconds=0.0), call)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "error",
    [ResourceMissingError("no table"), ConflictError("condition failed"), ValueError("bug")],
    ids=["missing", "conflict", "other"],
)
def test_answers_and_bugs_are_never_retried(error: Exception) -> None:
    call, calls = failing([lambda: error])
    with pytest.raises(type(error)):
        run(RetryPolicy(attempts=3), call)
    assert len(calls) == 1


def test_cancellation_is_not_retried() -> None:
    calls: list[int] = []

    async def hangs() -> None:
        calls.append(1)
        await asyncio.sleep(60)

    async def main() -> None:
        task = asyncio.create_task(RetryPolicy(attempts=3).call("SQS.ReceiveMessage", hangs))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(calls) == 1


# -- the budget is a hard deadline ---------------------------------------------------


def timed_run(
    policy: RetryPolicy, operation: str, fn: Callable[..., Awaitable[Any]], **kw: Any
) -> tuple[Any, float]:
    """What a call answered (or the UnavailableError it raised), and how long it took."""
    started = time.monotonic()
    try:
        return asyncio.run(policy.call(operation, fn, **kw)), time.monotonic() - started
    except UnavailableError as exc:
        return exc, time.monotonic() - started


def test_a_call_that_never_answers_is_cut_at_the_budget() -> None:
    calls: list[int] = []

    async def hangs() -> None:
        calls.append(1)
        await asyncio.sleep(60)

    outcome, took = timed_run(RetryPolicy(attempts=3, budget_seconds=0.3), "PutItem", hangs)
    assert isinstance(outcome, UnavailableError)
    assert 0.25 <= took < 1.0, took
    assert len(calls) == 1  # the first attempt had the whole budget: nothing left to retry


def test_a_retry_gets_what_is_left_of_the_budget() -> None:
    calls: list[float] = []
    started = time.monotonic()

    async def slow_error_then_hang() -> None:
        calls.append(time.monotonic() - started)
        if len(calls) == 1:
            await asyncio.sleep(0.2)
            raise UnavailableError("503")
        await asyncio.sleep(60)

    outcome, took = timed_run(
        RetryPolicy(attempts=3, budget_seconds=0.5), "PutItem", slow_error_then_hang
    )
    assert isinstance(outcome, UnavailableError)
    assert len(calls) == 2
    assert 0.45 <= took < 1.0, took


def test_a_long_poll_gets_its_wait_on_top_of_the_budget() -> None:
    async def long_poll(**kwargs: Any) -> str:
        await asyncio.sleep(0.6)
        return "messages"

    policy = RetryPolicy(attempts=1, budget_seconds=0.2)
    outcome, _ = timed_run(policy, "ReceiveMessage", long_poll, WaitTimeSeconds=1)
    assert outcome == "messages"
    # A ReceiveMessage that names no wait may get the queue's own (up to 20 s).
    outcome, _ = timed_run(policy, "SQS.ReceiveMessage", long_poll)
    assert outcome == "messages"
    # A short poll has no allowance: its wait is part of the budget.
    outcome, took = timed_run(policy, "ReceiveMessage", long_poll, WaitTimeSeconds=0)
    assert isinstance(outcome, UnavailableError)
    assert took < 0.5, took


def test_a_caller_may_give_a_call_a_longer_allowance() -> None:
    seen: list[dict[str, Any]] = []

    async def slow(**kwargs: Any) -> str:
        seen.append(kwargs)
        await asyncio.sleep(0.4)
        return "done"

    policy = RetryPolicy(attempts=1, budget_seconds=0.1)
    assert timed_run(policy, "Scan", slow, allowance=1.0, TableName="t")[0] == "done"
    assert seen == [{"TableName": "t"}]  # the allowance is the policy's, not the call's
    assert isinstance(timed_run(policy, "Scan", slow, TableName="t")[0], UnavailableError)


def test_waiting_for_a_slot_counts_against_the_budget() -> None:
    async def main() -> float:
        client, policy = FakeClient(), RetryPolicy(budget_seconds=0.2, max_in_flight=1)
        holder = asyncio.create_task(policy.call("op", client.put_item, allowance=60, n=0))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            await policy.call("DynamoDB.PutItem", client.put_item, n=1)
        took = time.monotonic() - started
        assert client.started == [0]  # the waiting call never reached the client
        client.release.set()
        assert await holder == 0
        return took

    assert 0.15 <= asyncio.run(main()) < 0.5


# -- what a cancelled transaction means --------------------------------------------


def cancelled(*codes: str, message: str | None = None, with_reasons: bool = True) -> ClientError:
    reasons: list[dict[str, Any]] = [
        {"Code": code, **({"Item": {"pk": {"S": "x"}}} if code == "ConditionalCheckFailed" else {})}
        for code in codes
    ]
    response: dict[str, Any] = {
        "Error": {
            "Code": "TransactionCanceledException",
            "Message": message
            or f"Transaction cancelled, please refer cancellation reasons for specific "
            f"reasons [{', '.join(codes)}]",
        },
        "ResponseMetadata": {"HTTPStatusCode": 400},
    }
    if with_reasons:
        response["CancellationReasons"] = reasons
    return ClientError(response, "TransactWriteItems")  # type: ignore[arg-type]


def translated(error: BaseException) -> BaseException:
    try:
        with translate_errors("TransactWriteItems"):
            raise error
    except BaseException as exc:
        return exc
    raise AssertionError("translate_errors swallowed the error")  # pragma: no cover


@pytest.mark.parametrize(
    "codes",
    [
        ("None", "ThrottlingError"),
        ("TransactionConflict", "None"),
        ("ProvisionedThroughputExceeded", "None"),
        ("None", "RequestLimitExceeded"),
    ],
    ids=lambda codes: "+".join(codes),
)
def test_a_transaction_cancelled_for_a_transient_reason_is_unavailable(
    codes: tuple[str, ...],
) -> None:
    error = translated(cancelled(*codes))
    assert type(error) is UnavailableError
    assert all(code in str(error) for code in codes)
    # The same from an endpoint that names the reasons in its message only.
    assert type(translated(cancelled(*codes, with_reasons=False))) is UnavailableError


@pytest.mark.parametrize(
    "codes",
    [("None", "ConditionalCheckFailed"), ("ConditionalCheckFailed", "TransactionConflict")],
    ids=lambda codes: "+".join(codes),
)
def test_a_transaction_whose_condition_failed_is_a_conflict_with_the_refused_item(
    codes: tuple[str, ...],
) -> None:
    error = translated(cancelled(*codes))
    assert isinstance(error, ConflictError)
    assert error.item == {"pk": {"S": "x"}}
    assert isinstance(translated(cancelled(*codes, with_reasons=False)), ConflictError)


def test_a_transaction_cancelled_for_no_known_reason_stays_a_conflict() -> None:
    error = translated(cancelled(message="Transaction cancelled", with_reasons=False))
    assert isinstance(error, ConflictError)


def test_a_transaction_that_can_never_pass_is_not_retried_as_unavailable() -> None:
    error = translated(cancelled("ValidationError", "None"))
    assert isinstance(error, ClientError)


@pytest.mark.parametrize("code", ["TransactionInProgressException", "TransactionConflictException"])
def test_a_transaction_under_way_is_unavailable(code: str) -> None:
    response: Any = {
        "Error": {"Code": code, "Message": "busy"},
        "ResponseMetadata": {"HTTPStatusCode": 400},
    }
    error = ClientError(response, "TransactWriteItems")
    assert type(translated(error)) is UnavailableError


def test_a_throttled_transaction_is_retried_until_it_passes() -> None:
    raised: list[int] = []

    async def transact_write_items() -> str:
        raised.append(1)
        if len(raised) < 3:
            with translate_errors("TransactWriteItems"):
                raise cancelled(
                    "None", "ThrottlingError" if len(raised) == 1 else "TransactionConflict"
                )
        return "written"

    assert run(RetryPolicy(attempts=3), transact_write_items) == "written"
    assert len(raised) == 3


class FakeClient:
    """An aiobotocore client's method as RetryPolicy sees it: a bound coroutine method."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.started: list[int] = []
        self.release = asyncio.Event()

    async def put_item(self, n: int) -> int:
        self.started.append(n)
        self.running += 1
        self.most = max(self.most, self.running)
        await self.release.wait()
        self.running -= 1
        return n


def test_calls_beyond_max_in_flight_wait_their_turn_before_the_client_sees_them() -> None:
    async def main() -> None:
        client, policy = FakeClient(), RetryPolicy(max_in_flight=2)
        calls = [
            asyncio.create_task(policy.call("DynamoDB.PutItem", client.put_item, n=n))
            for n in range(6)
        ]
        await asyncio.sleep(0.01)
        assert client.started == [0, 1]  # the other four are not built yet
        client.release.set()
        assert await asyncio.gather(*calls) == list(range(6))
        assert client.most == 2
        assert client.started == list(range(6))  # first come, first served

    asyncio.run(main())


def test_each_client_has_its_own_slots() -> None:
    async def main() -> None:
        dynamodb, sqs, policy = FakeClient(), FakeClient(), RetryPolicy(max_in_flight=1)
        calls = [
            asyncio.create_task(policy.call("op", client.put_item, n=n))
            for n, client in enumerate([dynamodb, sqs])
        ]
        await asyncio.sleep(0.01)
        assert (dynamodb.started, sqs.started) == ([0], [1])
        dynamodb.release.set()
        sqs.release.set()
        await asyncio.gather(*calls)

    asyncio.run(main())


def test_from_settings_bounds_calls_by_the_connection_pool() -> None:
    settings = Settings(aws_max_pool_connections=7, aws_max_attempts=4, aws_retry_seconds=2.5)
    assert RetryPolicy.from_settings(settings) == RetryPolicy(
        attempts=4, budget_seconds=2.5, max_in_flight=7
    )


@pytest.fixture
def gc_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("gc_off")
def test_calls_that_answer_first_time_leave_no_cyclic_garbage() -> None:
    """Whatever such a call allocates is freed by reference counting when it returns:
    the cyclic GC is not needed. Only a failed first try builds tenacity's retrying
    object (~80 objects in cycles, which would pile up under load if every call made
    one)."""

    async def put_item(**item: str) -> str:
        return "ok"

    async def main() -> int:
        policy = RetryPolicy(attempts=3)
        for _ in range(50):
            assert await policy.call("DynamoDB.PutItem", put_item, pk="p") == "ok"
        return gc.collect()

    assert asyncio.run(main()) == 0


# -- the endpoint data botocore keeps ---------------------------------------------


def full_endpoints() -> dict[str, Any]:
    data: dict[str, Any] = create_loader().load_data("endpoints")
    return data


def lean_endpoints() -> dict[str, Any]:
    data: dict[str, Any] = aws_session().get_component("data_loader").load_data("endpoints")
    return data


def test_the_session_keeps_the_endpoints_of_the_services_it_can_use_only() -> None:
    full, lean = full_endpoints(), lean_endpoints()
    assert [p["partition"] for p in lean["partitions"]] == [
        p["partition"] for p in full["partitions"]
    ]
    for mine, theirs in zip(lean["partitions"], full["partitions"], strict=True):
        assert set(mine["services"]) == set(theirs["services"]) & ENDPOINT_PREFIXES
        assert {"dynamodb", "sqs", "sts"} <= set(mine["services"])
        for name in mine["services"]:
            assert mine["services"][name] == theirs["services"][name]
        assert {k: v for k, v in mine.items() if k != "services"} == {
            k: v for k, v in theirs.items() if k != "services"
        }


def outcome(resolver: EndpointResolver, *args: Any, **kwargs: Any) -> Any:
    try:
        return resolver.construct_endpoint(*args, **kwargs)
    except Exception as exc:  # some variants do not exist: the same error either way
        return type(exc).__name__


def test_endpoints_resolve_as_with_botocores_own_data() -> None:
    full = full_endpoints()
    stock, lean = EndpointResolver(full), EndpointResolver(lean_endpoints())
    checked = 0
    for partition in full["partitions"]:
        for region in [*partition["regions"], "aws-global", "xx-nowhere-1"]:
            for prefix in sorted(ENDPOINT_PREFIXES):
                for fips in (False, True):
                    for dualstack in (False, True):
                        args = (prefix, region)
                        kwargs = {"use_fips_endpoint": fips, "use_dualstack_endpoint": dualstack}
                        assert outcome(lean, *args, **kwargs) == outcome(stock, *args, **kwargs)
                        checked += 1
    assert checked > 1000


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1"])
def test_clients_get_the_same_endpoint_as_from_a_stock_session(
    region: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")

    async def meta(session: Any, service: str) -> tuple[str, str, str]:
        async with session.create_client(service, region_name=region) as client:
            return client.meta.endpoint_url, client.meta.region_name, client.meta.partition

    async def main() -> None:
        for service in ("dynamodb", "sqs"):
            assert await meta(aws_session(), service) == await meta(get_session(), service)

    asyncio.run(main())


# -- malloc arenas -----------------------------------------------------------------


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_arenas_are_capped_unless_the_environment_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert limit_malloc_arenas() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False
