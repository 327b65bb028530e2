"""How a project is laid out in the single DynamoDB table.

- Project: ``pk = TENANT#<tenant>``, ``sk = PROJECT#<ulid>``; ULIDs sort by
  creation time, so a tenant's list is one Query, newest first.
- Stages live inside the project item (a map keyed by stage name plus the
  ordered ``stage_order`` list), so a stage write is one small UpdateItem and a
  read of the project is one GetItem.
- ``parameters`` and stage ``output`` are stored as JSON strings: exact
  round-trips with no float/Decimal conversions.
- While QUEUED or BUILDING (or FAILED until the DLQ holds its failure),
  ``sweep_shard`` / ``sweep_at`` put the project in the sparse, sharded sweeper
  index, each status in shards of its own; they are removed when it ends.
"""

from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer

from buildq.models import ErrorInfo, Project, ProjectStatus, StageSnapshot

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb.type_defs import AttributeValueTypeDef

Item = dict[str, "AttributeValueTypeDef"]

SWEEP_INDEX = "sweep"
SWEEP_SHARDS = 16
TTL_ATTRIBUTE = "expires_at"  # epoch seconds; DynamoDB deletes expired items (locks)

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


def tenant_pk(tenant_id: str) -> str:
    return f"TENANT#{tenant_id}"


def project_sk(project_id: str) -> str:
    return f"PROJECT#{project_id}"


def project_key(tenant_id: str, project_id: str) -> Item:
    return {"pk": {"S": tenant_pk(tenant_id)}, "sk": {"S": project_sk(project_id)}}


# The sweeper index keeps each status apart (its own shards), so a pass queries each
# with its own cutoff and reads only what is due, whatever the backlog.
SWEEP_CLASSES: dict[ProjectStatus, str] = {
    ProjectStatus.QUEUED: "Q",
    ProjectStatus.BUILDING: "B",
    ProjectStatus.FAILED: "F",  # until its failure is on the DLQ
}


def shard_key(shard: int, status: ProjectStatus = ProjectStatus.QUEUED) -> str:
    return f"SWEEP#{SWEEP_CLASSES[status]}#{shard:02d}"


def idempotency_sk(key: str) -> str:
    return f"IDEMPOTENCY#{key}"


def api_key_key(key_hash: str) -> Item:
    """API keys are stored by their SHA-256 only, never in clear."""
    return {"pk": {"S": f"APIKEY#{key_hash}"}, "sk": {"S": "APIKEY"}}


def sweep_shard(project_id: str, status: ProjectStatus = ProjectStatus.QUEUED) -> str:
    """The sweeper index shard of a project in ``status``: spreads active projects over
    partitions, each status in shards of its own."""
    return shard_key(zlib.crc32(project_id.encode()) % SWEEP_SHARDS, status)


def to_attr(value: Any) -> AttributeValueTypeDef:
    attr: AttributeValueTypeDef = _serializer.serialize(value)
    return attr


def _error_to_plain(error: ErrorInfo | None) -> dict[str, str] | None:
    return None if error is None else {"type": error.type, "message": error.message}


def stage_to_plain(stage: StageSnapshot) -> dict[str, Any]:
    """A stage snapshot as the map stored under ``stages.<name>`` (no empty fields)."""
    plain: dict[str, Any] = {"status": stage.status.value, "attempt": stage.attempt}
    for field in ("worker_id", "started_at", "finished_at"):
        value = getattr(stage, field)
        if value is not None:
            plain[field] = value
    if stage.output is not None:
        plain["output"] = json.dumps(stage.output, separators=(",", ":"))
    if stage.error is not None:
        plain["error"] = _error_to_plain(stage.error)
    return plain


def project_to_item(project: Project, *, sweep_at: int | None) -> Item:
    plain: dict[str, Any] = {
        "pk": tenant_pk(project.tenant_id),
        "sk": project_sk(project.project_id),
        "entity": "project",
        "tenant_id": project.tenant_id,
        "project_id": project.project_id,
        "name": project.name,
        "workflow": project.workflow,
        "parameters": json.dumps(project.parameters, separators=(",", ":")),
        "status": project.status.value,
        "attempt": project.attempt,
        "releases": project.releases,
        "attempt_base": project.attempt_base,
        "created_at": project.created_at,
        "updated_at": project.updated_at,
        "cancel_requested": project.cancel_requested,
        "stage_order": [stage.name for stage in project.stages],
        "stages": {stage.name: stage_to_plain(stage) for stage in project.stages},
    }
    optional = {
        "started_at": project.started_at,
        "finished_at": project.finished_at,
        "last_error": _error_to_plain(project.last_error),
        "worker_id": project.worker_id,
        "lease_owner": project.lease_owner,
        "lease_expires_at": project.lease_expires_at,
        "retry_at": project.retry_at,
        "dead_lettered_attempt": project.dead_lettered_attempt,
    }
    plain.update({key: value for key, value in optional.items() if value is not None})
    if sweep_at is not None:
        plain["sweep_shard"] = sweep_shard(project.project_id, project.status)
        plain["sweep_at"] = sweep_at
    return {key: to_attr(value) for key, value in plain.items()}


def from_attr(value: Any) -> Any:
    return _deserializer.deserialize(value)


def _plain(item: dict[str, Any]) -> dict[str, Any]:
    return {key: _deserializer.deserialize(value) for key, value in item.items()}


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def project_from_item(item: dict[str, Any]) -> Project:
    plain = _plain(item)
    stages_map: dict[str, Any] = plain.get("stages", {})
    stages = []
    for name in plain.get("stage_order", []):
        raw = dict(stages_map.get(name, {}))
        if "output" in raw:
            raw["output"] = json.loads(raw["output"])
        raw["attempt"] = _int(raw.get("attempt")) or 0
        stages.append(StageSnapshot(name=name, **raw))
    return Project(
        tenant_id=plain["tenant_id"],
        project_id=plain["project_id"],
        name=plain["name"],
        workflow=plain["workflow"],
        parameters=json.loads(plain.get("parameters", "{}")),
        status=plain["status"],
        attempt=_int(plain.get("attempt")) or 0,
        releases=_int(plain.get("releases")) or 0,
        attempt_base=_int(plain.get("attempt_base")) or 0,
        created_at=plain["created_at"],
        updated_at=plain["updated_at"],
        started_at=plain.get("started_at"),
        finished_at=plain.get("finished_at"),
        last_error=plain.get("last_error"),
        worker_id=plain.get("worker_id"),
        lease_owner=plain.get("lease_owner"),
        lease_expires_at=_int(plain.get("lease_expires_at")),
        cancel_requested=bool(plain.get("cancel_requested", False)),
        retry_at=_int(plain.get("retry_at")),
        dead_lettered_attempt=_int(plain.get("dead_lettered_attempt")),
        stages=tuple(stages),
    )
