"""The on-call CLI against the emulator, with real worker processes."""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

import pytest

from tests.harness import BIN, Stack, create_demo, wait_until

pytestmark = pytest.mark.e2e

FAST: dict[str, Any] = {"visibility_timeout": 3, "lease_seconds": 2}
EMPTY = {"visible": 0, "in_flight": 0, "delayed": 0}


def cli_json(stack: Stack, *args: str, **settings: Any) -> Any:
    result = stack.cli(*args, "--json", **settings)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def audit(result: subprocess.CompletedProcess[str], event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def fail_permanently(stack: Stack, n: int) -> list[str]:
    """``n`` projects that fail permanently on their first attempt only."""
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
    wait_until(lambda: len(cli_json(stack, "dlq", "list")) == n, timeout=10)
    return ids


def test_a_failed_project_is_listed_shown_replayed_and_succeeds(stack: Stack) -> None:
    stack.start_api()
    stack.start_worker(**FAST)
    (project_id,) = fail_permanently(stack, 1)
    (entry,) = cli_json(stack, "dlq", "list")
    assert entry["project_id"] == project_id
    assert entry["tenant_id"] == "demo"
    assert entry["error_type"] == "PermanentError"
    assert "injected permanent failure" in entry["error_message"]
    assert entry["attempts"] == 1
    assert cli_json(stack, "dlq", "list") == [entry]  # peeking consumed nothing
    shown = cli_json(stack, "dlq", "show", project_id)
    assert shown["project"]["status"] == "FAILED"
    assert shown["project"]["last_error"]["type"] == "PermanentError"

    result = stack.cli("dlq", "replay", "--project", project_id, "--yes")
    assert result.returncode == 0, result.stderr
    assert "replayed 1, skipped 0, errors 0" in result.stdout
    (line,) = audit(result, "dlq.replayed")
    assert line["project_id"] == project_id
    with stack.http() as http:
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=20)
    assert done["status"] == "SUCCEEDED"
    assert done["attempt"] == 2
    assert cli_json(stack, "dlq", "list") == []
    assert stack.queue_depth(dlq=True)["visible"] == 0


