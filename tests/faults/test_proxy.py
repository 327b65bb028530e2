"""The fault proxy itself, against the real emulator through real boto3 clients: each
kind of fault is what botocore sees from AWS or the network, and the rules count."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

from tests.faults.proxy import Fault, FaultProxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def client(service: str, endpoint: str, *, read_timeout: float = 10.0) -> Any:
    """A boto3 client with no retries of its own: each call is one request."""
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=2,
            read_timeout=read_timeout,
        ),
    )


def make_table(dynamodb: Any, name: str | None = None) -> str:
    name = name or f"proxy-{uuid.uuid4().hex[:8]}"
    dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    return name


def item(pk: str) -> dict[str, Any]:
    return {"pk": {"S": pk}}


@pytest.fixture
def proxy(emulator: str) -> Iterator[FaultProxy]:
    # upstreams={}: these tests are the proxy's against the emulator alone, whichever
    # SQS the session uses (BUILDQ_TEST_SQS).
    with FaultProxy(upstream=emulator, upstreams={}, seed=7) as started:
        yield started


@pytest.fixture
def table(emulator: str) -> str:
    return make_table(client("dynamodb", emulator))


@pytest.fixture
def queue_url(emulator: str) -> str:
    url: str = client("sqs", emulator).create_queue(QueueName=f"proxy-{uuid.uuid4().hex[:8]}")[
        "QueueUrl"
    ]
    return url


def code_of(call: Any) -> tuple[str, int, dict[str, Any]]:
    with pytest.raises(ClientError) as caught:
        call()
    response = cast("dict[str, Any]", caught.value.response)
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"], response


def test_without_rules_everything_is_forwarded_and_counted(
    proxy: FaultProxy, emulator: str, table: str, queue_url: str
) -> None:
    dynamodb, sqs = client("dynamodb", proxy.url), client("sqs", proxy.url)
    dynamodb.put_item(TableName=table, Item=item("a"))
    assert dynamodb.get_item(TableName=table, Key=item("a"))["Item"] == item("a")
    sqs.send_message(QueueUrl=queue_url, MessageBody="hello")
    received = client("sqs", emulator).receive_message(QueueUrl=queue_url, WaitTimeSeconds=0)
    assert [m["Body"] for m in received["Messages"]] == ["hello"]
    # A refused request comes back exactly as the emulator said it.
    code, status, _ = code_of(lambda: dynamodb.get_item(TableName="no-such-table", Key=item("a")))
    assert (code, status) == ("ResourceNotFoundException", 400)
    assert proxy.requests == {"PutItem": 1, "GetItem": 2, "SendMessage": 1}
    assert not proxy.injected


def test_an_error_is_parsed_into_its_client_error_for_both_services(
    proxy: FaultProxy, table: str, queue_url: str
) -> None:
    dynamodb, sqs = client("dynamodb", proxy.url), client("sqs", proxy.url)
    proxy.add(Fault(kind="error", operation="PutItem"))
    proxy.add(Fault(kind="error", operation="SendMessage", status=503, code="ServiceUnavailable"))
    code, status, _ = code_of(lambda: dynamodb.put_item(TableName=table, Item=item("a")))
    assert (code, status) == ("InternalServerError", 500)
    code, status, _ = code_of(lambda: sqs.send_message(QueueUrl=queue_url, MessageBody="x"))
    assert (code, status) == ("ServiceUnavailable", 503)
    assert "Item" not in client("dynamodb", proxy.url).get_item(TableName=table, Key=item("a"))
    assert proxy.injected == {("error", "PutItem"): 1, ("error", "SendMessage"): 1}


def test_extra_fields_reach_the_response_like_cancellation_reasons(
    proxy: FaultProxy, table: str
) -> None:
    reasons = [{"Code": "None"}, {"Code": "ThrottlingError", "Message": "slow down"}]
    proxy.add(
        Fault(
            kind="error",
            operation="TransactWriteItems",
            status=400,
            code="TransactionCanceledException",
            extra={"CancellationReasons": reasons},
        )
    )
    dynamodb = client("dynamodb", proxy.url)
    code, status, response = code_of(
        lambda: dynamodb.transact_write_items(
            TransactItems=[{"Put": {"TableName": table, "Item": item(pk)}} for pk in "ab"]
        )
    )
    assert (code, status) == ("TransactionCanceledException", 400)
    assert response["CancellationReasons"] == reasons


def test_a_throttle_is_each_services_throttling_code(
    proxy: FaultProxy, table: str, queue_url: str
) -> None:
    proxy.add(Fault(kind="throttle"))
    dynamodb, sqs = client("dynamodb", proxy.url), client("sqs", proxy.url)
    code, status, _ = code_of(lambda: dynamodb.get_item(TableName=table, Key=item("a")))
    assert (code, status) == ("ThrottlingException", 400)
    code, status, _ = code_of(lambda: sqs.receive_message(QueueUrl=queue_url))
    assert (code, status) == ("RequestThrottled", 400)
    assert proxy.injected == {("throttle", "GetItem"): 1, ("throttle", "ReceiveMessage"): 1}


def test_a_hang_makes_the_client_time_out_and_never_reaches_the_emulator(
    proxy: FaultProxy, emulator: str, table: str
) -> None:
    proxy.add(Fault(kind="hang", operation="PutItem", seconds=20))
    dynamodb = client("dynamodb", proxy.url, read_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        dynamodb.put_item(TableName=table, Item=item("a"))
    assert time.monotonic() - started < 3
    assert "Item" not in client("dynamodb", emulator).get_item(TableName=table, Key=item("a"))
    # Only the matching call hangs; the next one answers at once.
    assert client("dynamodb", proxy.url).get_item(TableName=table, Key=item("a")) is not None


def test_a_hang_closes_the_connection_after_its_seconds(proxy: FaultProxy, table: str) -> None:
    proxy.add(Fault(kind="hang", operation="GetItem", seconds=0.5))
    started = time.monotonic()
    with pytest.raises(ConnectionClosedError):
        client("dynamodb", proxy.url).get_item(TableName=table, Key=item("a"))
    assert 0.4 <= time.monotonic() - started < 3


def test_a_dropped_response_lands_the_write_but_the_client_sees_a_closed_connection(
    proxy: FaultProxy, emulator: str, table: str
) -> None:
    proxy.add(Fault(kind="drop_response", operation="PutItem", times=1))
    dynamodb = client("dynamodb", proxy.url)
    with pytest.raises(ConnectionClosedError):
        dynamodb.put_item(TableName=table, Item=item("landed"))
    direct = client("dynamodb", emulator)
    assert direct.get_item(TableName=table, Key=item("landed"))["Item"] == item("landed")
    dynamodb.put_item(TableName=table, Item=item("second"))  # the budget is spent
    assert proxy.injected == {("drop_response", "PutItem"): 1}


def test_respond_answers_the_canned_body_without_forwarding(
    proxy: FaultProxy, emulator: str, queue_url: str
) -> None:
    client("sqs", emulator).send_message(QueueUrl=queue_url, MessageBody="waiting")
    proxy.add(Fault(kind="respond", operation="ReceiveMessage", body={"Messages": []}))
    sqs = client("sqs", proxy.url)
    assert sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0).get("Messages", []) == []
    depth = client("sqs", emulator).get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"]
    )
    assert depth["Attributes"]["ApproximateNumberOfMessages"] == "1"  # never received


def test_a_delay_forwards_after_its_seconds(proxy: FaultProxy, table: str) -> None:
    proxy.add(Fault(kind="delay", operation="PutItem", seconds=0.4))
    dynamodb = client("dynamodb", proxy.url)
    started = time.monotonic()
    dynamodb.put_item(TableName=table, Item=item("a"))
    assert time.monotonic() - started >= 0.4
    assert dynamodb.get_item(TableName=table, Key=item("a"))["Item"] == item("a")


def test_after_lets_requests_pass_then_times_bounds_the_faults(
    proxy: FaultProxy, table: str
) -> None:
    rule = proxy.add(Fault(kind="error", operation="GetItem", after=1, times=2))
    dynamodb = client("dynamodb", proxy.url)
    outcomes = []
    for _ in range(5):
        try:
            dynamodb.get_item(TableName=table, Key=item("a"))
            outcomes.append("ok")
        except ClientError:
            outcomes.append("error")
    assert outcomes == ["ok", "error", "error", "ok", "ok"]
    assert (rule.matched, rule.injected) == (5, 2)
    assert proxy.injected == {("error", "GetItem"): 2}
    assert proxy.requests["GetItem"] == 5


def test_the_first_matching_rule_with_budget_left_applies(proxy: FaultProxy, table: str) -> None:
    proxy.add(Fault(kind="throttle", operation="GetItem", times=1))
    proxy.add(Fault(kind="error", operation="GetItem", times=1))
    dynamodb = client("dynamodb", proxy.url)
    codes = [code_of(lambda: dynamodb.get_item(TableName=table, Key=item("a")))[0] for _ in "12"]
    assert codes == ["ThrottlingException", "InternalServerError"]
    dynamodb.get_item(TableName=table, Key=item("a"))


def outcomes_with_seed(emulator: str, table: str, seed: int) -> list[bool]:
    with FaultProxy(upstream=emulator, upstreams={}, seed=seed) as proxy:
        proxy.add(Fault(kind="error", operation="GetItem", probability=0.5))
        dynamodb = client("dynamodb", proxy.url)
        failed = []
        for _ in range(30):
            try:
                dynamodb.get_item(TableName=table, Key=item("a"))
                failed.append(False)
            except ClientError:
                failed.append(True)
        assert proxy.injected[("error", "GetItem")] == sum(failed)
        return failed


def test_probability_is_drawn_from_the_proxys_seeded_random(emulator: str, table: str) -> None:
    first = outcomes_with_seed(emulator, table, seed=3)
    assert 5 <= sum(first) <= 25
    assert outcomes_with_seed(emulator, table, seed=3) == first


def test_resource_and_body_filters_pick_the_requests(
    proxy: FaultProxy, emulator: str, queue_url: str
) -> None:
    direct = client("dynamodb", emulator)
    hit = make_table(direct, f"proxy-{uuid.uuid4().hex[:6]}-hit")
    spared = make_table(direct, f"proxy-{uuid.uuid4().hex[:6]}-spared")
    proxy.add(Fault(kind="error", resource="-hit"))
    proxy.add(Fault(kind="error", service="sqs", body_contains="poison"))
    dynamodb, sqs = client("dynamodb", proxy.url), client("sqs", proxy.url)
    dynamodb.put_item(TableName=spared, Item=item("a"))
    code_of(lambda: dynamodb.put_item(TableName=hit, Item=item("a")))
    # A transaction is matched by the tables of its items.
    code_of(
        lambda: dynamodb.transact_write_items(
            TransactItems=[
                {"Put": {"TableName": spared, "Item": item("b")}},
                {"Put": {"TableName": hit, "Item": item("b")}},
            ]
        )
    )
    sqs.send_message(QueueUrl=queue_url, MessageBody="fine")
    code_of(lambda: sqs.send_message(QueueUrl=queue_url, MessageBody="a poison pill"))
    assert proxy.injected == {
        ("error", "PutItem"): 1,
        ("error", "TransactWriteItems"): 1,
        ("error", "SendMessage"): 1,
    }


def test_remove_and_clear_stop_the_faults(proxy: FaultProxy, table: str) -> None:
    dynamodb = client("dynamodb", proxy.url)
    rule = proxy.add(Fault(kind="error", operation="GetItem"))
    code_of(lambda: dynamodb.get_item(TableName=table, Key=item("a")))
    proxy.remove(rule)
    dynamodb.get_item(TableName=table, Key=item("a"))
    proxy.add(Fault(kind="throttle"))
    code_of(lambda: dynamodb.get_item(TableName=table, Key=item("a")))
    proxy.clear()
    dynamodb.get_item(TableName=table, Key=item("a"))


def test_a_long_poll_passes_while_other_calls_go_through(
    proxy: FaultProxy, emulator: str, queue_url: str, table: str
) -> None:
    sqs = client("sqs", proxy.url, read_timeout=30)
    got: list[list[str]] = []

    def poll() -> None:
        response = sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=5)
        got.append([m["Body"] for m in response.get("Messages", [])])

    poller = threading.Thread(target=poll)
    started = time.monotonic()
    poller.start()
    time.sleep(0.5)
    dynamodb = client("dynamodb", proxy.url)
    for _ in range(3):  # not queued behind the long poll
        dynamodb.get_item(TableName=table, Key=item("a"))
    assert time.monotonic() - started < 3
    client("sqs", emulator).send_message(QueueUrl=queue_url, MessageBody="woke up")
    poller.join(15)
    assert got == [["woke up"]]


def test_stop_closes_hanging_connections(emulator: str, table: str) -> None:
    proxy = FaultProxy(upstream=emulator, upstreams={}).start()
    proxy.add(Fault(kind="hang", seconds=60))
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client("dynamodb", proxy.url, read_timeout=30).get_item(TableName=table, Key=item("a"))
        except Exception as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)
    started = time.monotonic()
    proxy.stop()
    caller.join(10)
    assert time.monotonic() - started < 5
    assert [type(error) for error in errors] == [ConnectionClosedError], errors


def test_each_service_goes_to_its_own_upstream(emulator: str, table: str) -> None:
    """With ``upstreams``, one proxy reaches DynamoDB on one endpoint and SQS on another
    (as the LocalStack runs do: DynamoDB on moto, SQS on LocalStack). The SQS upstream
    here is a second proxy that answers every SQS call itself, and counts them."""
    with FaultProxy(upstream=emulator, upstreams={}) as sqs_side:
        sqs_side.add(Fault(kind="respond", service="sqs", body={"QueueUrls": ["from-sqs-side"]}))
        sqs_side.add(Fault(kind="error", service="dynamodb", code="WrongUpstream"))
        with FaultProxy(upstream=emulator, upstreams={"sqs": sqs_side.url}) as proxy:
            assert proxy.upstreams == {"dynamodb": emulator, "sqs": sqs_side.url}
            dynamodb, sqs = client("dynamodb", proxy.url), client("sqs", proxy.url)
            dynamodb.put_item(TableName=table, Item=item("a"))
            assert dynamodb.get_item(TableName=table, Key=item("a"))["Item"] == item("a")
            assert sqs.list_queues()["QueueUrls"] == ["from-sqs-side"]
            # Faults are still the front proxy's, whichever upstream a request has.
            proxy.add(Fault(kind="throttle", service="sqs", times=1))
            code, _, _ = code_of(sqs.list_queues)
            assert code == "RequestThrottled"
            assert proxy.requests == {"PutItem": 1, "GetItem": 1, "ListQueues": 2}
        assert sqs_side.requests == {"ListQueues": 1}
        assert sqs_side.injected == {("respond", "ListQueues"): 1}


def test_without_upstreams_the_services_endpoint_variables_are_the_upstreams(
    emulator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``upstreams`` left out: a service's upstream is where this process's own botocore
    clients send it (``AWS_ENDPOINT_URL_SQS``, set by the session under
    BUILDQ_TEST_SQS=localstack), so a proxy made as ``FaultProxy(upstream=emulator)``
    still reaches LocalStack's SQS."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", "http://127.0.0.1:9/")
    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB", raising=False)
    proxy = FaultProxy(upstream=emulator)
    assert proxy.upstreams == {"dynamodb": emulator, "sqs": "http://127.0.0.1:9"}
    monkeypatch.delenv("AWS_ENDPOINT_URL_SQS")
    assert FaultProxy(upstream=emulator).upstreams == {"dynamodb": emulator, "sqs": emulator}
    with pytest.raises(ValueError, match="no such service"):
        FaultProxy(upstream=emulator, upstreams={"s3": emulator})
