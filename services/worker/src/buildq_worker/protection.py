"""ECS task scale-in protection, toggled through the ECS agent while workflows run.

On ECS the agent injects ``ECS_AGENT_URI`` into every container; a
``PUT $ECS_AGENT_URI/task-protection/v1/state`` with
``{"ProtectionEnabled": true, "ExpiresInMinutes": N}`` keeps service auto scaling and
deployments from stopping the task, ``{"ProtectionEnabled": false}`` lets them again.
A busy worker protects itself so that scale-in picks idle tasks; SIGTERM still drains
a protected worker the usual way if ECS stops it for another reason.

Outside ECS (no ``ECS_AGENT_URI``) everything here is a no-op. The agent makes the
call with the task role's credentials, which need ``ecs:UpdateTaskProtection``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import structlog

log = structlog.get_logger()

AGENT_URI_ENV = "ECS_AGENT_URI"
STATE_PATH = "/task-protection/v1/state"
MAX_EXPIRES_MINUTES = 2880  # the agent's limit: 48 h


class TaskProtection:
    """Scale-in protection of this ECS task: on while busy, off while idle.

    ``set`` calls the agent only when the wanted state differs from the last one the
    agent accepted, and, while busy, once half of ``expires_minutes`` has passed since
    protection was last set (so a run longer than that stays protected, and a hung
    worker's protection lapses by itself). A failed call is logged, never raised, and
    tried again on the next ``set``.
    """

    def __init__(
        self,
        agent_uri: str | None,
        *,
        expires_minutes: int = 60,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= expires_minutes <= MAX_EXPIRES_MINUTES:
            raise ValueError(f"expires_minutes must be 1..{MAX_EXPIRES_MINUTES}")
        self._url = agent_uri.rstrip("/") + STATE_PATH if agent_uri else None
        self._expires_minutes = expires_minutes
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._protected: bool | None = None  # as the agent last accepted; None: unknown
        self._set_at = 0.0
        self._lock = asyncio.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> TaskProtection:
        """Protection through ``$ECS_AGENT_URI``; a no-op when it is unset or empty."""
        env = os.environ if environ is None else environ
        return cls(env.get(AGENT_URI_ENV) or None, **kwargs)

    @property
    def enabled(self) -> bool:
        """Whether there is an agent to talk to."""
        return self._url is not None

    @property
    def protected(self) -> bool | None:
        """The state the agent last accepted (None before the first success)."""
        return self._protected

    async def set(self, busy: bool) -> None:
        """Protect the task if ``busy``, unprotect it if not (see the class docstring)."""
        if self._url is None:
            return
        async with self._lock:
            if busy == self._protected and not (busy and self._renewal_due()):
                return
            if await self._put(self._url, busy):
                self._protected = busy
                self._set_at = self._clock()

    def _renewal_due(self) -> bool:
        return self._clock() - self._set_at >= self._expires_minutes * 60 / 2

    async def _put(self, url: str, busy: bool) -> bool:
        body: dict[str, bool | int] = {"ProtectionEnabled": busy}
        if busy:
            body["ExpiresInMinutes"] = self._expires_minutes
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.put(url, json=body) as response,
            ):
                text = await response.text()
                status = response.status
        except Exception as exc:  # unreachable agent, timeout: try again next time
            log.warning(
                "task_protection.failed", protect=busy, error=f"{type(exc).__name__}: {exc}"
            )
            return False
        # The agent answers 200 with a "failure" (or an "error") when ECS refused.
        if status != 200 or _refused(text):
            log.warning("task_protection.failed", protect=busy, status=status, body=text[:500])
            return False
        log.info(
            "task_protection.set",
            protect=busy,
            expires_in_minutes=self._expires_minutes if busy else None,
        )
        return True


def _refused(text: str) -> bool:
    """Whether a 200 answer of the agent carries a failure or an error instead of the
    task's protection."""
    try:
        answer = json.loads(text) if text.strip() else {}
    except ValueError:
        return True
    return not isinstance(answer, dict) or bool(answer.get("failure") or answer.get("error"))
