"""The worker's guarantees under partial faults, injected from outside: an AWS call
that fails, hangs or lands with its answer lost (the fault proxy in front of the
emulator), a message redelivered to the worker that still runs it, and stage code
that misbehaves (workflows registered by import path, as a deployment's are).

Each test here reproduces one way the promise ("nothing lost, nothing run twice at
once, every failure replayable") broke before; it fails on the code before the fix.
The workers talk to the emulator through the proxy; the test reads the truth
directly.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from buildq.clock import parse_iso
from buildq.messages import BuildReason, build_message
from buildq.models import Project
from buildq.queue import DLQ_ERROR_TYPE, DLQ_PROJECT_ATTEMPT
from buildq.store import DynamoProjectStore
from buildq_worker.sync_stages import CRASH_EXIT_CODE
from tests.faults.proxy import Fault, FaultProxy
from tests.harness import Stack, create_demo, wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EMPTY = {"visible": 0, "in_flight": 0, "delayed": 0}
SAMPLES = "tests.e2e.sample_workflows:WORKFLOWS"
# Short leases and visibilities, so redeliveries and expiries happen within seconds.
FAST: dict[str, Any] = {"visibility_timeout": 3, "lease_seconds": 2}


@pytest.fixture
def samples(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Settings that register the misbehaving sample workflows in every process."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # so the processes can import tests.e2e
    return {"workflows": SAMPLES}


def create(stack: Stack, workflow: str, **parameters: Any) -> str:
    with stack.http() as http:
        response = http.post(
            "/v1/projects", json={"name": "x", "workflow": workflow, "parameters": parameters}
        )
        assert response.status_code == 202, response.text
        project_id: str = response.json()["id"]
        return project_id


def final(stack: Stack, project_id: str, timeout: float = 30) -> dict[str, Any]:
    with stack.http() as http:
        return stack.wait_for_status(
            http, project_id, {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=timeout
        )


def record(stack: Stack, project_id: str) -> Project:
    async def read(store: DynamoProjectStore) -> Project | None:
        return await store.get("demo", project_id)

    project = stack.with_store(read)
    assert project is not None
    return project


def claims(stack: Stack, project_id: str) -> list[dict[str, Any]]:
    return [e for e in stack.events("project.claimed") if e.get("project_id") == project_id]


def dlq_copies(stack: Stack, project_id: str) -> list[dict[str, str]]:
    """The attributes of every DLQ message of the project (they stay hidden 60 s)."""
    return [
        attributes
        for body, attributes in stack.dlq_messages()
        if json.loads(body).get("project_id") == project_id
    ]


def wait_for_one_dlq_entry(stack: Stack, project_id: str) -> dict[str, str]:
    copies: list[dict[str, str]] = []

    def arrived() -> bool:
        copies.extend(dlq_copies(stack, project_id))
        return bool(copies)

    wait_until(arrived, timeout=20, interval=0.5, what="the failure on the DLQ")
    wait_until(lambda: stack.queue_depth() == EMPTY, timeout=10, what="the build queue empty")
    copies.extend(dlq_copies(stack, project_id))  # anything that came later
    assert len(copies) == 1, copies
    return copies[0]


# -- FAILED ⇔ exactly one DLQ entry ---------------------------------------------------------


def test_a_dlq_send_that_fails_still_lands_the_failure_in_the_dlq_once(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    """Reproduction 1: the FAILED write landed, the DLQ send failed past its retries.
    Before, the returning message was refused (not claimable) and deleted: FAILED with
    no DLQ entry, nothing to replay. Now the claim that finds it forwards it."""
    stack.start_api()
    stack.via(fault_proxy.url)
    fault_proxy.add(Fault(kind="error", operation="SendMessage", resource="-dlq", times=2))
    stack.start_worker(aws_max_attempts=2, **FAST)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=0, fail_at_stage="plan", fail_mode="permanent")
    assert final(stack, project_id)["status"] == "FAILED"
    entry = wait_for_one_dlq_entry(stack, project_id)
    assert fault_proxy.injected[("error", "SendMessage")] == 2
    assert entry[DLQ_PROJECT_ATTEMPT] == "1"
    assert entry[DLQ_ERROR_TYPE] == "PermanentError"
    assert record(stack, project_id).dead_lettered_attempt == 1
    assert [e.get("reason") for e in stack.events("message.dead_lettered")] != []
    assert len(claims(stack, project_id)) == 1


def test_a_failed_write_whose_answer_is_lost_is_recognised_and_dead_lettered(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    """Reproduction 1, second way: the FAILED write lands but its answer is lost; the
    retry finds no owner. Before, that was taken for a lost lease and nothing went to
    the DLQ. Now the run recognises its own write (its attempt, FAILED, no owner)."""
    stack.start_api()
    stack.via(fault_proxy.url)
    fault_proxy.add(
        Fault(kind="drop_response", operation="UpdateItem", body_contains="finished_at", times=1)
    )
    stack.start_worker(**FAST)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=0, fail_at_stage="plan", fail_mode="permanent")
    assert final(stack, project_id)["status"] == "FAILED"
    entry = wait_for_one_dlq_entry(stack, project_id)
    assert fault_proxy.injected[("drop_response", "UpdateItem")] == 1
    assert entry[DLQ_PROJECT_ATTEMPT] == "1"
    assert stack.events("project.lease_lost") == []


def test_a_failed_project_whose_message_is_gone_is_dead_lettered_by_the_sweeper(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    """The DLQ send fails and the build message is gone too (here: the DLQ send fails
    for good, the worker is killed, and the message is purged): the FAILED project
    stays in the sweeper index until its failure is on the DLQ, so the sweeper sends it."""
    stack.start_api()
    stack.via(fault_proxy.url)
    rule = fault_proxy.add(Fault(kind="error", operation="SendMessage", resource="-dlq"))
    worker = stack.start_worker(aws_max_attempts=1, visibility_timeout=30, lease_seconds=2)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=0, fail_at_stage="plan", fail_mode="permanent")
    assert final(stack, project_id)["status"] == "FAILED"
    wait_until(lambda: fault_proxy.injected[("error", "SendMessage")] >= 1, timeout=10)
    worker.kill()
    stack.client("sqs").purge_queue(QueueUrl=stack.queue_url())
    fault_proxy.remove(rule)
    stack.start_worker(sweep_interval=0.5, sweep_building_after=1, sweep_queued_after=60, **FAST)
    entry = wait_for_one_dlq_entry(stack, project_id)
    assert entry[DLQ_PROJECT_ATTEMPT] == "1"
    assert stack.logged("project.dead_lettered_by_sweeper", project_id)


# -- stage code that misbehaves ---------------------------------------------------------------


def test_a_stage_raising_cancelled_error_uses_its_attempts_and_ends_failed(
    stack: Stack, samples: dict[str, Any]
) -> None:
    """Reproduction 2: before, a stage raising CancelledError itself came back as an
    interrupted run, released with no attempt used and a fresh message each time:
    157 runs in 8 s. Now it is a failure like any other."""
    settings: dict[str, Any] = {**samples, "max_attempts": 2, "retry_base_seconds": 0.1}
    stack.start_api(**settings)
    stack.start_worker(**settings, **FAST)
    project_id = create(stack, "self-cancelling")
    done = final(stack, project_id)
    assert done["status"] == "FAILED"
    assert done["attempt"] == 2
    assert done["last_error"]["type"] == "StageCancelledError"
    assert len(claims(stack, project_id)) == 2
    assert stack.events("project.released") == []


def test_a_600_kb_error_ends_failed_at_once_with_the_error_truncated(
    stack: Stack, samples: dict[str, Any]
) -> None:
    """Reproduction 5: a PermanentError with 600 KB of text pushed the final write past
    DynamoDB's item limit; the project was re-run until its attempts ran out, its real
    error lost. Now the text is cut (with a marker) and the project fails at once."""
    settings: dict[str, Any] = {**samples, "max_attempts": 3}
    stack.start_api(**settings)
    stack.start_worker(**settings, **FAST)
    project_id = create(stack, "loud")
    done = final(stack, project_id)
    assert done["status"] == "FAILED"
    assert done["attempt"] == 1
    message = done["last_error"]["message"]
    assert message.startswith("error: xxx")
    assert "truncated" in message
    assert len(message.encode()) <= 2048
    assert done["stages"][0]["error"]["message"] == message
    wait_for_one_dlq_entry(stack, project_id)
    assert len(claims(stack, project_id)) == 1


def _intervals(ledger: Path) -> list[tuple[int, float, float]]:
    """(attempt, start, end) of each execution in the ledger, by start time."""
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    starts = {(ln["attempt"], ln["pid"]): ln["t"] for ln in lines if ln["event"] == "start"}
    ends = {(ln["attempt"], ln["pid"]): ln["t"] for ln in lines if ln["event"] == "end"}
    assert starts.keys() == ends.keys(), lines
    return sorted((key[0], starts[key], ends[key]) for key in starts)


def test_a_sync_stage_past_its_timeout_never_runs_twice_at_once(
    stack: Stack, samples: dict[str, Any], tmp_path: Path
) -> None:
    """Reproduction 6: a timed-out sync stage's thread went on while the retry (or
    another worker) started the same stage: executions overlapped. Now the run keeps
    its lease and slot until the thread returns, and only then settles."""
    settings: dict[str, Any] = {**samples, "max_attempts": 2, "retry_base_seconds": 0.1}
    stack.start_api(**settings)
    stack.start_worker(**settings, **FAST)
    stack.start_worker(**settings, **FAST)
    ledger = tmp_path / "ledger.jsonl"
    project_id = create(stack, "stubborn", seconds=2.5, ledger=str(ledger))
    done = final(stack, project_id, timeout=40)
    assert done["status"] == "FAILED"
    assert done["last_error"]["type"] == "StageTimeoutError"
    executions = _intervals(ledger)
    assert [attempt for attempt, _, _ in executions] == [1, 2]
    (_, _, first_end), (_, second_start, _) = executions
    assert first_end <= second_start, executions
    assert len(stack.events("stage.sync_waiting")) == 2


def test_a_sync_stage_that_never_returns_ends_its_worker_and_runs_elsewhere_after(
    stack: Stack, samples: dict[str, Any], tmp_path: Path
) -> None:
    """Crash-only: a stopped sync stage whose thread does not return within the grace
    ends the worker process (the only way to stop a thread); its project comes back
    through its lease, and is never run beside the stuck thread."""
    settings: dict[str, Any] = {**samples, "max_attempts": 2}
    stack.start_api(**settings)
    first = stack.start_worker(sync_stage_grace_seconds=1, **settings, **FAST)
    ledger = tmp_path / "ledger.jsonl"
    project_id = create(stack, "stubborn", seconds=600, ledger=str(ledger))
    assert first.popen.wait(timeout=20) == CRASH_EXIT_CODE
    [crash] = stack.events("worker.crash_only")
    assert "did not return" in crash["reason"]
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [(ln["attempt"], ln["event"]) for ln in lines] == [(1, "start")]
    assert record(stack, project_id).lease_owner == f"worker-1-{stack.suffix}"


# -- a frozen worker, a late claim -------------------------------------------------------------


def _ledger(ledger: Path) -> list[dict[str, Any]]:
    if not ledger.exists():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines()]


@pytest.mark.timeout(90)
def test_a_worker_thawed_past_its_lease_stops_its_stage_at_the_next_checkpoint(
    stack: Stack, samples: dict[str, Any], tmp_path: Path
) -> None:
    """Campaign finding A: a worker frozen (SIGSTOP) mid-stage past its lease, while
    another took the project over and ran the stage, came back (SIGCONT) and its stage
    wrote its "end" a few ms before the lease watch noticed: stage code of a stale run
    went on beside the new owner's. Now a stage's checkpoint (``ctx.sleep``,
    ``ctx.raise_if_cancelled``) checks the lease by the process's own clock first:
    the stale execution stops there, whichever of its stages (sync or async)."""
    stack.start_api(**samples)
    first = stack.start_worker(**samples, **FAST)
    ledger = tmp_path / "ledger.jsonl"
    project_id = create(stack, "ledgered", ledger=str(ledger), stage_seconds=1.0)

    def started(pid: int, stage: str) -> bool:
        return any(
            (ln["pid"], ln["stage"], ln["event"]) == (pid, stage, "start") for ln in _ledger(ledger)
        )

    wait_until(lambda: started(first.popen.pid, "compile"), timeout=20, what="compile")
    first.signal(signal.SIGSTOP)  # mid-stage, its 1 s blocking sleep under way
    try:
        second = stack.start_worker(**samples, **FAST)
        # The lease (2 s) runs out, plus the claim margin; the message comes back.
        wait_until(lambda: started(second.popen.pid, "compile"), timeout=30, what="takeover")
    finally:
        first.signal(signal.SIGCONT)  # its sleep is long over: it resumes at once
    assert final(stack, project_id)["status"] == "SUCCEEDED"
    lines = _ledger(ledger)
    stale = [(ln["stage"], ln["event"]) for ln in lines if ln["pid"] == first.popen.pid]
    # Its compile stopped (or its process went, crash-only, before the checkpoint):
    # never an "end", nor a stage after it.
    assert stale[-1] in {("compile", "start"), ("compile", "stop")}, stale
    assert ("compile", "end") not in stale
    mine = [(ln["stage"], ln["event"]) for ln in lines if ln["pid"] == second.popen.pid]
    assert mine[-2:] == [("verify", "start"), ("verify", "end")], mine


def test_a_claim_that_answers_late_renews_its_lease_before_the_first_stage(
    stack: Stack, samples: dict[str, Any], fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Campaign finding B: a claim that took 2.5 s to answer (a slow DynamoDB) left
    the run less lease than one heartbeat's wait, so the lease watch stopped it (and,
    with a sync stage running, ended the process) right after it began. Now a late
    claim is renewed before the first stage starts."""
    stack.start_api(**samples)
    stack.via(fault_proxy.url)
    fault_proxy.add(
        Fault(kind="delay", operation="UpdateItem", body_contains="claim_token", seconds=2.6)
    )
    worker = stack.start_worker(**samples, visibility_timeout=6, lease_seconds=3)
    ledger = tmp_path / "ledger.jsonl"
    project_id = create(stack, "ledgered", ledger=str(ledger), stage_seconds=0.3)
    done = final(stack, project_id)
    assert done["status"] == "SUCCEEDED"
    assert done["attempt"] == 1
    assert fault_proxy.injected[("delay", "UpdateItem")] == 1
    assert worker.events("project.late_claim_renewed")
    assert not worker.events("project.lease_expired_locally")
    assert worker.alive()


