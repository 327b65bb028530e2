"""The versioned build-message contract.

A message carries ids, never the project's spec (claim-check pattern): the
DynamoDB record is the truth, the message is only a wake-up. Consumers must
tolerate duplicates, reordering and stale messages.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from buildq.clock import now_iso
from buildq.errors import MessageError

SCHEMA_VERSION = 1


class BuildReason(StrEnum):
    CREATE = "create"
    RETRY = "retry"
    REPLAY = "replay"
    SWEEP = "sweep"
    RELEASE = "release"  # a draining worker handed the project back


class BuildMessage(BaseModel):
    """``{"schema": 1, "tenant_id", "project_id", "reason", "enqueued_at", "traceparent",
    "next_stage", "attempt"}``"""

    # Unknown fields are ignored so a newer producer of the same schema version
    # can add optional fields without poisoning older consumers.
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    schema_version: StrictInt = Field(alias="schema")
    tenant_id: str = Field(min_length=1, max_length=128)
    project_id: str = Field(min_length=1, max_length=64)
    reason: BuildReason
    enqueued_at: str = Field(default_factory=now_iso)
    traceparent: str | None = None
    # Hints, not the truth: the stage the project will likely run next, which the claim
    # marks RUNNING in the same write, and the attempt the project was at when this was
    # sent (absent: 0, a new project). A stale hint costs the claim one more try.
    next_stage: str | None = Field(default=None, max_length=128)
    attempt: StrictInt | None = Field(default=None, ge=0)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"unknown message schema {value}")
        return value

    def encode(self) -> str:
        return self.model_dump_json(by_alias=True)


def build_message(
    tenant_id: str,
    project_id: str,
    reason: BuildReason,
    traceparent: str | None = None,
    *,
    next_stage: str | None = None,
    attempt: int | None = None,
) -> BuildMessage:
    return BuildMessage.model_validate(
        {
            "schema": SCHEMA_VERSION,
            "tenant_id": tenant_id,
            "project_id": project_id,
            "reason": reason,
            "traceparent": traceparent,
            "next_stage": next_stage,
            "attempt": attempt,
        }
    )


def decode(body: str | bytes) -> BuildMessage:
    """Parse a message body, or raise ``MessageError`` saying exactly what is wrong."""
    try:
        raw = BuildMessage.__pydantic_validator__.validate_json(body, strict=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        if first["type"] == "json_invalid":
            raise MessageError(f"message body is not JSON: {first['msg']}") from None
        if where == "schema" and first["type"] == "missing":
            raise MessageError("message has no schema version") from None
        if where == "schema":
            raise MessageError(
                f"unknown message schema {first.get('input')!r}; "
                f"this consumer reads {SCHEMA_VERSION}"
            ) from None
        raise MessageError(f"invalid message: {where}: {first['msg']}") from None
    assert isinstance(raw, BuildMessage)
    return raw
