"""TaskProtection against a fake ECS agent: a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from buildq_worker.protection import TaskProtection

# The agent's URI carries a per-container path, like http://169.254.170.2/api/<id>.
AGENT_PATH = "/api/0123456789abcdef-1234"


@dataclass
class FakeAgent:
    """Records each PUT body; answers what ``answer`` says (status, JSON body)."""

    uri: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    body: dict[str, Any] | None = None
    delay: float = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(await request.json())
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = self.body
        if answer is None:
            answer = {"protection": {"ProtectionEnabled": self.requests[-1]["ProtectionEnabled"]}}
        return web.json_response(answer, status=self.status)


@asynccontextmanager
async def fake_agent() -> AsyncIterator[FakeAgent]:
    agent = FakeAgent()
    app = web.Application()
    app.router.add_put(f"{AGENT_PATH}/task-protection/v1/state", agent.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    agent.uri = f"http://127.0.0.1:{port}{AGENT_PATH}"
    try:
        yield agent
    finally:
        await runner.cleanup()


def run(scenario: Callable[[FakeAgent], Awaitable[None]]) -> None:
    async def main() -> None:
        async with fake_agent() as agent:
            await scenario(agent)

    asyncio.run(main())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_protects_while_busy_and_calls_only_on_a_change() -> None:
    async def scenario(agent: FakeAgent) -> None:
        protection = TaskProtection(agent.uri, expires_minutes=90)
        assert protection.enabled
        assert protection.protected is None
        await protection.set(True)
        await protection.set(True)
        assert agent.requests == [{"ProtectionEnabled": True, "ExpiresInMinutes": 90}]
        assert protection.protected is True
        await protection.set(False)
        await protection.set(False)
        assert agent.requests[1:] == [{"ProtectionEnabled": False}]
        assert protection.protected is False

    run(scenario)


def test_the_first_idle_call_reaches_the_agent_too() -> None:
    async def scenario(agent: FakeAgent) -> None:
        protection = TaskProtection(agent.uri)
        await protection.set(False)  # state unknown at start: say it
        assert agent.requests == [{"ProtectionEnabled": False}]

    run(scenario)


def test_a_long_run_renews_its_protection_at_half_life() -> None:
    async def scenario(agent: FakeAgent) -> None:
        clock = Clock()
        protection = TaskProtection(agent.uri, expires_minutes=10, clock=clock)
        await protection.set(True)
        clock.now += 299
        await protection.set(True)
        assert len(agent.requests) == 1
        clock.now += 1  # five minutes: half of ten
        await protection.set(True)
        assert agent.requests == [{"ProtectionEnabled": True, "ExpiresInMinutes": 10}] * 2
        clock.now += 10_000
        await protection.set(False)  # idle never needs renewing
        await protection.set(False)
        assert len(agent.requests) == 3

    run(scenario)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, {"error": {"Code": "ServerException", "Message": "boom"}}),
        (403, {"error": {"Code": "AccessDeniedException", "Message": "no task role"}}),
        (200, {"failure": {"Arn": "arn:aws:ecs:task", "Reason": "TASK_NOT_VALID"}}),
    ],
)
def test_a_refusal_is_logged_not_raised_and_tried_again(status: int, body: dict[str, Any]) -> None:
    async def scenario(agent: FakeAgent) -> None:
        agent.status, agent.body = status, body
        protection = TaskProtection(agent.uri)
        with capture_logs() as logs:
            await protection.set(True)
        assert protection.protected is None
        failed = [entry for entry in logs if entry["event"] == "task_protection.failed"]
        assert failed
        assert failed[0]["log_level"] == "warning"
        assert failed[0]["status"] == status
        assert json.loads(failed[0]["body"]) == body
        agent.status, agent.body = 200, None
        await protection.set(True)  # the same state again: not skipped, it never landed
        assert len(agent.requests) == 2
        assert protection.protected is True

    run(scenario)


def test_an_unreachable_agent_is_logged_not_raised() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    protection = TaskProtection(f"http://127.0.0.1:{port}/api/x", timeout=2.0)
    with capture_logs() as logs:
        asyncio.run(protection.set(True))
    assert protection.protected is None
    assert [entry["event"] for entry in logs] == ["task_protection.failed"]


def test_a_slow_agent_times_out_without_raising() -> None:
    async def scenario(agent: FakeAgent) -> None:
        agent.delay = 2.0
        protection = TaskProtection(agent.uri, timeout=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with capture_logs() as logs:
            await protection.set(True)
        assert loop.time() - started < 1.5
        assert protection.protected is None
        assert "TimeoutError" in logs[0]["error"]

    run(scenario)


def test_without_ecs_agent_uri_it_is_a_no_op() -> None:
    for environ in ({}, {"ECS_AGENT_URI": ""}):
        protection = TaskProtection.from_env(environ)
        assert not protection.enabled
        with capture_logs() as logs:
            asyncio.run(protection.set(True))
        assert logs == []
        assert protection.protected is None


def test_from_env_reads_the_agent_uri() -> None:
    async def scenario(agent: FakeAgent) -> None:
        protection = TaskProtection.from_env({"ECS_AGENT_URI": agent.uri + "/"})
        await protection.set(True)
        assert agent.requests == [{"ProtectionEnabled": True, "ExpiresInMinutes": 60}]

    run(scenario)


def test_expiry_is_within_the_agent_s_limits() -> None:
    with pytest.raises(ValueError, match="expires_minutes"):
        TaskProtection("http://127.0.0.1:1", expires_minutes=0)
    with pytest.raises(ValueError, match="expires_minutes"):
        TaskProtection("http://127.0.0.1:1", expires_minutes=2881)
