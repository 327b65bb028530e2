"""The project state machine as pure functions.

The DynamoDB store enforces the same rules atomically with condition
expressions; these functions are what the rest of the code reasons with, and
what the unit tests pin down.

    QUEUED ──claim──▶ BUILDING ──all stages ok──▶ SUCCEEDED
      ▲                  │ transient error, attempts left ──▶ QUEUED
      │                  │ final failure / poison ─────────▶ FAILED
      │                  │ cancel requested ───────────────▶ CANCELLED
      └── replay (from FAILED) / release (draining worker)
    QUEUED ──cancel──▶ CANCELLED
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from buildq.clock import CLOCK_MARGIN_MS
from buildq.errors import InvalidTransitionError
from buildq.models import ErrorInfo, Project, ProjectStatus, StageSnapshot, StageStatus

S = ProjectStatus

ALLOWED: dict[ProjectStatus, frozenset[ProjectStatus]] = {
    S.QUEUED: frozenset({S.BUILDING, S.CANCELLED}),
    S.BUILDING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED}),
    S.FAILED: frozenset({S.QUEUED}),
    S.SUCCEEDED: frozenset(),
    S.CANCELLED: frozenset(),
}


def check_transition(current: ProjectStatus, target: ProjectStatus) -> None:
    if target not in ALLOWED[current]:
        raise InvalidTransitionError(f"a {current} project cannot become {target}")


def new_project(
    *,
    tenant_id: str,
    project_id: str,
    name: str,
    workflow: str,
    stage_names: Sequence[str],
    parameters: dict[str, object],
    now: str,
) -> Project:
    """A freshly accepted project: QUEUED, attempt 0, every stage PENDING."""
    return Project(
        tenant_id=tenant_id,
        project_id=project_id,
        name=name,
        workflow=workflow,
        parameters=parameters,
        status=S.QUEUED,
        attempt=0,
        created_at=now,
        updated_at=now,
        stages=tuple(StageSnapshot(name=stage) for stage in stage_names),
    )


class ClaimRefusal(StrEnum):
    """Why a worker may not run the project a message points at."""

    MISSING = "missing"  # no record (yet): the API's write may still be landing
    TERMINAL = "terminal"  # already finished: a duplicate or stale message
    LEASED = "leased"  # another worker holds a live lease on it
    NOT_CLAIMABLE = "not_claimable"  # e.g. FAILED, waiting for a replay
    NOT_YET = "not_yet"  # QUEUED for a retry whose backoff is not over


def claim_refusal(
    current: Project | None, now_ms: int, *, margin_ms: int = CLOCK_MARGIN_MS
) -> ClaimRefusal | None:
    """Whether a claim of ``current`` at ``now_ms`` must be refused, and why.

    Mirrors the store's claim condition: a QUEUED project whose retry is due, or a
    BUILDING one whose lease has expired, can be claimed.

    A lease has expired only ``margin_ms`` after its ``lease_expires_at``: the holder
    wrote that time and the claimer reads ``now_ms``, each from its own estimate of
    AWS's clock (``buildq.clock``); the margin covers how far two estimates may differ.
    """
    if current is None:
        return ClaimRefusal.MISSING
    if current.status is S.QUEUED:
        if current.retry_at is not None and current.retry_at > now_ms:
            return ClaimRefusal.NOT_YET
        return None
    if current.status is S.BUILDING:
        lease = current.lease_expires_at
        if lease is not None and lease + margin_ms >= now_ms:
            return ClaimRefusal.LEASED
        return None
    if current.status in (S.SUCCEEDED, S.CANCELLED):
        return ClaimRefusal.TERMINAL
    return ClaimRefusal.NOT_CLAIMABLE


def claimed(
    project: Project, *, worker_id: str, now: str, now_ms: int, lease_expires_at: int
) -> Project:
    """The project as a successful claim leaves it: BUILDING, next attempt, leased."""
    refusal = claim_refusal(project, now_ms)
    if refusal is not None:
        raise InvalidTransitionError(f"project cannot be claimed: {refusal}")
    return project.model_copy(
        update={
            "status": S.BUILDING,
            "attempt": project.attempt + 1,
            "lease_owner": worker_id,
            "lease_expires_at": lease_expires_at,
            "worker_id": worker_id,
            "started_at": project.started_at or now,
            "updated_at": now,
        }
    )


def pending_stages(project: Project) -> list[str]:
    """The stages still to run, in order: everything not yet SUCCEEDED or SKIPPED.

    A resumed project starts at its first unfinished stage.
    """
    done = (StageStatus.SUCCEEDED, StageStatus.SKIPPED)
    return [stage.name for stage in project.stages if stage.status not in done]


def next_stage(project: Project) -> str | None:
    """The stage the project runs next (a message's ``next_stage`` hint), or None."""
    return next(iter(pending_stages(project)), None)


def stage_started(stage: StageSnapshot, *, attempt: int, worker_id: str, now: str) -> StageSnapshot:
    return stage.model_copy(
        update={
            "status": StageStatus.RUNNING,
            "attempt": attempt,
            "worker_id": worker_id,
            "started_at": now,
            "finished_at": None,
            "error": None,
        }
    )


def stage_unstarted(stage: StageSnapshot) -> StageSnapshot:
    """A stage marked RUNNING that never ran (or was stopped): PENDING again."""
    return stage.model_copy(
        update={"status": StageStatus.PENDING, "started_at": None, "worker_id": None}
    )


def started_by_claim(project: Project) -> StageSnapshot | None:
    """The stage the claim itself marked RUNNING for this attempt (see ``claim(start=)``):
    the first one pending, RUNNING under the project's current attempt and owner."""
    done = (StageStatus.SUCCEEDED, StageStatus.SKIPPED)
    first = next((stage for stage in project.stages if stage.status not in done), None)
    if (
        first is not None
        and first.status is StageStatus.RUNNING
        and first.attempt == project.attempt
        and first.worker_id == project.lease_owner
    ):
        return first
    return None


def stage_finished(
    stage: StageSnapshot,
    *,
    now: str,
    output: dict[str, object] | None = None,
    error: ErrorInfo | None = None,
) -> StageSnapshot:
    status = StageStatus.FAILED if error is not None else StageStatus.SUCCEEDED
    return stage.model_copy(
        update={"status": status, "finished_at": now, "output": output, "error": error}
    )


class FailureOutcome(StrEnum):
    RETRY = "retry"  # back to QUEUED, message reappears after a backoff
    FAIL = "fail"  # FAILED, message to the dead-letter queue


def failure_outcome(*, attempt: int, max_attempts: int, permanent: bool) -> FailureOutcome:
    if permanent or attempt >= max_attempts:
        return FailureOutcome.FAIL
    return FailureOutcome.RETRY


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog's recommendation)."""

    base_seconds: float = 1.0
    cap_seconds: float = 300.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        exponent = min(max(attempt - 1, 0), 64)  # past 2**64 every delay is the cap anyway
        ceiling = min(self.cap_seconds, self.base_seconds * 2.0**exponent)
        return (rng or random).uniform(ceiling / 2, ceiling)
