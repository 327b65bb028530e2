"""Log lines: JSON tracebacks carry the exception, never the frames' local variables."""

from __future__ import annotations

import json

import pytest
import structlog

from buildq.logging import configure_logging


def test_a_json_traceback_leaves_out_local_variables(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json", service="test")

    def authenticate(api_key: str) -> None:
        raise PermissionError("unknown key")

    try:
        authenticate("sk-very-secret-key")
    except PermissionError:
        structlog.get_logger().exception("auth.failed")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "sk-very-secret-key" not in line
    record = json.loads(line)
    assert record["event"] == "auth.failed"
    [raised] = record["exception"]
    assert (raised["exc_type"], raised["exc_value"]) == ("PermissionError", "unknown key")
    assert any(frame["name"] == "authenticate" for frame in raised["frames"])
