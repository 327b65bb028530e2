"""Workflows a deployment registers by import path, and sync stage code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.harness import Stack

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SETTINGS: dict[str, Any] = {
    "workflows": "tests.e2e.sample_workflows:WORKFLOWS",
    "max_attempts": 1,
}


@pytest.fixture
def custom(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # so the processes can import tests.e2e
    stack.start_api(**SETTINGS)
    stack.start_worker(visibility_timeout=2, lease_seconds=1, **SETTINGS)
    return stack


def _create(stack: Stack, workflow: str, **parameters: Any) -> dict[str, Any]:
    with stack.http() as http:
        response = http.post(
            "/v1/projects", json={"name": "x", "workflow": workflow, "parameters": parameters}
        )
        assert response.status_code == 202, response.text
        return stack.wait_for_status(
            http, response.json()["id"], {"SUCCEEDED", "FAILED", "CANCELLED"}, timeout=30
        )


def test_a_sync_stage_runs_in_a_thread_and_heartbeats_go_on(custom: Stack) -> None:
    done = _create(custom, "blocking", seconds=2.5)  # longer than the 2 s visibility
    assert done["status"] == "SUCCEEDED"
    assert done["attempt"] == 1
    output = done["stages"][0]["output"]
    assert output["thread"] != output["main"]
    assert len(custom.events("project.claimed")) == 1  # never redelivered
    assert custom.events("worker.event_loop_lag") == []


def test_a_stage_that_blocks_the_event_loop_is_reported(custom: Stack) -> None:
    done = _create(custom, "loop-blocker", seconds=1.0)
    assert done["status"] == "SUCCEEDED"
    lags = custom.events("worker.event_loop_lag")
    assert lags
    assert max(event["lag_ms"] for event in lags) >= 500


def test_a_workflow_s_own_timeout_fails_it(custom: Stack) -> None:
    done = _create(custom, "short-fuse", seconds=3.0)
    assert done["status"] == "FAILED"
    assert done["last_error"]["type"] == "WorkflowTimeoutError"
    assert done["stages"][0]["status"] == "FAILED"
    assert done["stages"][1]["status"] == "PENDING"


def test_the_api_knows_registered_workflows(custom: Stack) -> None:
    with custom.http() as http:
        unknown = http.post("/v1/projects", json={"name": "x", "workflow": "nope"})
    assert unknown.status_code == 422
    assert "blocking" in unknown.json()["detail"]
