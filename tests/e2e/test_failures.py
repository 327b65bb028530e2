"""Failures end where they should: retried, dead-lettered, swept, cancelled or bounded.

Every test runs real API and worker processes against the emulator and asserts
on the project record, the queues and the workers' JSON log events.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from ulid import ULID

from buildq.clock import now_iso, parse_iso
from buildq.messages import BuildReason, build_message
from buildq.models import Project
from buildq.queue import DLQ_ATTEMPTS, DLQ_ERROR_MESSAGE, DLQ_ERROR_TYPE, DLQ_WORKER_ID
from buildq.store import DynamoProjectStore
from buildq.transitions import new_project
from buildq.workflows.demo import DEMO, DEMO_STAGES
from tests.harness import Stack, create_demo, wait_until

pytestmark = pytest.mark.e2e

TENANT = "demo"  # the API's default tenant
EMPTY = {"visible": 0, "in_flight": 0, "delayed": 0}
UNKNOWN_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
# A retry's backoff in these tests: base 0.5 s, so attempt n waits 0.25 * 2**n .. 0.5 * 2**n.
FAST_RETRY = {"retry_base_seconds": 0.5}
TOLERANCE = 0.15  # seconds of slack when comparing log timestamps


# -- helpers ------------------------------------------------------------------


def worker_id(stack: Stack, n: int = 1) -> str:
    return f"worker-{n}-{stack.suffix}"


def epoch(event: dict[str, Any]) -> float:
    return parse_iso(str(event["timestamp"])).timestamp()


def events_of(stack: Stack, event: str, project_id: str) -> list[dict[str, Any]]:
    found = [e for e in stack.events(event) if e.get("project_id") == project_id]
    return sorted(found, key=epoch)


def stage_map(project: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {stage["name"]: stage for stage in project["stages"]}


def wait_drained(stack: Stack, timeout: float = 10) -> None:
    wait_until(lambda: stack.queue_depth() == EMPTY, timeout=timeout, what="an empty build queue")


def dead_letters(stack: Stack, count: int, timeout: float = 15) -> list[tuple[str, dict[str, str]]]:
    """Wait until ``count`` messages are on the DLQ, then read them (once: reading hides them)."""
    wait_until(
        lambda: stack.queue_depth(dlq=True)["visible"] >= count,
        timeout=timeout,
        what=f"{count} dead-lettered message(s)",
    )
    messages = stack.dlq_messages()
    assert len(messages) == count, messages
    return messages


def load(stack: Stack, project_id: str) -> Project:
    async def get(store: DynamoProjectStore) -> Project | None:
        return await store.get(TENANT, project_id)

    project = stack.with_store(get)
    assert project is not None, project_id
    return project


def wait_for_record(stack: Stack, project_id: str, statuses: set[str], timeout: float) -> Project:
    def check() -> Project | None:
        project = load(stack, project_id)
        return project if project.status.value in statuses else None

    return wait_until(check, timeout=timeout, interval=0.2, what=f"{project_id} in {statuses}")


def store_project(stack: Stack, name: str, **parameters: Any) -> Project:
    """Write a QUEUED demo project straight to the table, as the API does, sending nothing."""
    project = new_project(
        tenant_id=TENANT,
        project_id=str(ULID()),
        name=name,
        workflow="demo",
        stage_names=DEMO_STAGES,
        parameters=DEMO.validate_parameters(parameters),
        now=now_iso(),
    )

    async def put(store: DynamoProjectStore) -> None:
        await store.create(project)

    stack.with_store(put)
    return project


def send_build(stack: Stack, project_id: str, reason: BuildReason = BuildReason.CREATE) -> str:
    body = build_message(TENANT, project_id, reason).encode()
    stack.send_raw(body)
    return body


# -- retries ------------------------------------------------------------------


def test_transient_failure_recovers_and_resumes_at_the_failed_stage(stack: Stack) -> None:
    stack.start_api()
    stack.start_worker(max_attempts=3, **FAST_RETRY)
    with stack.http() as http:
        project_id = create_demo(
            http, stage_seconds=0.1, fail_at_stage="build", fail_times=2, fail_mode="transient"
        )
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=20)
    assert done["status"] == "SUCCEEDED", done
    assert done["attempt"] == 3
    stages = stage_map(done)
    assert stages["build"]["attempt"] == 3
    assert stages["build"]["output"] == {"stage": "build", "attempt": 3, "seconds": 0.1}
    assert stages["build"]["error"] is None
    # The stages that succeeded on attempt 1 were not run again.
    assert stages["plan"]["attempt"] == 1
    assert stages["generate"]["attempt"] == 1
    assert stages["package"]["attempt"] == 3
    assert all(stage["status"] == "SUCCEEDED" for stage in done["stages"])
    assert done["last_error"] == {
        "type": "RetryableError",
        "message": "injected transient failure in 'build' on attempt 2",
    }
    retries = stack.logged("project.retry_scheduled", project_id, count=2)
    assert [(e["attempt"], e["error_type"]) for e in retries] == [
        (1, "RetryableError"),
        (2, "RetryableError"),
    ]
    claims = stack.logged("project.claimed", project_id, count=3)
    assert [e["attempt"] for e in claims] == [1, 2, 3]
    # Whether each claim waited out its retry_in: test_a_retry_waits_out_its_backoff.
    wait_drained(stack)
    assert stack.queue_depth(dlq=True) == EMPTY


def test_a_retry_waits_out_its_backoff(stack: Stack) -> None:
    # Short polls: the emulator's long poll notices a message made visible again by
    # ChangeMessageVisibility only about once a second, which would hide the backoff.
    stack.start_api()
    stack.start_worker(max_attempts=3, receive_wait_seconds=0, **FAST_RETRY)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=0.05, fail_at_stage="plan", fail_times=2)
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=20)
    assert done["status"] == "SUCCEEDED", done
    retries = stack.logged("project.retry_scheduled", project_id, count=2)
    claims = {e["attempt"]: e for e in stack.logged("project.claimed", project_id, count=3)}
    assert len(retries) == 2
    waits = []
    for retry in retries:
        claim = claims[retry["attempt"] + 1]
        waited = epoch(claim) - epoch(retry)
        waits.append((retry["retry_in"], round(waited, 3)))
    # Each retry's claim comes no sooner than the backoff it logged.
    assert all(waited >= retry_in - TOLERANCE for retry_in, waited in waits), waits


def test_transient_failure_exhausts_its_attempts_and_is_dead_lettered(stack: Stack) -> None:
    stack.start_api()
    stack.start_worker(max_attempts=3, **FAST_RETRY)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=0.05, fail_at_stage="build", fail_times=5)
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=20)
    assert done["status"] == "FAILED", done
    assert done["attempt"] == 3
    assert done["last_error"] == {
        "type": "RetryableError",
        "message": "injected transient failure in 'build' on attempt 3",
    }
    assert stage_map(done)["build"]["status"] == "FAILED"
    assert stage_map(done)["package"]["status"] == "PENDING"
    assert len(stack.logged("project.retry_scheduled", project_id, count=2)) == 2
    assert len(stack.logged("project.failed", project_id)) == 1
    [(body, attributes)] = dead_letters(stack, 1)
    message = json.loads(body)
    assert message["project_id"] == project_id
    assert message["tenant_id"] == TENANT
    assert message["reason"] == "create"  # the original message, not a copy made for retry
    assert attributes[DLQ_ERROR_TYPE] == "RetryableError"
    assert attributes[DLQ_ERROR_MESSAGE] == "injected transient failure in 'build' on attempt 3"
    assert attributes[DLQ_ATTEMPTS] == "3"
    assert attributes[DLQ_WORKER_ID] == worker_id(stack)
    wait_drained(stack)


def test_permanent_failure_fails_at_once_and_the_worker_carries_on(stack: Stack) -> None:
    stack.start_api()
    worker = stack.start_worker(max_attempts=3, **FAST_RETRY)
    with stack.http() as http:
        broken = create_demo(
            http, "broken", stage_seconds=0.05, fail_at_stage="generate", fail_mode="permanent"
        )
        failed = stack.wait_for_status(http, broken, {"SUCCEEDED", "FAILED"}, timeout=15)
        assert failed["status"] == "FAILED", failed
        assert failed["attempt"] == 1
        assert failed["last_error"]["type"] == "PermanentError"
        assert events_of(stack, "project.retry_scheduled", broken) == []
        [(body, attributes)] = dead_letters(stack, 1)
        assert json.loads(body)["project_id"] == broken
        assert attributes[DLQ_ERROR_TYPE] == "PermanentError"
        assert attributes[DLQ_ATTEMPTS] == "1"
        healthy = create_demo(http, "healthy", stage_seconds=0.05)
        done = stack.wait_for_status(http, healthy, {"SUCCEEDED", "FAILED"}, timeout=15)
    assert done["status"] == "SUCCEEDED", done
    assert done["worker_id"] == worker_id(stack)
    assert worker.alive()
    wait_drained(stack)


# -- messages the worker cannot use ------------------------------------------


def test_poison_messages_are_dead_lettered_and_the_worker_stays_up(stack: Stack) -> None:
    stack.start_api()
    worker = stack.start_worker()
    stack.send_raw("not json")
    future = '{"schema": 99, "tenant_id": "t", "project_id": "p", "reason": "create"}'
    stack.send_raw(future)
    letters = dict(dead_letters(stack, 2))
    assert set(letters) == {"not json", future}
    assert letters["not json"][DLQ_ERROR_TYPE] == "PoisonMessage"
    assert letters["not json"][DLQ_ERROR_MESSAGE].startswith("message body is not JSON")
    assert letters[future][DLQ_ERROR_TYPE] == "PoisonMessage"
    assert "unknown message schema 99" in letters[future][DLQ_ERROR_MESSAGE]
    assert {a[DLQ_ATTEMPTS] for a in letters.values()} == {"0"}
    assert len(stack.events("message.dead_lettered")) == 2
    assert worker.alive()
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=0.05)
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=15)
    assert done["status"] == "SUCCEEDED", done
    wait_drained(stack)


def test_a_stage_past_its_timeout_fails_the_project(stack: Stack) -> None:
    stack.start_api()
    stack.start_worker(stage_timeout=0.5, max_attempts=1)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=3)
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=10)
    assert done["status"] == "FAILED", done
    assert done["attempt"] == 1
    expected = {"type": "StageTimeoutError", "message": "stage 'plan' exceeded 0.5s"}
    assert done["last_error"] == expected
    plan = stage_map(done)["plan"]
    assert plan["status"] == "FAILED"
    assert plan["error"] == expected
    assert [stage["status"] for stage in done["stages"][1:]] == ["PENDING"] * 3
    [claim] = stack.logged("project.claimed", project_id)
    [failed] = stack.logged("project.failed", project_id)
    assert failed["error_type"] == "StageTimeoutError"
    assert epoch(failed) - epoch(claim) < 2.0  # the 3 s stage was cut short at 0.5 s
    ran = parse_iso(plan["finished_at"]) - parse_iso(plan["started_at"])
    assert 0.4 <= ran.total_seconds() < 2.0, ran
    [(body, attributes)] = dead_letters(stack, 1)
    assert json.loads(body)["project_id"] == project_id
    assert attributes[DLQ_ERROR_TYPE] == "StageTimeoutError"
    wait_drained(stack)


def test_a_message_for_a_missing_project_is_retried_then_dead_lettered(stack: Stack) -> None:
    stack.start_worker(missing_project_retries=1)
    project_id = str(ULID())
    body = send_build(stack, project_id)
    [(dead, attributes)] = dead_letters(stack, 1, timeout=15)
    assert dead == body
    assert attributes[DLQ_ERROR_TYPE] == "ProjectNotFound"
    assert attributes[DLQ_ERROR_MESSAGE] == f"project {project_id} does not exist"
    assert attributes[DLQ_ATTEMPTS] == "0"
    missing = stack.logged("message.project_missing", project_id)
    assert len(missing) == 1
    [dead_lettered] = stack.logged("message.dead_lettered", project_id)
    assert dead_lettered["error_type"] == "ProjectNotFound"
    # It was looked at again only after the delay the worker asked for.
    assert epoch(dead_lettered) - epoch(missing[0]) >= missing[0]["retry_in"] - TOLERANCE
    assert stack.events("project.claimed") == []
    wait_drained(stack)


# -- the sweeper --------------------------------------------------------------


SWEEP_FAST = {"sweep_queued_after": 1, "sweep_building_after": 1, "sweep_interval": 0.5}


def test_a_project_whose_enqueue_was_lost_is_swept_and_built(stack: Stack) -> None:
    # The API wrote the record and died before its SendMessage: no message at all.
    project = store_project(stack, "lost", stage_seconds=0.05)
    assert stack.queue_depth() == EMPTY
    stack.start_worker(**SWEEP_FAST)
    done = wait_for_record(stack, project.project_id, {"SUCCEEDED", "FAILED"}, timeout=15)
    assert done.status.value == "SUCCEEDED", done
    assert done.attempt == 1
    swept = stack.logged("project.swept", project.project_id)
    assert swept[0]["status"] == "QUEUED"
    [claim] = stack.logged("project.claimed", project.project_id)
    assert claim["reason"] == "sweep"
    wait_drained(stack)


def test_a_building_project_whose_worker_vanished_is_swept_and_built(stack: Stack) -> None:
    project = store_project(stack, "orphan", stage_seconds=0.05)

    async def ghost_claim(store: DynamoProjectStore) -> Project:
        return await store.claim(TENANT, project.project_id, worker_id="ghost", lease_seconds=0.2)

    claimed = stack.with_store(ghost_claim)
    assert claimed.status.value == "BUILDING"
    assert claimed.attempt == 1
    stack.start_worker(**SWEEP_FAST)
    done = wait_for_record(stack, project.project_id, {"SUCCEEDED", "FAILED"}, timeout=15)
    assert done.status.value == "SUCCEEDED", done
    assert done.attempt == 2
    assert done.worker_id == worker_id(stack)
    assert {stage.attempt for stage in done.stages} == {2}
    swept = stack.logged("project.swept", project.project_id)
    assert swept[0]["status"] == "BUILDING"
    wait_drained(stack)


def test_a_crash_loop_ends_in_failure_instead_of_running_again(stack: Stack) -> None:
    project = store_project(stack, "crashy", stage_seconds=0.05)

    async def three_crashes(store: DynamoProjectStore) -> Project:
        claimed = None
        for n in (1, 2, 3):
            claimed = await store.claim(
                TENANT,
                project.project_id,
                worker_id=f"ghost-{n}",
                lease_seconds=0.1,
                margin_seconds=0,  # one process, one clock: no margin to allow for
            )
            await asyncio.sleep(0.2)  # the worker "dies": its lease runs out
        assert claimed is not None
        return claimed

    crashed = stack.with_store(three_crashes)
    assert crashed.attempt == 3
    body = send_build(stack, project.project_id)
    stack.start_worker(max_attempts=3)
    done = wait_for_record(stack, project.project_id, {"SUCCEEDED", "FAILED"}, timeout=15)
    assert done.status.value == "FAILED", done
    assert done.last_error is not None
    assert done.last_error.type == "AttemptsExhausted"
    assert done.last_error.message == "3 attempts ended without a result"
    assert done.attempt == 4  # the claim that found the budget spent; it ran nothing
    assert {stage.status.value for stage in done.stages} == {"PENDING"}  # nothing ran again
    assert stack.events("stage.started") == []
    [(dead, attributes)] = dead_letters(stack, 1)
    assert dead == body
    assert attributes[DLQ_ERROR_TYPE] == "AttemptsExhausted"
    wait_drained(stack)


# -- cancellation -------------------------------------------------------------


def test_cancel_while_queued_is_immediate_and_the_message_is_dropped(stack: Stack) -> None:
    stack.start_api()  # no worker yet: the project stays QUEUED
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=0.05)
        response = http.post(f"/v1/projects/{project_id}/cancel")
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "CANCELLED"
        assert response.json()["cancel_requested"] is True
        assert http.get(f"/v1/projects/{project_id}").json()["status"] == "CANCELLED"
        assert stack.queue_depth()["visible"] == 1
        stack.start_worker()
        [dropped] = stack.logged("message.dropped", project_id, timeout=10)
        assert dropped["refusal"] == "terminal"
        wait_drained(stack)
        after = http.get(f"/v1/projects/{project_id}").json()
        assert after["status"] == "CANCELLED"
        assert after["attempt"] == 0
        assert [stage["status"] for stage in after["stages"]] == ["PENDING"] * 4
        assert events_of(stack, "project.claimed", project_id) == []
        again = http.post(f"/v1/projects/{project_id}/cancel")
        assert again.status_code == 409
        assert again.headers["content-type"] == "application/problem+json"
        assert again.json()["type"] == "urn:buildq:problem:conflict"
        unknown = http.post(f"/v1/projects/{UNKNOWN_ID}/cancel")
        assert unknown.status_code == 404
        assert unknown.headers["content-type"] == "application/problem+json"
        assert unknown.json()["type"] == "urn:buildq:problem:not-found"


def test_cancel_while_building_stops_the_running_stage(stack: Stack) -> None:
    stack.start_api()
    stack.start_worker(visibility_timeout=3, lease_seconds=2)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=5)
        building = stack.wait_for_stage(http, project_id, 0, "RUNNING", timeout=10)
        assert building["status"] == "BUILDING"
        asked = time.time()
        response = http.post(f"/v1/projects/{project_id}/cancel")
        assert response.status_code == 202, response.text
        assert response.json()["cancel_requested"] is True
        assert response.json()["status"] == "BUILDING"
        done = stack.wait_for_status(
            http, project_id, {"CANCELLED", "SUCCEEDED", "FAILED"}, timeout=10
        )
    assert done["status"] == "CANCELLED", done
    [cancelled] = stack.logged("project.cancelled", project_id)
    assert epoch(cancelled) - asked < 3.0
    plan = stage_map(done)["plan"]
    assert plan["status"] == "FAILED"
    ran = (parse_iso(plan["finished_at"]) - parse_iso(plan["started_at"])).total_seconds()
    assert ran < 4.5, ran  # well before the 5 s stage would have ended
    assert plan["error"]["type"] == "CancelledByRequestError"
    assert [stage["status"] for stage in done["stages"][1:]] == ["PENDING"] * 3
    assert done["attempt"] == 1
    wait_drained(stack)
    assert stack.queue_depth(dlq=True) == EMPTY


# -- long runs ----------------------------------------------------------------


def test_a_run_past_the_message_hold_cap_finishes_on_its_lease(stack: Stack) -> None:
    stack.start_api()
    stack.start_worker(max_message_hold=1.5, visibility_timeout=3, lease_seconds=2)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=1)
        stack.logged("message.released_to_lease", project_id, timeout=10)
        # Its delete is batched: gone a moment later, and from then on nothing is queued.
        wait_until(lambda: stack.queue_depth() == EMPTY, timeout=5, what="the delete")
        samples: list[dict[str, int]] = []

        def finished() -> bool:
            samples.append(stack.queue_depth())
            status = http.get(f"/v1/projects/{project_id}").json()["status"]
            return status in {"SUCCEEDED", "FAILED", "CANCELLED"}

        wait_until(finished, timeout=15, interval=0.2, what="the project to finish")
        done = http.get(f"/v1/projects/{project_id}").json()
    assert done["status"] == "SUCCEEDED", done
    assert done["attempt"] == 1
    assert {stage["attempt"] for stage in done["stages"]} == {1}
    assert len(samples) >= 3
    assert all(sample == EMPTY for sample in samples), samples
    assert len(stack.logged("project.claimed", project_id)) == 1
    assert stack.queue_depth() == EMPTY
