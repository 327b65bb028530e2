"""buildq next to Celery on a SIGKILL and on a task longer than the visibility timeout,
measured on one project each (the side-by-side issue 7 asks for).

Both run the demo workflow's four stages with real stage time under a 2 s visibility
timeout (buildq: ``BUILDQ_VISIBILITY_TIMEOUT=2``, lease 1 s; Celery: kombu's
``visibility_timeout`` of 2 s), and count how often the work and each stage started.
The long task takes 4 x 1.5 s; the crashed one 4 x 0.3 s, shorter than the visibility
timeout, so that only the crash can cause a second run.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any

from bench.stack import ROOT, Proc, Stack, epoch, wait_until

VISIBILITY = 2  # seconds, both systems
LEASE = 1  # buildq's lease, below the visibility timeout
STAGE_NAMES = ("plan", "generate", "build", "package")


@dataclass
class Outcome:
    case: str
    system: str
    executions: int  # how many times the work started (claims; Celery task starts)
    stage_starts: dict[str, int] = field(default_factory=dict)
    resumed_after: float | None = None  # SIGKILL → the next stage start, s
    final_status: str = ""
    note: str = ""


def _celery(stack: Stack, queue: str, name: str) -> Proc:
    env = {
        **stack.env(),
        "BENCH_CELERY_QUEUE": queue,
        "BENCH_CELERY_VISIBILITY": str(VISIBILITY),
        "PYTHONPATH": str(ROOT),
    }
    proc = stack.start_celery(name, queue, env, threads=5)
    stack.wait_started(proc, needle="ready.")
    return proc


def _item(stack: Stack, project_id: str) -> dict[str, Any]:
    items = [item for item in stack.projects() if item["project_id"] == project_id]
    return items[0] if items else {}


def _send_celery(stack: Stack, queue: str, project_id: str, stage_seconds: float) -> None:
    from bench import peer_celery

    peer_celery.configure(stack.emulator.endpoint, queue)
    options = {**peer_celery.app.conf.broker_transport_options, "visibility_timeout": VISIBILITY}
    # A connection of its own: kombu creates the queue on the first send, with this
    # visibility timeout, and the queue is named outright (nothing cached elsewhere).
    with peer_celery.app.connection_for_write(transport_options=options) as connection:
        peer_celery.long_project.apply_async(
            args=["demo", project_id, stage_seconds], connection=connection, queue=queue
        )


def celery_long_task(stack: Stack, stage_seconds: float, limit: float) -> Outcome:
    queue = f"bench-celery-long-{stack.suffix}"
    (project_id,) = stack.create(1, stage_seconds=0)
    _send_celery(stack, queue, project_id, stage_seconds)
    proc = _celery(stack, queue, "celery-long")
    deadline = time.monotonic() + limit
    # Until the message is gone for good, or the time limit.
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if proc.count("succeeded in") >= 1 and stack.queue_depth(queue) == 0:
            break
    item = _item(stack, project_id)
    gone = stack.queue_depth(queue) == 0
    proc.kill()
    return Outcome(
        case=f"a task of 4 x {stage_seconds:g} s under a {VISIBILITY} s visibility timeout",
        system="Celery",
        executions=int(item.get("executions", 0)),
        stage_starts={stage: int(item.get(f"starts_{stage}", 0)) for stage in STAGE_NAMES},
        final_status=str(item.get("status", "")),
        note="" if gone else f"the message was still on the queue after {limit:g} s",
    )


def celery_sigkill(stack: Stack, stage_seconds: float, limit: float) -> Outcome:
    queue = f"bench-celery-kill-{stack.suffix}"
    (project_id,) = stack.create(1, stage_seconds=0)
    _send_celery(stack, queue, project_id, stage_seconds)
    first = _celery(stack, queue, "celery-kill-1")

    def in_build() -> bool:
        stages = _item(stack, project_id).get("stages", {})
        return bool(stages.get("build", {}).get("status") == "RUNNING")

    wait_until(in_build, timeout=60, interval=0.1, what="the third stage to start")
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait()
    killed = time.time()
    second = _celery(stack, queue, "celery-kill-2")

    def done() -> bool:
        return second.count("succeeded in") >= 1

    wait_until(done, timeout=limit, interval=0.2, what="the task to finish elsewhere")
    item = _item(stack, project_id)
    second.kill()
    restarted = item.get("stages", {}).get("plan", {}).get("started_at")
    return Outcome(
        case="SIGKILL during stage 3 of 4, another worker started at once",
        system="Celery",
        executions=int(item.get("executions", 0)),
        stage_starts={stage: int(item.get(f"starts_{stage}", 0)) for stage in STAGE_NAMES},
        resumed_after=epoch(restarted) - killed if restarted else None,
        final_status=str(item.get("status", "")),
    )


def _buildq_starts(workers: list[Proc], project_id: str) -> tuple[int, dict[str, int]]:
    claims = sum(
        1 for w in workers for e in w.events("project.claimed") if e.get("project_id") == project_id
    )
    starts = dict.fromkeys(STAGE_NAMES, 0)
    for worker in workers:
        for event in worker.events("stage.started"):
            if event.get("project_id") == project_id and event.get("stage") in starts:
                starts[event["stage"]] += 1
    return claims, starts


def buildq_long_task(stack: Stack, stage_seconds: float, limit: float) -> Outcome:
    worker = stack.start_worker(visibility_timeout=VISIBILITY, lease_seconds=LEASE)
    (project_id,) = stack.create(1, stage_seconds=stage_seconds)
    stack.wait_succeeded(1, timeout=limit, procs=[worker])
    time.sleep(VISIBILITY + 0.5)  # a redelivery, if any, would show by now
    claims, starts = _buildq_starts([worker], project_id)
    worker.kill()
    stack.workers.clear()
    return Outcome(
        case=f"a task of 4 x {stage_seconds:g} s under a {VISIBILITY} s visibility timeout",
        system="buildq",
        executions=claims,
        stage_starts=starts,
        final_status=str(_item(stack, project_id).get("status", "")),
    )


def buildq_sigkill(stack: Stack, stage_seconds: float, limit: float) -> Outcome:
    first = stack.start_worker(visibility_timeout=VISIBILITY, lease_seconds=LEASE)
    (project_id,) = stack.create(1, stage_seconds=stage_seconds)

    def in_build() -> bool:
        return any(
            e.get("project_id") == project_id and e.get("stage") == "build"
            for e in first.events("stage.started")
        )

    wait_until(in_build, timeout=60, interval=0.1, what="the third stage to start")
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait()
    killed = time.time()
    second = stack.start_worker(visibility_timeout=VISIBILITY, lease_seconds=LEASE)
    stack.wait_succeeded(1, timeout=limit, procs=[second])
    claims, starts = _buildq_starts([first, second], project_id)
    resumed = [
        epoch(e["timestamp"])
        for e in second.events("stage.started")
        if e.get("project_id") == project_id
    ]
    second.kill()
    stack.workers.clear()
    return Outcome(
        case="SIGKILL during stage 3 of 4, another worker started at once",
        system="buildq",
        executions=claims,
        stage_starts=starts,
        resumed_after=min(resumed) - killed if resumed else None,
        final_status=str(_item(stack, project_id).get("status", "")),
    )


def run_all(stack: Stack) -> list[Outcome]:
    """Celery first (no buildq worker may run while the API's own messages for Celery's
    projects sit on the build queue), then buildq on an emptied queue."""
    outcomes = [
        celery_long_task(stack, stage_seconds=1.5, limit=20),
        celery_sigkill(stack, stage_seconds=0.3, limit=30),
    ]
    stack.client("sqs").purge_queue(QueueUrl=stack.queue_url())
    outcomes += [
        buildq_long_task(stack, stage_seconds=1.5, limit=30),
        buildq_sigkill(stack, stage_seconds=0.3, limit=30),
    ]
    return outcomes
