"""The versioned build-message contract (buildq.messages)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from buildq.errors import MessageError
from buildq.messages import (
    SCHEMA_VERSION,
    BuildMessage,
    BuildReason,
    build_message,
    decode,
)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def valid_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": 1,
        "tenant_id": "tenant-a",
        "project_id": "01HZXPROJECT",
        "reason": "create",
        "enqueued_at": "2024-05-01T12:00:00.000Z",
        "traceparent": None,
    }
    body.update(changes)
    return body


def test_schema_version_is_one() -> None:
    assert SCHEMA_VERSION == 1


@pytest.mark.parametrize("reason", list(BuildReason))
@pytest.mark.parametrize("traceparent", [None, TRACEPARENT])
def test_build_encode_decode_round_trip(reason: BuildReason, traceparent: str | None) -> None:
    message = build_message("tenant-a", "01HZXPROJECT", reason, traceparent)
    decoded = decode(message.encode())
    assert decoded == message
    assert decoded.schema_version == 1
    assert decoded.tenant_id == "tenant-a"
    assert decoded.project_id == "01HZXPROJECT"
    assert decoded.reason is reason
    assert decoded.traceparent == traceparent
    assert decoded.enqueued_at == message.enqueued_at


def test_build_message_stamps_enqueued_at() -> None:
    message = build_message("t", "p", BuildReason.CREATE)
    assert ISO_MS.match(message.enqueued_at)


def test_encoded_json_has_exactly_the_contract_keys() -> None:
    encoded = build_message("t", "p", BuildReason.RETRY, TRACEPARENT).encode()
    body = json.loads(encoded)
    assert set(body) == {
        "schema",
        "tenant_id",
        "project_id",
        "reason",
        "enqueued_at",
        "traceparent",
        "next_stage",
        "attempt",
    }
    assert body["schema"] == 1
    assert isinstance(body["schema"], int)
    assert body["tenant_id"] == "t"
    assert body["project_id"] == "p"
    assert body["reason"] == "retry"
    assert body["traceparent"] == TRACEPARENT


def test_next_stage_and_attempt_are_carried_as_hints() -> None:
    hinted = decode(
        build_message("t", "p", BuildReason.CREATE, next_stage="plan", attempt=0).encode()
    )
    assert (hinted.next_stage, hinted.attempt) == ("plan", 0)
    assert build_message("t", "p", BuildReason.SWEEP).attempt is None


@pytest.mark.parametrize("attempt", [-1, 1.5, "two"])
def test_an_attempt_hint_that_is_not_a_count_is_refused(attempt: object) -> None:
    body = json.loads(build_message("t", "p", BuildReason.CREATE).encode())
    body["attempt"] = attempt
    with pytest.raises(MessageError, match="attempt"):
        decode(json.dumps(body))


def test_encoded_json_keeps_a_null_traceparent() -> None:
    body = json.loads(build_message("t", "p", BuildReason.CREATE).encode())
    assert "traceparent" in body
    assert body["traceparent"] is None


def test_decode_accepts_bytes() -> None:
    message = build_message("tenant-a", "p1", BuildReason.SWEEP)
    decoded = decode(message.encode().encode("utf-8"))
    assert decoded == message


def test_decode_a_hand_written_body() -> None:
    decoded = decode(json.dumps(valid_body(reason="replay", traceparent=TRACEPARENT)))
    assert decoded == BuildMessage(
        schema_version=1,
        tenant_id="tenant-a",
        project_id="01HZXPROJECT",
        reason=BuildReason.REPLAY,
        enqueued_at="2024-05-01T12:00:00.000Z",
        traceparent=TRACEPARENT,
    )


def test_decode_fills_optional_fields() -> None:
    body = valid_body()
    del body["enqueued_at"], body["traceparent"]
    decoded = decode(json.dumps(body))
    assert decoded.traceparent is None
    assert decoded.next_stage is None
    assert ISO_MS.match(decoded.enqueued_at)


def test_decode_ignores_unknown_fields() -> None:
    body = valid_body(priority="high", extra={"nested": [1, 2]})
    decoded = decode(json.dumps(body))
    assert decoded.project_id == "01HZXPROJECT"
    assert not hasattr(decoded, "priority")
    assert set(json.loads(decoded.encode())) == {
        "schema",
        "tenant_id",
        "project_id",
        "reason",
        "enqueued_at",
        "traceparent",
        "next_stage",
        "attempt",
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param("not json at all", r"^message body is not JSON: ", id="not-json"),
        pytest.param("", r"^message body is not JSON: ", id="empty"),
        pytest.param('{"schema": 1,', r"^message body is not JSON: ", id="truncated"),
        pytest.param(b"\xff\xfe\x00", r"^message body is not JSON: ", id="bad-bytes"),
        pytest.param("[1, 2]", r"^invalid message: body: Input should be an object", id="array"),
        pytest.param('"text"', r"^invalid message: body: Input should be an object", id="string"),
        pytest.param("null", r"^invalid message: body: Input should be an object", id="null"),
        pytest.param("42", r"^invalid message: body: Input should be an object", id="number"),
    ],
)
def test_decode_rejects_bodies_that_are_not_json_objects(body: str | bytes, expected: str) -> None:
    with pytest.raises(MessageError, match=expected):
        decode(body)


def _without(key: str) -> dict[str, Any]:
    body = valid_body()
    del body[key]
    return body


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(_without("schema"), "message has no schema version", id="no-schema"),
        pytest.param({}, "message has no schema version", id="empty-object"),
        pytest.param(
            valid_body(schema=2),
            "unknown message schema 2; this consumer reads 1",
            id="schema-2",
        ),
        pytest.param(
            valid_body(schema=0),
            "unknown message schema 0; this consumer reads 1",
            id="schema-0",
        ),
        pytest.param(
            valid_body(schema="v1"),
            "unknown message schema 'v1'; this consumer reads 1",
            id="schema-text",
        ),
        pytest.param(
            _without("project_id"),
            "invalid message: project_id: Field required",
            id="no-project-id",
        ),
        pytest.param(
            _without("tenant_id"),
            "invalid message: tenant_id: Field required",
            id="no-tenant-id",
        ),
        pytest.param(_without("reason"), "invalid message: reason: Field required", id="no-reason"),
        pytest.param(
            valid_body(reason="rebuild"),
            "invalid message: reason: Input should be "
            "'create', 'retry', 'replay', 'sweep' or 'release'",
            id="bad-reason",
        ),
        pytest.param(
            valid_body(tenant_id=""),
            "invalid message: tenant_id: String should have at least 1 character",
            id="empty-tenant",
        ),
        pytest.param(
            valid_body(project_id=""),
            "invalid message: project_id: String should have at least 1 character",
            id="empty-project",
        ),
        pytest.param(
            valid_body(project_id="x" * 65),
            "invalid message: project_id: String should have at most 64 characters",
            id="long-project",
        ),
        pytest.param(
            valid_body(tenant_id=123),
            "invalid message: tenant_id: Input should be a valid string",
            id="tenant-not-string",
        ),
    ],
)
def test_decode_rejects_invalid_messages_clearly(body: dict[str, Any], expected: str) -> None:
    with pytest.raises(MessageError) as caught:
        decode(json.dumps(body))
    assert str(caught.value) == expected


def test_decode_error_is_not_chained_to_pydantic() -> None:
    with pytest.raises(MessageError) as caught:
        decode(json.dumps(valid_body(schema=2)))
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ is True
