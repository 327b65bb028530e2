"""``buildq bootstrap`` creates the resources, and a second run reuses them."""

from __future__ import annotations

import json
from pathlib import Path

from buildq.resources import redrive_max_receive_count
from tests.harness import Stack, free_port


def test_bootstrap_is_idempotent_and_sets_the_redrive_policy(emulator: str, tmp_path: Path) -> None:
    stack = Stack(endpoint=emulator, log_dir=tmp_path)
    first = stack.cli("bootstrap", max_attempts=4)
    assert first.returncode == 0, first.stderr
    assert f"table  created {stack.table_name}" in first.stdout
    second = stack.cli("bootstrap", max_attempts=4)
    assert second.returncode == 0, second.stderr
    assert f"table  exists  {stack.table_name}" in second.stdout
    urls = [line.split()[-1] for line in first.stdout.splitlines()[1:]]
    assert urls == [line.split()[-1] for line in second.stdout.splitlines()[1:]]

    sqs = stack.client("sqs")
    attributes = sqs.get_queue_attributes(QueueUrl=stack.queue_url(), AttributeNames=["All"])[
        "Attributes"
    ]
    redrive = json.loads(attributes["RedrivePolicy"])
    assert redrive["maxReceiveCount"] == redrive_max_receive_count(4) == 6
    assert redrive["deadLetterTargetArn"].endswith(stack.dlq_name)
    table = stack.client("dynamodb").describe_table(TableName=stack.table_name)["Table"]
    assert [i["IndexName"] for i in table["GlobalSecondaryIndexes"]] == ["sweep"]
    assert table["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"


def test_bootstrap_against_an_unreachable_endpoint_fails_clearly(tmp_path: Path) -> None:
    stack = Stack(endpoint=f"http://127.0.0.1:{free_port()}", log_dir=tmp_path)
    result = stack.cli("bootstrap", "--wait", "1", aws_connect_timeout=0.5, aws_max_attempts=1)
    assert result.returncode == 1
    assert "error: bootstrap failed" in result.stderr
    assert "Traceback" not in result.stderr