# -- redeliveries and heartbeats --------------------------------------------------------------


def test_a_redelivery_to_the_worker_that_runs_the_message_starts_nothing(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    """Reproduction 3: visibility extensions fail, so the running message comes back
    to the same worker. Before, a second, untracked run started beside the first. Now
    the worker keeps its one run and adopts the newest receipt handle."""
    stack.bootstrap(max_attempts=20)  # the redrive count: redeliveries must not DLQ it
    stack.start_api()
    stack.via(fault_proxy.url)
    fault_proxy.add(Fault(kind="error", operation="ChangeMessageVisibilityBatch"))
    stack.start_worker(visibility_timeout=2, lease_seconds=1, aws_max_attempts=1)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=1.5)
    done = final(stack, project_id)
    assert done["status"] == "SUCCEEDED"
    assert done["attempt"] == 1
    assert len(claims(stack, project_id)) == 1
    assert len(stack.events("stage.started")) == 4
    assert stack.events("message.redelivered_while_running")
    # The delete used the newest handle, the only one SQS honours.
    wait_until(lambda: stack.queue_depth() == EMPTY, timeout=10, what="the message deleted")


def test_a_hung_sqs_does_not_starve_lease_renewal(stack: Stack, fault_proxy: FaultProxy) -> None:
    """Reproduction 4: the heartbeat awaited the visibility change before renewing
    leases; with SQS hanging, a healthy run's lease expired and another worker took it.
    Now leases and visibilities are renewed apart, each call cut short."""
    stack.start_api()
    stack.via(fault_proxy.url)
    fault_proxy.add(Fault(kind="hang", operation="ChangeMessageVisibilityBatch", seconds=30))
    settings: dict[str, Any] = {"visibility_timeout": 30, "lease_seconds": 3}
    stack.start_worker(**settings)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=2)  # 8 s: over two leases
        stack.wait_for_stage(http, project_id, 1, "RUNNING", timeout=15)
    stack.start_worker(**settings)
    # A duplicate for the second worker: its claim must find a live lease.
    stack.send_raw(build_message("demo", project_id, BuildReason.SWEEP).encode())
    done = final(stack, project_id)
    assert done["status"] == "SUCCEEDED"
    assert done["attempt"] == 1
    assert len(claims(stack, project_id)) == 1
    assert stack.logged("message.dropped", project_id)
    assert fault_proxy.injected[("hang", "ChangeMessageVisibilityBatch")] >= 1


