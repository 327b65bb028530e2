"""The API under AWS faults: a real ``buildq-api`` (uvicorn) whose DynamoDB and SQS
calls go through a ``FaultProxy`` in front of the emulator, while the test reads the
truth from the emulator directly.

- A cancelled transaction is a conflict only when a condition failed: throttling and
  transaction conflicts are retried, then a 503 with ``Retry-After``, never a 409.
- An endpoint that accepts and never answers costs a request the API's time budget
  (about 1.5 s), like one that refuses connections, not botocore's 5 s read timeout.
- A write whose answer is lost is recognised when retried: one project, whatever the
  client sees; a replayed create that is still QUEUED sends its build message again.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from tests.faults.proxy import Fault, FaultProxy
from tests.harness import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# A correctness bound, not a benchmark: the API's budget is 1.5 s (README: "about 2 s").
WITHIN_SECONDS = 2.5


@pytest.fixture(scope="module")
def proxy(emulator: str) -> Iterator[FaultProxy]:
    with FaultProxy(upstream=emulator) as started:
        yield started


@pytest.fixture(scope="module")
def api(
    emulator: str, proxy: FaultProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One API for the module, every AWS call of it through ``proxy``."""
    stack = Stack(endpoint=emulator, log_dir=tmp_path_factory.mktemp("api-faults"))
    stack.bootstrap()
    stack.via(proxy.url).start_api()
    yield stack
    stack.stop()


@pytest.fixture
def stack(api: Stack, proxy: FaultProxy, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The module's API, with no faults and an empty build queue for each test."""
    proxy.clear()
    queued_messages(api)
    yield api
    proxy.clear()
    report = getattr(request.node, "rep_call", None)
    if report is None or report.failed:
        print(api.logs())


def post(
    stack: Stack, name: str, key: str | None = None, **parameters: Any
) -> tuple[httpx.Response, float]:
    """POST a demo project; the response and how long it took."""
    headers = {"Idempotency-Key": key} if key else {}
    body = {"name": name, "workflow": "demo", "parameters": parameters}
    with stack.http() as http:
        started = time.monotonic()
        response = http.post("/v1/projects", json=body, headers=headers)
        return response, time.monotonic() - started


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:buildq:problem:unavailable"
    assert response.headers["retry-after"] == "2"


def projects_named(stack: Stack, name: str) -> list[dict[str, Any]]:
    """The projects of this name in the table, as the emulator holds them."""
    return [
        item
        for item in stack.table_items()
        if item["sk"]["S"].startswith("PROJECT#") and item.get("name", {}).get("S") == name
    ]


def queued_messages(stack: Stack) -> list[dict[str, Any]]:
    """Take every build message off the queue (read and deleted, so none comes back
    into a later test)."""
    sqs, url = stack.client("sqs"), stack.queue_url()
    found: list[dict[str, Any]] = []
    while True:
        batch = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=60, WaitTimeSeconds=0
        ).get("Messages", [])
        if not batch:
            return found
        found += [json.loads(message["Body"]) for message in batch]
        sqs.delete_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(batch)
            ],
        )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def cancellation(*codes: str) -> Fault:
    """TransactWriteItems answered as AWS cancels a transaction, one reason per item."""
    return Fault(
        kind="error",
        operation="TransactWriteItems",
        status=400,
        code="TransactionCanceledException",
        message=f"Transaction cancelled, please refer cancellation reasons for specific "
        f"reasons [{', '.join(codes)}]",
        extra={
            "CancellationReasons": [
                {"Code": code} if code == "None" else {"Code": code, "Message": code}
                for code in codes
            ]
        },
    )


# -- item 10: a cancelled transaction is a conflict only when a condition failed -------


@pytest.mark.parametrize(
    "reasons",
    [
        ("None", "ThrottlingError"),
        ("TransactionConflict", "None"),
        ("ProvisionedThroughputExceeded", "ProvisionedThroughputExceeded"),
    ],
    ids=lambda reasons: "+".join(reasons),
)
def test_a_transaction_cancelled_for_a_transient_reason_is_a_503_then_the_retry_succeeds(
    stack: Stack, proxy: FaultProxy, reasons: tuple[str, ...]
) -> None:
    rule = proxy.add(cancellation(*reasons))
    name, key = unique("cancelled"), unique("key")
    response, _ = post(stack, name, key)
    assert_unavailable(response)
    assert rule.injected == 3  # retried within the budget (BUILDQ_AWS_MAX_ATTEMPTS)
    assert projects_named(stack, name) == []
    proxy.remove(rule)
    response, _ = post(stack, name, key)
    assert response.status_code == 202, response.text
    assert "idempotent-replayed" not in response.headers  # the first to land
    assert [p["project_id"]["S"] for p in projects_named(stack, name)] == [response.json()["id"]]


def test_a_transient_cancellation_that_clears_within_the_budget_is_a_202(
    stack: Stack, proxy: FaultProxy
) -> None:
    rule = proxy.add(replace(cancellation("None", "TransactionConflict"), times=2))
    name = unique("conflict-clears")
    response, _ = post(stack, name, unique("key"))
    assert response.status_code == 202, response.text
    assert rule.injected == 2
    assert len(projects_named(stack, name)) == 1


def test_a_real_key_conflict_is_still_the_first_project_or_a_422(stack: Stack) -> None:
    name, key = unique("conflict"), unique("key")
    first, _ = post(stack, name, key)
    assert first.status_code == 202, first.text
    again, _ = post(stack, name, key)
    assert again.status_code == 202, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other, _ = post(stack, unique("another-body"), key)
    assert other.status_code == 422, other.text
    assert other.json()["type"] == "urn:buildq:problem:idempotency-key-reused"
    assert len(projects_named(stack, name)) == 1


