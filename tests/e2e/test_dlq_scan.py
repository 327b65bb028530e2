"""`buildq dlq` drains the DLQ under real SQS semantics: long polls only, every message
seen once per run (false empty answers, holds that run out and copies included), and
every pass ends. Faults come from the fault proxy in front of the emulator, between
the CLI and SQS; the test's own clients talk to the emulator directly."""

from __future__ import annotations

import json
import signal
import time
import uuid
from typing import Any

import pytest

from buildq.messages import BuildReason, build_message
from buildq.queue import DLQ_ATTEMPTS, DLQ_ERROR_MESSAGE, DLQ_ERROR_TYPE, DLQ_FAILED_AT
from buildq_ops import dlq as dead_letters
from tests.e2e.test_oncall import FAST, audit, cli_json
from tests.faults.proxy import Fault, FaultProxy, Rule
from tests.harness import Stack, create_demo, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

LONG_POLL = f'"WaitTimeSeconds": {dead_letters.WAIT_SECONDS}'  # as botocore writes it
RENEWAL = '"VisibilityTimeout": {}'  # a hold renewed, of so many seconds (a hand-back: 0)


def failed_projects(stack: Stack, n: int) -> list[str]:
    """``n`` FAILED projects, each with its message on the DLQ; the worker is stopped."""
    stack.start_api()
    worker = stack.start_worker(**FAST)
    before = stack.queue_depth(dlq=True)["visible"]
    with stack.http() as http:
        ids = [
            create_demo(
                http,
                f"f{i}",
                stage_seconds=0.05,
                fail_at_stage="build",
                fail_times=1,
                fail_mode="permanent",
            )
            for i in range(n)
        ]
        for project_id in ids:
            stack.wait_for_status(http, project_id, {"FAILED"}, timeout=20)
    wait_until(lambda: stack.queue_depth(dlq=True)["visible"] == before + n, timeout=10)
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(10) == 0
    return ids


def dead_letter_attributes(reason: str = "injected permanent failure") -> dict[str, Any]:
    return {
        DLQ_ERROR_TYPE: {"DataType": "String", "StringValue": "PermanentError"},
        DLQ_ERROR_MESSAGE: {"DataType": "String", "StringValue": reason},
        DLQ_ATTEMPTS: {"DataType": "Number", "StringValue": "1"},
        DLQ_FAILED_AT: {"DataType": "String", "StringValue": "2026-01-01T00:00:00.000Z"},
    }


def send_strays(stack: Stack, n: int) -> list[str]:
    """``n`` dead letters of projects that do not exist (a replay keeps them: nothing to
    replay them into); returns their project ids."""
    sqs = stack.client("sqs")
    ids = [f"stray-{uuid.uuid4().hex[:12]}" for _ in range(n)]
    for start in range(0, n, 10):
        sqs.send_message_batch(
            QueueUrl=stack.queue_url(dlq=True),
            Entries=[
                {
                    "Id": str(i),
                    "MessageBody": build_message("demo", pid, BuildReason.CREATE).encode(),
                    "MessageAttributes": dead_letter_attributes(),
                }
                for i, pid in enumerate(ids[start : start + 10])
            ],
        )
    return ids


def watch_polls(proxy: FaultProxy, *, empty_answers: int = 0) -> tuple[Rule, Rule, Rule]:
    """Rules over the DLQ's ReceiveMessage, in order: the first ``empty_answers`` long
    polls are answered empty (as SQS's short polls can while messages wait); the other
    long polls are counted; whatever is not a long poll of WAIT_SECONDS is counted apart."""
    proxy.clear()
    dlq_receive: dict[str, Any] = {"operation": "ReceiveMessage", "resource": "-dlq"}
    empty = proxy.add(
        Fault(
            kind="respond",
            body={"Messages": []},
            body_contains=LONG_POLL,
            times=empty_answers,
            **dlq_receive,
        )
    )
    long = proxy.add(Fault(kind="delay", seconds=0, body_contains=LONG_POLL, **dlq_receive))
    other = proxy.add(Fault(kind="delay", seconds=0, **dlq_receive))
    return empty, long, other


def assert_polled_long(rules: tuple[Rule, Rule, Rule], empty_answers: int) -> None:
    empty, long, other = rules
    assert dead_letters.WAIT_SECONDS >= 1
    assert other.matched == 0, "a DLQ receive that is not a long poll"
    assert empty.injected == empty_answers
    assert long.matched >= 1


def unique(ids: list[str]) -> list[str]:
    assert len(ids) == len(set(ids)), f"handled twice: {ids}"
    return sorted(ids)


