"""The LocalStack runs themselves (BUILDQ_TEST_SQS=localstack): SQS is LocalStack's, for
the test's clients, the processes and a fault proxy's, while DynamoDB stays on moto."""

from __future__ import annotations

from collections.abc import Callable

import boto3
import httpx
import pytest

from tests.faults.proxy import FaultProxy
from tests.harness import Stack, create_demo

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture
def localstack(sqs_endpoint: str | None) -> str:
    if sqs_endpoint is None:
        pytest.skip("SQS is on moto in this session: BUILDQ_TEST_SQS=localstack runs it")
    return sqs_endpoint


def queue_names(endpoint: str) -> set[str]:
    sqs = boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    return {url.rsplit("/", 1)[1] for url in sqs.list_queues().get("QueueUrls", [])}


def test_the_queues_are_on_localstack_and_the_table_on_moto(
    localstack: str, emulator: str, stack: Stack
) -> None:
    health = httpx.get(f"{localstack}/_localstack/health", timeout=5).json()
    assert health["services"]["sqs"] in ("available", "running")
    assert {stack.queue_name, stack.dlq_name} <= queue_names(localstack)
    assert not {stack.queue_name, stack.dlq_name} & queue_names(emulator)
    assert stack.queue_url().startswith(f"{localstack}/")  # AWS-shaped: /<account>/<name>
    stack.client("dynamodb").describe_table(TableName=stack.table_name)
    env = stack.env()
    assert (env["AWS_ENDPOINT_URL"], env["AWS_ENDPOINT_URL_SQS"]) == (emulator, localstack)


def test_a_project_runs_through_one_proxy_to_both(
    localstack: str, emulator: str, fault_proxy: FaultProxy, make_stack: Callable[[], Stack]
) -> None:
    # fault_proxy before make_stack: the processes stop while the proxy still serves them.
    assert fault_proxy.upstreams == {"dynamodb": emulator, "sqs": localstack}
    stack = make_stack().via(fault_proxy.url)
    assert "AWS_ENDPOINT_URL_SQS" not in stack.env()  # the processes send SQS to the proxy
    stack.start_api()
    stack.start_worker()
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=0.05)
        body = stack.wait_for_status(http, project_id, {"SUCCEEDED"}, timeout=60)
    assert body["status"] == "SUCCEEDED"
    assert fault_proxy.requests["SendMessage"] >= 1
    assert fault_proxy.requests["ReceiveMessage"] >= 1
    dynamodb = {"GetItem", "Query", "PutItem", "UpdateItem", "TransactWriteItems"}
    assert dynamodb & set(fault_proxy.requests), fault_proxy.requests