def test_a_slow_dynamodb_still_renews_every_lease(stack: Stack, fault_proxy: FaultProxy) -> None:
    """Found by the chaos test under load: every lease renewal was cut at the round's
    deadline (¾ of the 2 s interval here), so a DynamoDB answering in 1.8 s, slow but
    working, renewed no lease: runs stopped and were claimed again. Now each renewal
    is a task of its own that the round does not wait for (two in flight per run), and
    a claim that answered that late is renewed before its first stage."""
    stack.start_api()
    stack.via(fault_proxy.url)
    fault_proxy.add(Fault(kind="delay", operation="UpdateItem", seconds=1.8))
    worker = stack.start_worker(visibility_timeout=30, lease_seconds=6)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=3)  # 12 s: two leases
    done = final(stack, project_id, timeout=60)
    assert done["status"] == "SUCCEEDED"
    assert done["attempt"] == 1
    assert len(claims(stack, project_id)) == 1
    assert not worker.events("project.lease_expired_locally")
    assert worker.events("project.late_claim_renewed")
    assert fault_proxy.injected[("delay", "UpdateItem")] >= 6


# -- retries always come back -----------------------------------------------------------------


def test_a_retry_whose_visibility_change_fails_comes_back_by_a_fresh_message(
    stack: Stack, fault_proxy: FaultProxy
) -> None:
    """Suspected 8: the retry's change of its message's visibility fails (a stale
    handle, a deleted duplicate, SQS down). Before, the project waited for the
    message's visibility timeout, or the sweeper if it was gone. Now a fresh message
    with the backoff as its delay brings it back."""
    stack.start_api()
    stack.via(fault_proxy.url)
    fault_proxy.add(Fault(kind="error", operation="ChangeMessageVisibility"))
    stack.start_worker(
        visibility_timeout=60, lease_seconds=30, retry_base_seconds=0.5, aws_max_attempts=1
    )
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=0, fail_at_stage="plan", fail_times=1)
    done = final(stack, project_id, timeout=20)
    assert done["status"] == "SUCCEEDED"
    assert done["attempt"] == 2
    assert stack.logged("message.retry_visibility_failed", project_id)
    assert fault_proxy.injected[("error", "ChangeMessageVisibility")] >= 1
    wait_until(lambda: stack.queue_depth() == EMPTY, timeout=10, what="both messages deleted")


def test_a_retry_is_not_claimed_before_its_backoff_is_over(stack: Stack) -> None:
    """Suspected 8, second way: anything that brings a retry's message back early (a
    duplicate, a heartbeat's visibility change landing after the retry's own) is
    refused until the record's ``retry_at`` and put back until then."""
    stack.start_api()
    stack.start_worker(retry_base_seconds=8, **FAST)  # the first retry waits 4-8 s
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=0, fail_at_stage="plan", fail_times=1)
        stack.logged("project.retry_scheduled", project_id, timeout=10)
        stack.send_raw(build_message("demo", project_id, BuildReason.SWEEP).encode())
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=30)
    assert done["status"] == "SUCCEEDED"
    retry_at = record(stack, project_id).retry_at
    assert retry_at is not None
    assert stack.logged("message.retry_not_due", project_id)
    second = claims(stack, project_id)[1]
    claimed_at = parse_iso(str(second["timestamp"])).timestamp() * 1000
    assert claimed_at >= retry_at - 50  # log timestamps are this process's own clock