def test_a_condition_failed_on_a_key_that_is_not_there_is_a_503_not_a_409(
    stack: Stack, proxy: FaultProxy
) -> None:
    proxy.add(cancellation("None", "ConditionalCheckFailed"))
    response, _ = post(stack, unique("phantom"), unique("key"))
    assert_unavailable(response)


# -- item 11: a hang costs the API's budget, like a refusal --------------------------


@pytest.mark.parametrize(
    ("operation", "with_key"),
    [("PutItem", False), ("TransactWriteItems", True)],
    ids=["PutItem", "TransactWriteItems"],
)
def test_a_write_that_hangs_is_a_503_within_the_budget(
    stack: Stack, proxy: FaultProxy, operation: str, with_key: bool
) -> None:
    rule = proxy.add(Fault(kind="hang", operation=operation, seconds=30))
    name = unique("hang")
    key = unique("key") if with_key else None
    response, took = post(stack, name, key)
    assert_unavailable(response)
    assert took < WITHIN_SECONDS, took
    assert rule.injected == 1  # the first attempt had the whole budget
    assert projects_named(stack, name) == []  # a hang never reaches the emulator
    proxy.remove(rule)
    response, _ = post(stack, name, key)
    assert response.status_code == 202, response.text


def test_a_send_that_hangs_still_answers_202_within_the_budget(
    stack: Stack, proxy: FaultProxy
) -> None:
    """The record is written, so the client gets its project; the sweeper (or a
    replayed create, below) sends the message."""
    proxy.add(Fault(kind="hang", operation="SendMessage", seconds=30))
    name = unique("send-hangs")
    response, took = post(stack, name, unique("key"))
    assert response.status_code == 202, response.text
    assert took < WITHIN_SECONDS, took
    assert [p["status"]["S"] for p in projects_named(stack, name)] == ["QUEUED"]
    assert queued_messages(stack) == []


def test_a_read_that_hangs_is_a_503_within_the_budget(stack: Stack, proxy: FaultProxy) -> None:
    created, _ = post(stack, unique("read-hangs"))
    assert created.status_code == 202, created.text
    proxy.add(Fault(kind="hang", operation="GetItem", seconds=30))
    with stack.http() as http:
        started = time.monotonic()
        response = http.get(f"/v1/projects/{created.json()['id']}")
        took = time.monotonic() - started
    assert_unavailable(response)
    assert took < WITHIN_SECONDS, took


# -- writes whose answer is lost ----------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "with_key"),
    [("PutItem", False), ("TransactWriteItems", True)],
    ids=["PutItem", "TransactWriteItems"],
)
def test_a_create_whose_answer_is_lost_once_is_one_project(
    stack: Stack, proxy: FaultProxy, operation: str, with_key: bool
) -> None:
    rule = proxy.add(Fault(kind="drop_response", operation=operation, times=1))
    name = unique("dropped")
    response, _ = post(stack, name, unique("key") if with_key else None)
    assert response.status_code == 202, response.text
    assert rule.injected == 1
    projects = projects_named(stack, name)
    assert [p["project_id"]["S"] for p in projects] == [response.json()["id"]]
    assert [m["project_id"] for m in queued_messages(stack)] == [response.json()["id"]]


def test_a_create_whose_answers_are_all_lost_is_one_project_when_the_client_retries(
    stack: Stack, proxy: FaultProxy
) -> None:
    rule = proxy.add(Fault(kind="drop_response", operation="TransactWriteItems"))
    name, key = unique("all-dropped"), unique("key")
    response, _ = post(stack, name, key)
    assert_unavailable(response)
    assert rule.injected == 3  # the first landed, the retries were refused: all unseen
    landed = projects_named(stack, name)
    assert len(landed) == 1
    proxy.remove(rule)
    response, _ = post(stack, name, key)
    assert response.status_code == 202, response.text
    assert response.headers["idempotent-replayed"] == "true"
    assert response.json()["id"] == landed[0]["project_id"]["S"]
    assert len(projects_named(stack, name)) == 1
    # Nothing had sent its message: the replay did.
    assert [m["project_id"] for m in queued_messages(stack)] == [response.json()["id"]]


def test_the_idempotent_retry_after_a_failed_send_puts_the_message_on_the_queue(
    stack: Stack, proxy: FaultProxy
) -> None:
    rule = proxy.add(Fault(kind="error", operation="SendMessage", service="sqs"))
    name, key = unique("send-fails"), unique("key")
    first, _ = post(stack, name, key)
    assert first.status_code == 202, first.text  # written: the sweeper would send it
    assert rule.injected == 3
    assert queued_messages(stack) == []
    proxy.remove(rule)
    again, _ = post(stack, name, key)
    assert again.status_code == 202, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    messages = queued_messages(stack)
    assert [(m["project_id"], m["reason"]) for m in messages] == [(first.json()["id"], "create")]


def test_logs_name_the_unavailable_calls(stack: Stack, proxy: FaultProxy) -> None:
    proxy.add(Fault(kind="throttle", operation="PutItem"))
    response, _ = post(stack, unique("throttled"))
    assert_unavailable(response)
    warnings = [e for e in stack.events("aws.unavailable") if "PutItem" in e.get("error", "")]
    assert warnings, stack.logs()
