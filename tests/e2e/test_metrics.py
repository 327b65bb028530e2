"""Metrics and health: the API's and the workers' /metrics move with what happens,
a worker's /healthz tells a stalled receive loop, and the lock holder writes the
backlog-per-slot EMF line."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from buildq.messages import BuildReason, build_message
from buildq.settings import WorkerSettings
from buildq.workflows.registry import load_registry
from buildq_worker.server import serving
from buildq_worker.worker import ActiveRun, Worker
from tests.harness import Stack, create_demo, free_port, wait_until

pytestmark = pytest.mark.e2e

STAGES = ["plan", "generate", "build", "package"]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(f"{url}/metrics", timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(
        value for (sample, have), value in samples.items() if sample == name and wanted <= have
    )


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(have)[label] for (sample, have), _ in samples.items() if sample == name}


def metrics_url(port: int) -> str:
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, timeout=10)
    return url


# -- the API ---------------------------------------------------------------------


def test_api_metrics_count_requests_by_route_template_and_projects_created(
    stack: Stack,
) -> None:
    api = stack.start_api()
    requests, seconds = "buildq_http_requests_total", "buildq_http_request_duration_seconds_count"
    project_route = "/v1/projects/{project_id}"
    before = scrape(api)  # no API key: /metrics is open
    with stack.http() as http:
        first = create_demo(http, "a")
        create_demo(http, "b")
        assert http.get(f"/v1/projects/{first}").status_code == 200
        body = {"name": "c", "workflow": "demo"}
        for _ in range(2):  # the second is a replay: not a new project
            response = http.post("/v1/projects", json=body, headers={"Idempotency-Key": "k-1"})
            assert response.status_code == 202
        assert http.get("/v1/no-such-thing").status_code == 404
        assert "/metrics" not in http.get("/openapi.json").json()["paths"]
    after = scrape(api)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    post = {"route": "/v1/projects", "method": "POST", "status": "202"}
    get = {"route": project_route, "method": "GET", "status": "200"}
    assert moved(requests, **post) == 4
    assert moved(seconds, **post) == 4
    assert moved(requests, **get) == 1
    assert moved(seconds, **get) == 1
    assert moved(requests, route="<unmatched>", status="404") == 1
    # Labelled by template, never by the raw path.
    routes = label_values(after, requests, "route")
    assert first not in "".join(routes)
    assert {"/v1/projects", project_route, "/metrics"} <= routes
    assert moved("buildq_projects_created_total") == 3
    assert moved("buildq_projects_created_total", workflow="demo") == 3
    aws = "buildq_aws_call_duration_seconds_count"
    assert moved(aws, operation="PutItem", outcome="ok") >= 2
    assert moved(aws, operation="SendMessage", outcome="ok") >= 4  # a replay sends again
    assert moved(aws, operation="TransactWriteItems") == 2
    assert moved(aws, operation="GetItem", outcome="ok") >= 1
    operations = label_values(after, aws, "operation")
    assert all(op.isalpha() for op in operations), operations


# -- a worker --------------------------------------------------------------------


def test_worker_metrics_follow_its_events(stack: Stack) -> None:
    stack.start_api()
    port = free_port()
    worker = stack.start_worker(metrics_port=port, max_attempts=2, retry_base_seconds=0.1)
    url = metrics_url(port)
    assert httpx.get(f"{url}/healthz", timeout=5).json()["status"] == "ok"
    before = scrape(url)
    with stack.http() as http:
        ok = create_demo(http, "ok", stage_seconds=0.4)
        failing = create_demo(http, "bad", stage_seconds=0.05, fail_at_stage="build")
        # While a workflow runs, the gauge says so.
        wait_until(
            lambda: total(scrape(url), "buildq_worker_active_workflows") >= 1,
            timeout=15,
            what="an active workflow",
        )
        assert stack.wait_for_status(http, ok, {"SUCCEEDED", "FAILED"})["status"] == "SUCCEEDED"
        assert stack.wait_for_status(http, failing, {"FAILED"}, timeout=30)["attempt"] == 2
        # Two copies of a finished project's message: both refused, both deleted.
        for _ in range(2):
            stack.send_raw(build_message("demo", ok, BuildReason.CREATE).encode())

    def settled() -> Samples | None:
        # Every message dealt with (ok, failing's one DLQ'd, two duplicates), every
        # slot free again.
        now = scrape(url)
        deleted = "buildq_worker_messages_deleted_total"
        done = total(now, deleted) - total(before, deleted) == 4
        return now if done and total(now, "buildq_worker_free_slots") == 5 else None

    after = wait_until(settled, timeout=15, what="the duplicates to be dropped")

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # ok: 1 message; failing: 1 message received twice (retry), 2 duplicates.
    assert moved("buildq_worker_messages_received_total") == 5
    assert moved("buildq_worker_retries_scheduled_total") == 1
    assert moved("buildq_worker_messages_dead_lettered_total", reason="failed") == 1
    assert moved("buildq_worker_messages_dead_lettered_total") == 1
    assert moved("buildq_worker_messages_released_total") == 0
    assert moved("buildq_worker_claim_refusals_total", reason="terminal") == 2
    assert moved("buildq_worker_claim_refusals_total") == 2
    assert moved("buildq_worker_lease_losses_total") == 0
    # Counters agree with the log lines of the same events.
    assert moved("buildq_worker_retries_scheduled_total") == len(
        worker.events("project.retry_scheduled")
    )
    assert moved("buildq_worker_messages_dead_lettered_total") == len(
        worker.events("message.dead_lettered")
    )
    stage = "buildq_worker_stage_duration_seconds"
    for name in STAGES:
        assert moved(f"{stage}_count", workflow="demo", stage=name, outcome="succeeded") >= 1
    assert moved(f"{stage}_count", workflow="demo", stage="build", outcome="failed") == 2
    # 0.4 s, less up to a millisecond: libuv's timers count from the loop iteration's
    # start, in whole milliseconds.
    package = moved(f"{stage}_sum", workflow="demo", stage="package", outcome="succeeded")
    assert package >= 0.4 - 0.002
    # Claims: ok once, failing twice (the second one a redelivery).
    assert moved("buildq_worker_queue_lag_seconds_count") == 3
    assert moved("buildq_worker_queue_lag_seconds_count", delivery="redelivery") == 1
    assert total(after, "buildq_worker_active_workflows") == 0
    assert total(after, "buildq_worker_event_loop_lag_seconds_count") > 0
    aws = "buildq_aws_call_duration_seconds_count"
    assert moved(aws, operation="ReceiveMessage", outcome="ok") > 0
    # The duplicates' refused claims, and the retry's first claim: its message still
    # names "plan" as the next stage, already done, so the claim tried once more.
    assert moved(aws, operation="UpdateItem", outcome="conflict") == 3
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200


def test_healthz_is_503_once_the_receive_loop_stalls_with_free_slots() -> None:
    settings = WorkerSettings(receive_wait_seconds=1, aws_read_timeout=1, max_workflow_workers=1)
    # Store and queue are never called: the loop is not running.
    worker = Worker(settings, cast(Any, None), cast(Any, None), load_registry([]))
    port = free_port()

    async def probe(adjust: Callable[[], None]) -> int:
        adjust()
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/healthz")
        return response.status_code

    async def main() -> list[int]:
        async with serving(worker, "127.0.0.1", port):
            stalled_at = time.monotonic() - worker.stall_after - 1

            def stall() -> None:
                worker._receive_progress = stalled_at

            def busy() -> None:
                # Every slot taken: not a stall.
                worker._runs["m"] = ActiveRun(message=cast(Any, None))

            def waiting() -> None:
                worker._runs.clear()
                worker._waiting_for_slot = True

            def draining() -> None:
                worker._waiting_for_slot = False
                worker.request_shutdown()

            return [
                await probe(lambda: None),
                await probe(stall),
                await probe(busy),
                await probe(waiting),
                await probe(draining),
            ]

    assert asyncio.run(main()) == [200, 503, 200, 200, 200]
    assert worker.stall_after == 1 + 1 + 10


# -- the backlog signal ----------------------------------------------------------


def test_the_sweeper_lock_holder_writes_backlog_per_slot_as_emf(stack: Stack) -> None:
    stack.start_api()
    workers = [stack.start_worker(max_workflow_workers=2, sweep_interval=0.5) for _ in range(2)]
    with stack.http() as http:
        # Four long runs fill the fleet's four slots; six more wait in the queue.
        running = [create_demo(http, f"long{i}", stage_seconds=30) for i in range(4)]
        for project_id in running:
            stack.wait_for_status(http, project_id, {"BUILDING"}, timeout=20)
        for i in range(6):
            create_demo(http, f"waiting{i}")

    def backlog() -> list[dict[str, Any]]:
        return [record for worker in workers for record in worker.events("queue.backlog")]

    wanted = wait_until(
        lambda: [r for r in backlog() if r["VisibleMessages"] == 6 and r["WorkerSlots"] == 4],
        timeout=15,
        what="a backlog line with 6 visible messages and 4 slots",
    )
    record = wanted[-1]
    assert record["BacklogPerWorkerSlot"] == 1.5
    assert record["QueueName"] == stack.queue_name
    assert record["_aws"]["CloudWatchMetrics"] == [
        {
            "Namespace": "buildq",
            "Dimensions": [["QueueName"]],
            "Metrics": [
                {"Name": "BacklogPerWorkerSlot", "Unit": "None"},
                {"Name": "VisibleMessages", "Unit": "Count"},
                {"Name": "WorkerSlots", "Unit": "Count"},
            ],
        }
    ]
    assert isinstance(record["_aws"]["Timestamp"], int)
    # One value per interval from the fleet, not one per worker: over 3 s at 0.5 s,
    # about 6 lines (12 if both workers wrote them).
    start = len(backlog())
    time.sleep(3)
    assert len(backlog()) - start <= 8
