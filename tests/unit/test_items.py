"""The DynamoDB item layout (buildq.items): exact round-trips and key shapes."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from buildq.items import (
    SWEEP_SHARDS,
    project_from_item,
    project_key,
    project_sk,
    project_to_item,
    stage_to_plain,
    sweep_shard,
    tenant_pk,
)
from buildq.models import ErrorInfo, Project, ProjectStatus, StageSnapshot, StageStatus

T0 = "2024-05-01T12:00:00.000Z"
T1 = "2024-05-01T12:00:05.123Z"
T2 = "2024-05-01T12:01:00.999Z"

NESTED_OUTPUT: dict[str, Any] = {
    "artifact": "s3://bucket/key.tar.gz",
    "size": 123456789012,
    "ratio": 0.1,
    "tiny": 1e-300,
    "huge": 1.7976931348623157e308,
    "negative": -2.5,
    "third": 1 / 3,
    "ok": True,
    "missing": None,
    "unicode": "héllo ✓ 日本",
    "nested": {"list": [1, 2.25, {"deep": [0.30000000000000004, None, False]}], "empty": {}},
    "empty_list": [],
}


def full_project() -> Project:
    """A BUILDING project whose stages are in every state."""
    return Project(
        tenant_id="tenant-a",
        project_id="01HZXPROJECT0000000000000A",
        name="my project",
        workflow="demo",
        parameters={"stage_seconds": 0.25, "fail_at_stage": None, "weights": [0.5, 1.5]},
        status=ProjectStatus.BUILDING,
        attempt=2,
        created_at=T0,
        updated_at=T2,
        started_at=T1,
        last_error=ErrorInfo(type="RetryableError", message="injected 'build' failure"),
        worker_id="worker-1",
        lease_owner="worker-1",
        lease_expires_at=1_714_564_860_000,
        cancel_requested=True,
        stages=(
            StageSnapshot(
                name="plan",
                status=StageStatus.SUCCEEDED,
                attempt=1,
                worker_id="worker-0",
                started_at=T0,
                finished_at=T1,
                output=NESTED_OUTPUT,
            ),
            StageSnapshot(name="lint", status=StageStatus.SKIPPED),
            StageSnapshot(
                name="build",
                status=StageStatus.FAILED,
                attempt=1,
                worker_id="worker-0",
                started_at=T1,
                finished_at=T2,
                error=ErrorInfo(type="ZeroDivisionError", message="division by zero"),
            ),
            StageSnapshot(
                name="test",
                status=StageStatus.RUNNING,
                attempt=2,
                worker_id="worker-1",
                started_at=T2,
            ),
            StageSnapshot(
                name="empty_output",
                status=StageStatus.SUCCEEDED,
                attempt=2,
                worker_id="worker-1",
                started_at=T2,
                finished_at=T2,
                output={},
            ),
            StageSnapshot(name="package"),
        ),
    )


def bare_project() -> Project:
    """A fresh project: every optional field None, all stages PENDING."""
    return Project(
        tenant_id="t",
        project_id="p",
        name="bare",
        workflow="demo",
        created_at=T0,
        updated_at=T0,
        stages=(StageSnapshot(name="plan"), StageSnapshot(name="build")),
    )


def attribute_types(item: dict[str, Any]) -> dict[str, str]:
    return {key: next(iter(value)) for key, value in item.items()}


# -- round-trips --------------------------------------------------------------------


@pytest.mark.parametrize("sweep_at", [None, 1_714_564_900_000])
def test_full_project_round_trips_exactly(sweep_at: int | None) -> None:
    project = full_project()
    assert project_from_item(dict(project_to_item(project, sweep_at=sweep_at))) == project


def test_bare_project_round_trips_exactly() -> None:
    project = bare_project()
    assert project_from_item(dict(project_to_item(project, sweep_at=None))) == project


def test_project_without_stages_round_trips() -> None:
    project = bare_project().model_copy(update={"stages": (), "parameters": {}})
    assert project_from_item(dict(project_to_item(project, sweep_at=None))) == project


@pytest.mark.parametrize("status", list(ProjectStatus))
def test_every_project_status_round_trips(status: ProjectStatus) -> None:
    project = bare_project().model_copy(update={"status": status, "attempt": 7})
    restored = project_from_item(dict(project_to_item(project, sweep_at=None)))
    assert restored.status is status
    assert restored.attempt == 7


def test_round_trip_keeps_stage_order_and_types() -> None:
    restored = project_from_item(dict(project_to_item(full_project(), sweep_at=None)))
    assert [stage.name for stage in restored.stages] == [
        "plan",
        "lint",
        "build",
        "test",
        "empty_output",
        "package",
    ]
    assert isinstance(restored.attempt, int)
    assert isinstance(restored.lease_expires_at, int)
    assert all(isinstance(stage.attempt, int) for stage in restored.stages)
    assert all(isinstance(stage.status, StageStatus) for stage in restored.stages)
    assert isinstance(restored.last_error, ErrorInfo)
    assert isinstance(restored.stage("build").error, ErrorInfo)


def test_nested_floats_in_outputs_and_parameters_are_exact() -> None:
    restored = project_from_item(dict(project_to_item(full_project(), sweep_at=None)))
    output = restored.stage("plan").output
    assert output == NESTED_OUTPUT
    assert output is not None
    assert type(output["ratio"]) is float
    assert output["ratio"] == 0.1
    assert output["third"] == 1 / 3
    assert output["nested"]["list"][2]["deep"][0] == 0.30000000000000004
    assert type(output["size"]) is int
    assert restored.parameters == {
        "stage_seconds": 0.25,
        "fail_at_stage": None,
        "weights": [0.5, 1.5],
    }
    assert restored.stage("empty_output").output == {}
    assert restored.stage("package").output is None


# -- layout -----------------------------------------------------------------------


def test_key_shapes() -> None:
    assert tenant_pk("tenant-a") == "TENANT#tenant-a"
    assert project_sk("01HZX") == "PROJECT#01HZX"
    assert project_key("tenant-a", "01HZX") == {
        "pk": {"S": "TENANT#tenant-a"},
        "sk": {"S": "PROJECT#01HZX"},
    }


def test_item_keys_and_plain_attributes() -> None:
    project = full_project()
    item = project_to_item(project, sweep_at=None)
    assert item["pk"] == {"S": "TENANT#tenant-a"}
    assert item["sk"] == {"S": "PROJECT#01HZXPROJECT0000000000000A"}
    assert item["entity"] == {"S": "project"}
    assert item["status"] == {"S": "BUILDING"}
    assert item["attempt"] == {"N": "2"}
    assert item["lease_expires_at"] == {"N": "1714564860000"}
    assert item["cancel_requested"] == {"BOOL": True}
    assert item["stage_order"] == {
        "L": [{"S": name} for name in ("plan", "lint", "build", "test", "empty_output", "package")]
    }


def test_parameters_and_outputs_are_stored_as_json_strings() -> None:
    item = project_to_item(full_project(), sweep_at=None)
    parameters = item["parameters"]
    assert set(parameters) == {"S"}
    assert json.loads(parameters["S"]) == full_project().parameters
    stages: Any = item["stages"]
    plan = stages["M"]["plan"]["M"]
    assert set(plan["output"]) == {"S"}
    assert json.loads(plan["output"]["S"]) == NESTED_OUTPUT


def test_none_fields_are_not_stored() -> None:
    item = project_to_item(bare_project(), sweep_at=None)
    for absent in (
        "started_at",
        "finished_at",
        "last_error",
        "worker_id",
        "lease_owner",
        "lease_expires_at",
        "sweep_shard",
        "sweep_at",
    ):
        assert absent not in item
    assert all("NULL" not in value for value in item.values())
    stages: Any = item["stages"]
    assert stages["M"]["plan"] == {"M": {"status": {"S": "PENDING"}, "attempt": {"N": "0"}}}


def test_stage_to_plain_skips_empty_fields() -> None:
    assert stage_to_plain(StageSnapshot(name="plan")) == {"status": "PENDING", "attempt": 0}
    failed = StageSnapshot(
        name="build",
        status=StageStatus.FAILED,
        attempt=3,
        started_at=T0,
        error=ErrorInfo(type="E", message="m"),
    )
    assert stage_to_plain(failed) == {
        "status": "FAILED",
        "attempt": 3,
        "started_at": T0,
        "error": {"type": "E", "message": "m"},
    }


def test_stage_to_plain_stores_output_as_compact_json() -> None:
    plain = stage_to_plain(StageSnapshot(name="s", output={"a": [1, 2], "b": 0.5}))
    assert plain["output"] == '{"a":[1,2],"b":0.5}'


def test_every_attribute_has_a_dynamodb_type() -> None:
    types = attribute_types(dict(project_to_item(full_project(), sweep_at=5)))
    assert types["pk"] == "S"
    assert types["attempt"] == "N"
    assert types["stages"] == "M"
    assert types["stage_order"] == "L"
    assert types["last_error"] == "M"
    assert types["sweep_at"] == "N"
    assert types["sweep_shard"] == "S"


# -- sweeper index --------------------------------------------------------------------


def test_sweep_attributes_only_with_sweep_at() -> None:
    project = full_project()
    without = project_to_item(project, sweep_at=None)
    assert "sweep_at" not in without
    assert "sweep_shard" not in without
    with_sweep = project_to_item(project, sweep_at=1_714_564_900_000)
    assert with_sweep["sweep_at"] == {"N": "1714564900000"}
    # The project is BUILDING: it is indexed in that status's shards.
    assert with_sweep["sweep_shard"] == {"S": sweep_shard(project.project_id, project.status)}
    assert with_sweep["sweep_shard"]["S"].startswith("SWEEP#B#")


def test_sweep_at_zero_is_still_stored() -> None:
    item = project_to_item(bare_project(), sweep_at=0)
    assert item["sweep_at"] == {"N": "0"}
    assert "sweep_shard" in item


def test_sweep_attributes_are_ignored_when_reading() -> None:
    project = bare_project()
    assert project_from_item(dict(project_to_item(project, sweep_at=123))) == project


PROJECT_IDS = [f"01HZX{i:021d}" for i in range(400)]


def test_sweep_shard_is_stable_and_well_formed() -> None:
    pattern = re.compile(r"^SWEEP#Q#(\d{2})$")
    for project_id in PROJECT_IDS:
        shard = sweep_shard(project_id)
        assert shard == sweep_shard(project_id)
        match = pattern.match(shard)
        assert match is not None, shard
        assert 0 <= int(match.group(1)) < SWEEP_SHARDS


def test_sweep_shard_known_values() -> None:
    # crc32-based, so the same id maps to the same shard in every process.
    assert sweep_shard("") == "SWEEP#Q#00"
    assert sweep_shard("01HZXPROJECT0000000000000A") == sweep_shard("01HZXPROJECT0000000000000A")
    assert sweep_shard("a") == "SWEEP#Q#03"
    assert sweep_shard("b") == "SWEEP#Q#09"
    # Each status in shards of its own: a pass reads each with its own cutoff.
    assert sweep_shard("a", ProjectStatus.BUILDING) == "SWEEP#B#03"
    assert sweep_shard("a", ProjectStatus.FAILED) == "SWEEP#F#03"


def test_sweep_shards_spread_over_every_shard() -> None:
    shards = {sweep_shard(project_id) for project_id in PROJECT_IDS}
    assert shards == {f"SWEEP#Q#{n:02d}" for n in range(SWEEP_SHARDS)}