def test_list_replay_and_purge_see_every_message_through_empty_answers_with_long_polls_only(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    failed = failed_projects(stack, 3)
    strays = send_strays(stack, 12)  # 15 in all: more than one receive's 10
    stack.via(fault_proxy.url)

    rules = watch_polls(fault_proxy, empty_answers=3)
    listed = cli_json(stack, "dlq", "list")
    assert_polled_long(rules, 3)
    unique([entry["message_id"] for entry in listed])
    assert unique([entry["project_id"] for entry in listed]) == sorted(failed + strays)
    assert {entry["copies"] for entry in listed} == {1}

    rules = watch_polls(fault_proxy, empty_answers=3)
    replay = cli_json(stack, "dlq", "replay", "--all", "--yes", "--rate", "100")
    assert_polled_long(rules, 3)
    assert unique(replay["replayed"]) == sorted(failed)
    kept = [item["project_id"] for item in replay["skipped"]]
    assert unique(kept) == sorted(strays)
    assert {item["reason"] for item in replay["skipped"]} == {"project not found"}
    assert (replay["matched"], replay["scan"]["messages"]) == (15, 15)
    assert replay["scan"]["complete"] is True
    # What it did not consume is back at once, not after the hold (60 s).
    assert stack.queue_depth(dlq=True) == {"visible": 12, "in_flight": 0, "delayed": 0}

    rules = watch_polls(fault_proxy, empty_answers=3)
    purged = stack.cli("dlq", "purge", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert_polled_long(rules, 3)
    assert "purged 12" in purged.stdout
    assert unique([line["project_id"] for line in audit(purged, "dlq.purged")]) == sorted(strays)
    assert stack.queue_depth(dlq=True) == {"visible": 0, "in_flight": 0, "delayed": 0}


def test_copies_of_one_failure_are_each_listed_and_the_project_is_replayed_once(
    stack: Stack,
) -> None:
    (project_id,) = failed_projects(stack, 1)
    # A partial fault can leave copies of one dead letter: same body, same attributes.
    sqs, url = stack.client("sqs"), stack.queue_url(dlq=True)
    (original,) = sqs.receive_message(
        QueueUrl=url, MessageAttributeNames=["All"], VisibilityTimeout=0, WaitTimeSeconds=1
    )["Messages"]
    for _ in range(2):
        sqs.send_message(
            QueueUrl=url,
            MessageBody=original["Body"],
            MessageAttributes=original["MessageAttributes"],
        )
    listed = cli_json(stack, "dlq", "list")
    assert len(unique([entry["message_id"] for entry in listed])) == 3
    assert {(e["project_id"], e["attempts"], e["copies"]) for e in listed} == {(project_id, 1, 3)}
    human = stack.cli("dlq", "list")
    assert "COPIES" in human.stdout.splitlines()[0]

    replay = cli_json(stack, "dlq", "replay", "--all", "--yes")
    assert replay["replayed"] == [project_id]
    assert [item["reason"] for item in replay["skipped"]] == ["project is QUEUED, not FAILED"] * 2
    assert stack.queue_depth(dlq=True)["visible"] == 0
    assert cli_json(stack, "projects", "get", project_id)["status"] == "QUEUED"


def test_a_slow_replay_with_a_two_second_hold_keeps_its_holds_and_replays_each_once(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    failed = failed_projects(stack, 3)
    strays = send_strays(stack, 12)
    stack.via(fault_proxy.url)
    renewals = fault_proxy.add(
        Fault(
            kind="delay",
            seconds=0,
            operation="ChangeMessageVisibilityBatch",
            resource="-dlq",
            body_contains=RENEWAL.format(2),
        )
    )
    selection = [arg for project_id in failed for arg in ("--project", project_id)]
    started = time.monotonic()
    replay = cli_json(
        stack, "dlq", "replay", *selection, "--rate", "0.5", "--yes", dlq_hold_seconds=2
    )
    assert time.monotonic() - started > 4  # three at one per 2 s: twice the hold
    assert unique(replay["replayed"]) == sorted(failed)
    assert (replay["skipped"], replay["errors"]) == ([], [])
    assert replay["scan"]["messages"] == 15
    assert replay["scan"]["redelivered"] == 0  # the holds never ran out
    assert replay["scan"]["complete"] is True
    assert renewals.matched >= 2
    assert stack.queue_depth(dlq=True) == {"visible": 12, "in_flight": 0, "delayed": 0}
    listed = cli_json(stack, "dlq", "list")
    assert unique([entry["project_id"] for entry in listed]) == sorted(strays)


def test_messages_whose_hold_runs_out_are_listed_and_replayed_once(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    failed = failed_projects(stack, 3)
    strays = send_strays(stack, 4)
    stack.via(fault_proxy.url)
    # Every renewal of a hold is refused: each message comes back after its second.
    fault_proxy.add(
        Fault(
            kind="error",
            operation="ChangeMessageVisibilityBatch",
            resource="-dlq",
            body_contains=RENEWAL.format(1),
        )
    )
    # For the peek: every receive after the first answers after the first one's holds ran out.
    late = fault_proxy.add(
        Fault(kind="delay", seconds=1.5, operation="ReceiveMessage", resource="-dlq", after=1)
    )
    peek = stack.cli("dlq", "list", "--json", dlq_hold_seconds=1)
    assert peek.returncode == 0, peek.stderr
    listed = json.loads(peek.stdout)
    assert len(unique([e["message_id"] for e in listed])) == 7
    assert unique([e["project_id"] for e in listed]) == sorted(failed + strays)
    assert audit(peek, "dlq.seen_again")  # they did come back, and were not listed again
    fault_proxy.remove(late)

    wait_until(lambda: stack.queue_depth(dlq=True)["visible"] == 7, timeout=10)
    replay = cli_json(stack, "dlq", "replay", "--all", "--rate", "2", "--yes", dlq_hold_seconds=1)
    assert unique(replay["replayed"]) == sorted(failed)
    assert unique([item["project_id"] for item in replay["skipped"]]) == sorted(strays)
    assert len(unique([item["message_id"] for item in replay["skipped"]])) == 4
    assert replay["scan"]["messages"] == 7
    assert replay["scan"]["redelivered"] >= 1  # came back, handled once all the same
    wait_until(lambda: stack.queue_depth(dlq=True)["visible"] == 4, timeout=10)


def test_a_dlq_full_of_other_messages_ends_finds_the_one_asked_for_and_hands_back_the_rest(
    stack: Stack,
) -> None:
    strays = send_strays(stack, 35)  # ahead of it: SQS (moto strictly) answers oldest first
    (project_id,) = failed_projects(stack, 1)
    started = time.monotonic()
    replay = cli_json(stack, "dlq", "replay", "--project", project_id, "--yes")
    assert time.monotonic() - started < 30
    assert replay["replayed"] == [project_id]
    assert replay["matched"] == 1
    assert (replay["scan"]["messages"], replay["scan"]["stopped"]) == (36, "drained")
    assert stack.queue_depth(dlq=True) == {"visible": 35, "in_flight": 0, "delayed": 0}
    listed = cli_json(stack, "dlq", "list", "--limit", "1000")
    assert unique([entry["project_id"] for entry in listed]) == sorted(strays)


def test_a_dlq_that_keeps_answering_the_same_message_ends(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    send_strays(stack, 3)  # there, but never answered
    stack.via(fault_proxy.url)
    body = build_message("demo", "echo", BuildReason.CREATE).encode()
    fault_proxy.add(
        Fault(
            kind="respond",
            operation="ReceiveMessage",
            resource="-dlq",
            body={
                "Messages": [
                    {
                        "MessageId": "the-same-one",
                        "ReceiptHandle": "not-a-real-handle",
                        "Body": body,
                        "Attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "0"},
                    }
                ]
            },
        )
    )
    started = time.monotonic()
    peek = stack.cli("dlq", "list", "--json")
    assert time.monotonic() - started < dead_letters.QUIET_SECONDS + 15
    assert peek.returncode == 0, peek.stderr
    assert [entry["message_id"] for entry in json.loads(peek.stdout)] == ["the-same-one"]
    assert "the DLQ still shows 3 visible message(s)" in peek.stderr
    assert len(audit(peek, "dlq.seen_again")) >= 2


def test_the_time_limit_ends_a_pass_and_hands_back_what_it_held(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    send_strays(stack, 40)
    stack.via(fault_proxy.url)
    fault_proxy.add(Fault(kind="delay", seconds=1, operation="ReceiveMessage", resource="-dlq"))
    started = time.monotonic()
    peek = stack.cli("dlq", "list", "--json", "--limit", "1000", "--time-limit", "2s")
    assert time.monotonic() - started < 20
    assert peek.returncode == 0, peek.stderr
    assert 0 < len(unique([e["message_id"] for e in json.loads(peek.stdout)])) < 40
    assert "stopped at the time limit" in peek.stderr
    assert stack.queue_depth(dlq=True) == {"visible": 40, "in_flight": 0, "delayed": 0}
