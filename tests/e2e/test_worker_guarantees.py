"""Invariants 3-7, proven with real worker processes: kills, delays, duplicates."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import httpx
import pytest

from buildq.aws import aws_clients
from buildq.messages import BuildReason, build_message, decode
from buildq.models import Project, ProjectStatus
from buildq.queue import ReceivedMessage, SqsBuildQueue
from buildq.settings import WorkerSettings
from buildq.store import DynamoProjectStore, RunToken
from buildq.workflows.registry import load_registry
from buildq_worker.worker import Worker
from tests.e2e.test_metrics import metrics_url, scrape, total
from tests.harness import Proc, Stack, create_demo, free_port, wait_until

pytestmark = pytest.mark.e2e

STAGES = ["plan", "generate", "build", "package"]
# Short timeouts so that a dead worker's work comes back within seconds.
FAST = {"visibility_timeout": 3, "lease_seconds": 2}
EMPTY = {"visible": 0, "in_flight": 0, "delayed": 0}


def project_of(http: httpx.Client, project_id: str) -> dict[str, Any]:
    for _ in range(10):
        response = http.get(f"/v1/projects/{project_id}")
        if response.status_code != 503:  # 503: a busy emulator past the API's budget
            break
        time.sleep(float(response.headers.get("Retry-After", 1)))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def claims(stack: Stack, project_id: str) -> list[dict[str, Any]]:
    return [e for e in stack.events("project.claimed") if e.get("project_id") == project_id]


def test_heartbeats_keep_a_long_workflow_from_being_redelivered(stack: Stack) -> None:
    # Visibility 2 s, lease 1 s, a 12 s workflow, and a second worker ready to
    # take any redelivered message.
    stack.start_api()
    stack.start_worker(visibility_timeout=2, lease_seconds=1)
    stack.start_worker(visibility_timeout=2, lease_seconds=1)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=3)
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=40)
    assert done["status"] == "SUCCEEDED"
    assert done["attempt"] == 1
    assert {stage["attempt"] for stage in done["stages"]} == {1}
    assert len(claims(stack, project_id)) == 1
    assert stack.events("message.dropped") == []
    wait_until(lambda: stack.queue_depth() == EMPTY, timeout=5, what="the batched delete")


def test_a_killed_worker_s_project_resumes_elsewhere_from_its_last_stage(stack: Stack) -> None:
    stack.start_api()
    first = stack.start_worker(**FAST)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=1.0)

        def in_stage_three() -> bool:
            stages = project_of(http, project_id)["stages"]
            return bool(stages[2]["status"] == "RUNNING")

        wait_until(in_stage_three, timeout=20, what="stage 3 to run")
        first.kill()
        second = stack.start_worker(**FAST)
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=30)
    assert done["status"] == "SUCCEEDED"
    assert done["attempt"] == 2
    by_name = {stage["name"]: stage for stage in done["stages"]}
    first_id, second_id = f"worker-1-{stack.suffix}", f"worker-2-{stack.suffix}"
    # Stages 1-2 ran once, on the first worker; 3-4 on the second, attempt 2.
    for name in ("plan", "generate"):
        assert (by_name[name]["attempt"], by_name[name]["worker_id"]) == (1, first_id)
    for name in ("build", "package"):
        assert (by_name[name]["attempt"], by_name[name]["worker_id"]) == (2, second_id)
    started = [e["stage"] for e in second.events("stage.started")]
    assert started == ["build", "package"]
    wait_until(lambda: stack.queue_depth() == {"visible": 0, "in_flight": 0, "delayed": 0})


def test_a_worker_whose_lease_was_taken_over_writes_nothing_more(stack: Stack) -> None:
    stack.start_api()
    worker = stack.start_worker()
    dynamodb = stack.client("dynamodb")
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=1.5)
        wait_until(
            lambda: project_of(http, project_id)["stages"][1]["status"] == "RUNNING",
            timeout=20,
            what="stage 2 to run",
        )
        key = {"pk": {"S": "TENANT#demo"}, "sk": {"S": f"PROJECT#{project_id}"}}
        # Another worker claims it (as after a lease expiry): owner and attempt change.
        dynamodb.update_item(
            TableName=stack.table_name,
            Key=key,
            UpdateExpression="SET lease_owner = :o, attempt = attempt + :one, "
            "lease_expires_at = :far, worker_id = :o",
            ExpressionAttributeValues={
                ":o": {"S": "intruder"},
                ":one": {"N": "1"},
                ":far": {"N": str(int(time.time() * 1000) + 600_000)},
            },
        )
        taken = dynamodb.get_item(TableName=stack.table_name, Key=key, ConsistentRead=True)
        # The old owner's next write (stage end, heartbeat) fails; it stops the run.
        wait_until(lambda: worker.events("project.lease_lost"), timeout=15, what="lease lost")
        time.sleep(2)  # long enough for any stray stage or final write to land
        after = dynamodb.get_item(TableName=stack.table_name, Key=key, ConsistentRead=True)
        assert after["Item"] == taken["Item"]
        assert after["Item"]["status"]["S"] == "BUILDING"
        # ... and keeps serving other projects.
        other = create_demo(http, stage_seconds=0.05)
        assert stack.wait_for_status(http, other, {"SUCCEEDED"})["attempt"] == 1
    assert worker.alive()


def test_a_slot_is_free_once_its_workflow_ends_not_once_its_final_write_lands(
    stack: Stack,
) -> None:
    """Invariant 6 at the hand-off: a one-slot worker receives and claims the next
    message while the last run's final write goes out, never before its workflow has
    ended. An in-process worker on the real adapters, its final write held a moment."""
    stack.start_api()
    with stack.http() as http:
        ids = {create_demo(http, name, stage_seconds=0.05) for name in ("a", "b")}
    order: list[tuple[str, str]] = []
    both_done: list[asyncio.Event] = []  # made inside the worker's loop

    class SlowFinishStore(DynamoProjectStore):
        async def claim(self, tenant_id: str, project_id: str, **kwargs: Any) -> Project:
            project = await super().claim(tenant_id, project_id, **kwargs)
            order.append(("claimed", project_id))
            return project

        async def finish(self, token: RunToken, status: ProjectStatus, **kwargs: Any) -> None:
            order.append(("finishing", token.project_id))  # its workflow has ended
            await asyncio.sleep(0.5)  # far longer than a receive and a claim
            await super().finish(token, status, **kwargs)
            order.append(("finished", token.project_id))
            if sum(event == "finished" for event, _ in order) == 2:
                both_done[0].set()

    class RecordingQueue(SqsBuildQueue):
        async def receive(self, max_messages: int, **kwargs: Any) -> list[ReceivedMessage]:
            messages = await super().receive(max_messages, **kwargs)
            order.extend(("received", decode(m.body).project_id) for m in messages)
            return messages

    settings = WorkerSettings(
        table_name=stack.table_name,
        queue_name=stack.queue_name,
        dlq_name=stack.dlq_name,
        max_workflow_workers=1,
        receive_wait_seconds=1,
        drain_seconds=5,
    )

    async def main() -> None:
        async with aws_clients(settings) as clients:
            worker = Worker(
                settings,
                SlowFinishStore.from_settings(clients.dynamodb, settings),
                RecordingQueue.from_settings(clients.sqs, settings),
                load_registry([]),
            )
            both_done.append(asyncio.Event())
            running = asyncio.create_task(worker.run())
            async with asyncio.timeout(30):
                await both_done[0].wait()
            worker.request_shutdown()
            await running

    asyncio.run(main())
    first, second = (pid for event, pid in order if event == "claimed")
    assert {first, second} == ids
    at = {step: index for index, step in enumerate(order)}
    # One slot: the second message is received only once the first workflow ended...
    assert at["finishing", first] < at["received", second], order
    # ... and it is running before the first run's final write has landed.
    assert at["claimed", second] < at["finished", first], order


def test_the_same_message_three_times_runs_the_project_once(stack: Stack) -> None:
    stack.start_api()
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=0.3)  # its first message
        duplicate = build_message("demo", project_id, BuildReason.CREATE).encode()
        stack.send_raw(duplicate)
        stack.send_raw(duplicate)
        stack.start_worker()
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=30)
        wait_until(lambda: stack.queue_depth() == {"visible": 0, "in_flight": 0, "delayed": 0})
    assert done["status"] == "SUCCEEDED"
    assert done["attempt"] == 1
    assert len(claims(stack, project_id)) == 1
    assert len(stack.events("stage.started")) == 4
    assert len(stack.logged("message.dropped", project_id, count=2)) == 2


def test_sigterm_drains_finishes_the_short_and_releases_the_long(stack: Stack) -> None:
    # One attempt only: if a release used up an attempt, the taker could not run it.
    stack.start_api()
    draining = stack.start_worker(drain_seconds=3, max_attempts=1, **FAST)
    with stack.http() as http:
        short = create_demo(http, "short", stage_seconds=0.4)  # 1.6 s in all
        long = create_demo(http, "long", stage_seconds=2.0)  # 8 s in all
        wait_until(
            lambda: all(project_of(http, p)["status"] == "BUILDING" for p in (short, long)),
            timeout=20,
            what="both to build",
        )
        signalled = time.monotonic()
        draining.signal(signal.SIGTERM)
        code = draining.popen.wait(timeout=20)
        took = time.monotonic() - signalled
        assert code == 0, draining.log()[-3000:]
        assert took < 3 + 3, f"drain took {took:.1f}s"
        assert project_of(http, short)["status"] == "SUCCEEDED"
        released = project_of(http, long)
        assert released["status"] == "QUEUED"
        assert released["releases"] == 1
        done_before = [s["name"] for s in released["stages"] if s["status"] == "SUCCEEDED"]
        assert done_before, "the long project had finished at least one stage"
        assert all(s["status"] == "PENDING" for s in released["stages"][len(done_before) :])
        taker = stack.start_worker(max_attempts=1, **FAST)
        done = stack.wait_for_status(http, long, {"SUCCEEDED", "FAILED"}, timeout=30)
    assert done["status"] == "SUCCEEDED", done["last_error"]
    assert done["attempt"] == 2  # claims: the drained run and the taker's
    # The taker got a fresh message: the release did not count toward the redrive limit.
    (claim,) = taker.events("project.claimed")
    assert (claim["reason"], claim["receive_count"]) == ("release", 1)
    assert [e["stage"] for e in taker.events("stage.started")] == STAGES[len(done_before) :]
    wait_until(lambda: stack.queue_depth() == {"visible": 0, "in_flight": 0, "delayed": 0})
    assert stack.dlq_messages() == []


def test_a_second_sigterm_releases_at_once(stack: Stack) -> None:
    stack.start_api()
    worker = stack.start_worker(drain_seconds=60, **FAST)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=5)
        stack.wait_for_status(http, project_id, {"BUILDING"}, timeout=20)
        signalled = time.monotonic()
        worker.signal(signal.SIGTERM)
        wait_until(lambda: worker.events("worker.drain_waiting"), timeout=5)
        worker.signal(signal.SIGTERM)
        assert worker.popen.wait(timeout=15) == 0
        assert time.monotonic() - signalled < 5
        released = project_of(http, project_id)
    assert released["status"] == "QUEUED"
    assert released["releases"] == 1
    depth = stack.queue_depth()
    assert depth["visible"] == 1, depth  # a fresh message, visible at once
    # It hints the attempt the project is at, so the next claim needs no second try.
    (peeked,) = stack.client("sqs").receive_message(
        QueueUrl=stack.queue_url(), VisibilityTimeout=0, WaitTimeSeconds=0
    )["Messages"]
    hints = json.loads(peeked["Body"])
    assert (hints["reason"], hints["attempt"]) == ("release", released["attempt"])


def _check_no_overlap(stack: Stack, deaths: dict[str, float]) -> None:
    """No project ran in two places at once: each run ended before the next claim."""
    ends: dict[tuple[str, int], float] = {}
    for event in stack.events():
        name = event.get("event", "")
        # project.lease_lost: the run stopped (its lease ran out locally, or another
        # worker was found owning it), its stage cancelled, nothing more written.
        ends_run = ("succeeded", "released", "retry_scheduled", "lease_lost")
        if name.removeprefix("project.") in ends_run and name.startswith("project."):
            ends[(event["project_id"], event["attempt"])] = epoch(event["timestamp"])
    runs: dict[str, list[tuple[int, float, str]]] = defaultdict(list)
    for event in stack.events("project.claimed"):
        runs[event["project_id"]].append(
            (event["attempt"], epoch(event["timestamp"]), event["worker_id"])
        )
    for project_id, claimed in runs.items():
        # A worker killed right after its claim never logged it: attempts may have
        # gaps, but each logged attempt is unique and later attempts start later.
        claimed.sort()
        attempts = [attempt for attempt, _, _ in claimed]
        assert len(set(attempts)) == len(attempts), (project_id, attempts)
        starts = [start for _, start, _ in claimed]
        assert starts == sorted(starts), (project_id, claimed)
        for (attempt, _, worker), (_, next_start, _) in itertools.pairwise(claimed):
            end = ends.get((project_id, attempt), deaths.get(worker))
            assert end is not None, f"{project_id} attempt {attempt}: no end and no death"
            assert end <= next_start + 0.05, (project_id, attempt, end, next_start)


def test_chaos_kill_a_random_worker_every_second(stack: Stack) -> None:
    settings = {**FAST, "max_attempts": 50, "max_workflow_workers": 5}
    # The queue's redrive backstop follows the attempt budget, as `buildq bootstrap`
    # sets it in a deployment: every kill costs a message a receive.
    stack.bootstrap(max_attempts=settings["max_attempts"])
    stack.start_api()
    deaths: dict[str, float] = {}
    rng = random.Random(7)
    with stack.http() as http, ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda i: create_demo(http, f"c{i}", stage_seconds=0.5), range(200)))
        workers: list[Proc] = [stack.start_worker(**settings) for _ in range(3)]
        deadline = time.monotonic() + 100
        kills = 0

        def unfinished() -> list[str]:
            page_ids: set[str] = set()
            cursor = None
            while True:
                params: dict[str, Any] = {"limit": 100}
                if cursor:
                    params["cursor"] = cursor
                response = http.get("/v1/projects", params=params)
                if response.status_code == 503:
                    # A busy emulator past the API's 1.5 s budget: the answer a client
                    # is told to retry (Retry-After), not a failure of the guarantee.
                    time.sleep(float(response.headers.get("Retry-After", 1)))
                    continue
                assert response.status_code == 200, response.text
                page = response.json()
                page_ids |= {p["id"] for p in page["items"] if p["status"] == "SUCCEEDED"}
                cursor = page["next_cursor"]
                if not cursor:
                    return [i for i in ids if i not in page_ids]

        while unfinished() and time.monotonic() < deadline:
            if kills < 20:
                victim = rng.choice([w for w in workers if w.alive()])
                deaths[f"{victim.name}-{stack.suffix}"] = victim.kill()
                kills += 1
                workers.append(stack.start_worker(**settings))
            time.sleep(1)
        left = unfinished()
        assert left == [], f"{len(left)} projects unfinished after {kills} kills"
        projects = [project_of(http, i) for i in ids]
    assert kills >= 5, "the chaos ended before it began: make the workload longer"
    for project in projects:
        assert project["status"] == "SUCCEEDED"
        stages = project["stages"]
        assert [s["status"] for s in stages] == ["SUCCEEDED"] * 4
        for before, after in itertools.pairwise(stages):
            assert before["finished_at"] <= after["started_at"]
            assert before["attempt"] <= after["attempt"] <= project["attempt"]
    _check_no_overlap(stack, deaths)
    wait_until(
        lambda: stack.queue_depth() == {"visible": 0, "in_flight": 0, "delayed": 0},
        timeout=30,
        what="the queue to drain",
    )
    assert stack.dlq_messages() == []


def test_finished_messages_are_deleted_in_batches_and_flushed_at_shutdown(stack: Stack) -> None:
    # A finished run frees its slot at once and leaves its delete to a batcher; a
    # stopping worker sends what is still pending. Visibility 60 s: a message left
    # undeleted would still be in flight when the test looks.
    stack.start_api()
    with stack.http() as http:
        for i in range(10):
            create_demo(http, f"p{i}", stage_seconds=0)
    port = free_port()
    worker = stack.start_worker(metrics_port=port, visibility_timeout=60)
    url = metrics_url(port)
    deleted = "buildq_worker_messages_deleted_total"
    wait_until(lambda: total(scrape(url), deleted) == 10, timeout=30, what="10 deletes")
    aws = "buildq_aws_call_duration_seconds_count"
    wait_until(lambda: stack.queue_depth() == EMPTY, timeout=5, what="the deletes to be sent")
    samples = scrape(url)
    assert total(samples, aws, operation="DeleteMessage") == 0
    batches = total(samples, aws, operation="DeleteMessageBatch", outcome="ok")
    assert 1 <= batches < 10, batches  # five slots finish together: they share calls
    with stack.http() as http:
        last = create_demo(http, "last", stage_seconds=0.5)
    wait_until(
        lambda: any(e["stage"] == "package" for e in stack.logged("stage.started", last)),
        timeout=15,
        what="the last stage",
    )
    # The drain lets the run finish; the worker exits right after its delete is queued.
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(timeout=20) == 0
    assert stack.logged("project.succeeded", last)
    assert stack.queue_depth() == EMPTY