def test_dry_run_changes_nothing_and_filters_pick_only_their_messages(stack: Stack) -> None:
    stack.start_api()
    worker = stack.start_worker(**FAST)
    first, second = fail_permanently(stack, 2)
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(10) == 0
    items_before = sorted(
        json.dumps(i, sort_keys=True)
        for i in stack.table_items()
        if i["sk"]["S"].startswith("PROJECT#")
    )
    dry = stack.cli("dlq", "replay", "--all", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would replay 2" in dry.stdout
    assert stack.queue_depth() == EMPTY
    assert stack.queue_depth(dlq=True)["visible"] == 2
    items_after = sorted(
        json.dumps(i, sort_keys=True)
        for i in stack.table_items()
        if i["sk"]["S"].startswith("PROJECT#")
    )
    assert items_after == items_before

    only = cli_json(stack, "dlq", "replay", "--project", second, "--yes")
    assert only["replayed"] == [second]
    assert [e["project_id"] for e in cli_json(stack, "dlq", "list")] == [first]
    none = cli_json(stack, "dlq", "replay", "--reason-contains", "no such reason", "--yes")
    assert none["matched"] == 0
    assert cli_json(stack, "projects", "get", first)["status"] == "FAILED"
    assert cli_json(stack, "projects", "get", second, "--tenant", "demo")["status"] == "QUEUED"


def test_two_replays_at_once_run_each_project_once(stack: Stack) -> None:
    stack.start_api()
    worker = stack.start_worker(**FAST)
    ids = fail_permanently(stack, 4)
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(10) == 0
    procs = [
        subprocess.Popen(
            [str(BIN / "buildq"), "dlq", "replay", "--all", "--yes", "--json"],
            env=stack.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    replayed = [pid for out, _ in outputs for pid in json.loads(out)["replayed"]]
    assert sorted(replayed) == sorted(ids)  # each exactly once, across both
    stack.start_worker(**FAST)
    with stack.http() as http:
        for project_id in ids:
            done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=30)
            assert (done["status"], done["attempt"]) == ("SUCCEEDED", 2)
    wait_until(lambda: stack.queue_depth() == EMPTY, timeout=15)
    assert stack.queue_depth(dlq=True)["visible"] == 0


def test_a_replay_killed_between_send_and_delete_loses_nothing_and_runs_once(
    stack: Stack,
) -> None:
    stack.start_api()
    worker = stack.start_worker(**FAST)
    (project_id,) = fail_permanently(stack, 1)
    worker.signal(signal.SIGTERM)
    assert worker.popen.wait(10) == 0
    crashed = stack.cli(
        "dlq", "replay", "--all", "--yes", crash_at="dlq.replay.after_send", dlq_hold_seconds=3
    )
    assert crashed.returncode == 137, crashed.stderr
    # The project is QUEUED with its new message, and the DLQ message is still there.
    assert cli_json(stack, "projects", "get", project_id)["status"] == "QUEUED"
    assert stack.queue_depth()["visible"] == 1
    # The new message carries the claim's hints: the project's attempt and the stage
    # that failed (the first still to run). Peeked with visibility 0: it stays queued.
    (peeked,) = stack.client("sqs").receive_message(
        QueueUrl=stack.queue_url(), VisibilityTimeout=0, WaitTimeSeconds=0
    )["Messages"]
    hints = json.loads(peeked["Body"])
    assert (hints["reason"], hints["attempt"], hints["next_stage"]) == ("replay", 1, "build")
    wait_until(lambda: len(cli_json(stack, "dlq", "list")) == 1, timeout=15)
    # Run again: the stale DLQ message is cleared, nothing is sent twice.
    again = cli_json(stack, "dlq", "replay", "--all", "--yes")
    assert again["replayed"] == []
    assert again["skipped"][0]["reason"] == "project is QUEUED, not FAILED"
    assert stack.queue_depth()["visible"] == 1
    stack.start_worker(**FAST)
    with stack.http() as http:
        done = stack.wait_for_status(http, project_id, {"SUCCEEDED", "FAILED"}, timeout=20)
    assert (done["status"], done["attempt"]) == ("SUCCEEDED", 2)
    assert cli_json(stack, "dlq", "list") == []


def test_queue_stats_and_workers(stack: Stack) -> None:
    stack.start_api()
    with stack.http() as http:
        for i in range(3):
            create_demo(http, f"q{i}")
    stats = cli_json(stack, "queue", "stats")
    assert (stats["visible"], stats["in_flight"], stats["dlq"]) == (3, 0, 0)
    assert stats["oldest_queued_seconds"] >= 0
    assert stats["live_workers"] == 0
    assert stats["backlog_per_slot"] is None

    settings: dict[str, Any] = {"presence_interval": 0.5, "max_workflow_workers": 2, **FAST}
    first = stack.start_worker(**settings)
    stack.start_worker(**settings)
    workers = wait_until(lambda: _workers_when(stack, 2), timeout=10)
    assert {w["worker_id"] for w in workers} == {
        f"worker-1-{stack.suffix}",
        f"worker-2-{stack.suffix}",
    }
    assert all(w["slots_total"] == 2 for w in workers)
    first.signal(signal.SIGTERM)
    assert first.popen.wait(10) == 0
    (left,) = wait_until(lambda: _workers_when(stack, 1), timeout=10)
    assert left["worker_id"] == f"worker-2-{stack.suffix}"
    stats = cli_json(stack, "queue", "stats")
    assert stats["worker_slots"] == 2


def _workers_when(stack: Stack, count: int) -> list[dict[str, Any]] | None:
    workers: list[dict[str, Any]] = cli_json(stack, "workers")
    return workers if len(workers) == count else None


def test_purge_and_usage_errors(stack: Stack) -> None:
    stack.start_api()
    worker = stack.start_worker(**FAST)
    ids = fail_permanently(stack, 2)
    worker.signal(signal.SIGTERM)
    kept = stack.cli("dlq", "purge", "--older-than", "1d", "--yes")
    assert kept.returncode == 0, kept.stderr
    assert "purged 0" in kept.stdout
    purged = stack.cli("dlq", "purge", "--yes")
    assert "purged 2" in purged.stdout
    assert cli_json(stack, "dlq", "list") == []
    for project_id in ids:
        assert cli_json(stack, "projects", "get", project_id)["status"] == "FAILED"
    assert stack.cli("dlq", "replay").returncode == 2  # no selection
    assert stack.cli("dlq", "purge", "--older-than", "soon").returncode == 2
    asked = stack.cli("dlq", "purge")  # no --yes, no terminal: refuses
    assert asked.returncode == 1
    missing = stack.cli("projects", "get", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert missing.returncode == 1
    assert "no project" in missing.stderr
    listed = cli_json(stack, "projects", "list", "--status", "FAILED")
    assert sorted(p["project_id"] for p in listed) == sorted(ids)
