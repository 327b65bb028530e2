"""Leases survive clock skew between workers (invariant 13): real worker processes whose
wall clocks run 50 s fast or 30 s slow (libfaketime, preloaded from outside the code),
against the emulator's true clock.

Every buildq process keeps its time on AWS's clock (``buildq.clock``), so a skewed
worker neither takes a live lease, nor leaves a lease that outlives it by its skew,
nor sweeps a live project.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from buildq.messages import BuildReason, build_message
from tests.e2e.test_metrics import metrics_url, scrape, total
from tests.harness import Proc, Stack, create_demo, free_port, skewed_clock_env, wait_until

pytestmark = pytest.mark.e2e

# Short leases: a dead worker's project comes back within seconds. The visibility
# timeout is above lease + the clock margin (3 s): a dead worker's message comes back
# when its lease can be taken.
SKEW: dict[str, Any] = {"lease_seconds": 4, "visibility_timeout": 8}
MARGIN = 3.0  # BUILDQ_CLOCK_MARGIN_SECONDS's default
EMPTY = {"visible": 0, "in_flight": 0, "delayed": 0}


def project_of(http: httpx.Client, project_id: str) -> dict[str, Any]:
    body: dict[str, Any] = http.get(f"/v1/projects/{project_id}").json()
    return body


def claims(stack: Stack, project_id: str) -> list[dict[str, Any]]:
    return [e for e in stack.events("project.claimed") if e.get("project_id") == project_id]


def offset_seconds(worker: Proc) -> float:
    """The worker's latest estimate of its clock's offset to AWS's (``clock.offset``)."""
    logged = wait_until(lambda: worker.events("clock.offset"), timeout=10, what="clock.offset")
    return float(logged[-1]["offset_ms"]) / 1000


def test_libfaketime_skews_a_process_s_wall_clock_and_not_its_monotonic_clock() -> None:
    script = "import time; print(time.time(), time.monotonic())"
    env = {"PATH": "/usr/bin:/bin", **skewed_clock_env("+50s")}
    before = time.time(), time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    wall, monotonic = float(out[0]), float(out[1])
    assert 49 < wall - before[0] < 52
    assert 0 <= monotonic - before[1] < 2  # one system-wide monotonic clock, not faked


@pytest.mark.parametrize(
    ("holder", "claimer"),
    [(None, "+50s"), ("-30s", None)],
    ids=["claimer-50s-fast", "holder-30s-slow"],
)
def test_a_skewed_claim_never_takes_a_live_lease(
    stack: Stack, holder: str | None, claimer: str | None
) -> None:
    # The holder has one slot: the duplicate can only go to the other worker.
    stack.start_api()
    holding = stack.start_worker(clock_offset=holder, max_workflow_workers=1, **SKEW)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=2.5)  # 10 s in all
        stack.wait_for_stage(http, project_id, 0, "RUNNING")
        other = stack.start_worker(clock_offset=claimer, **SKEW)
        stack.send_raw(build_message("demo", project_id, BuildReason.SWEEP).encode())

        def first_answer() -> dict[str, Any] | None:
            answers = ("project.claimed", "message.dropped", "message.lease_expiring")
            return next(
                (
                    e
                    for e in other.events()
                    if e.get("event") in answers and e.get("project_id") == project_id
                ),
                None,
            )

        answer = wait_until(first_answer, timeout=15, what="the other worker's claim")
        assert answer["event"] != "project.claimed", "a skewed claim took a live lease"
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=30)
    assert done["status"] == "SUCCEEDED", done["last_error"]
    assert done["attempt"] == 1
    assert {(s["attempt"], s["worker_id"]) for s in done["stages"]} == {
        (1, f"worker-1-{stack.suffix}")
    }
    assert len(claims(stack, project_id)) == 1
    assert stack.events("project.lease_lost") == []
    skewed, expected = (other, -50.0) if claimer else (holding, 30.0)
    assert abs(offset_seconds(skewed) - expected) < 1.0  # its clock, put right
    # The duplicate is dropped once the project is done, not dead-lettered on the way.
    wait_until(lambda: stack.queue_depth() == EMPTY, timeout=20, what="the queue to drain")
    assert stack.dlq_messages() == []


def test_a_dead_fast_worker_s_project_comes_back_within_lease_visibility_and_margin(
    stack: Stack,
) -> None:
    stack.start_api()
    fast = stack.start_worker(clock_offset="+50s", **SKEW)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=2.0)
        stack.wait_for_stage(http, project_id, 1, "RUNNING")  # it has renewed its lease
        taker = stack.start_worker(**SKEW)
        fast.kill()
        died = time.monotonic()

        def taken_over() -> dict[str, Any] | None:
            body = project_of(http, project_id)
            return body if body["attempt"] == 2 else None

        # Without the fix the fast worker's lease outlives it by 50 s, and more.
        taken = wait_until(taken_over, timeout=40, what="another worker to take it over")
        took = time.monotonic() - died
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=30)
    assert abs(offset_seconds(fast) + 50) < 1.0
    bound = SKEW["lease_seconds"] + SKEW["visibility_timeout"] + MARGIN
    assert took < bound + 2, f"taken over {took:.1f}s after the death, over {bound}s"
    assert taken["worker_id"] == f"worker-2-{stack.suffix}"
    assert done["status"] == "SUCCEEDED", done["last_error"]
    assert done["attempt"] == 2
    plan = done["stages"][0]
    assert (plan["attempt"], plan["worker_id"]) == (1, f"worker-1-{stack.suffix}")
    first = taker.events("stage.started")[0]
    assert first["stage"] in ("generate", "build")  # resumed, not from the start
    wait_until(lambda: stack.queue_depth() == EMPTY, timeout=20, what="the queue to drain")
    assert stack.dlq_messages() == []


def test_a_fast_sweeper_does_not_re_enqueue_a_live_building_project(stack: Stack) -> None:
    stack.start_api()
    # The holder never sweeps (its first pass would be in an hour); one slot.
    stack.start_worker(max_workflow_workers=1, sweep_interval=3600, **SKEW)
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=2.0)  # 8 s in all
        stack.wait_for_stage(http, project_id, 0, "RUNNING")
        # The sweeper: 50 s fast, a pass every 0.5 s, BUILDING suspicious 1 s past its
        # lease. By its own clock every live lease expired 46 s ago.
        port = free_port()
        sweeper = stack.start_worker(
            clock_offset="+50s",
            sweep_interval=0.5,
            sweep_building_after=1,
            metrics_port=port,
            **SKEW,
        )

        def six_passes() -> list[dict[str, Any]] | None:
            lines = sweeper.events("queue.backlog")  # the lock holder's line, each pass
            return lines if len(lines) >= 6 else None

        passes = wait_until(six_passes, timeout=20, what="six sweeper passes")
        assert project_of(http, project_id)["status"] == "BUILDING"  # swept while live
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=30)
    assert len(passes) >= 6
    assert [e for e in stack.events("project.swept") if e.get("project_id") == project_id] == []
    assert done["status"] == "SUCCEEDED"
    assert done["attempt"] == 1
    assert len(claims(stack, project_id)) == 1
    assert abs(offset_seconds(sweeper) + 50) < 1.0
    gauge = total(scrape(metrics_url(port)), "buildq_clock_offset_seconds")
    assert abs(gauge + 50) < 1.0
