"""The project state machine (buildq.transitions) as pure functions."""

from __future__ import annotations

import itertools
import random

import pytest

from buildq.clock import CLOCK_MARGIN_MS
from buildq.errors import InvalidTransitionError
from buildq.models import (
    TERMINAL_STATUSES,
    ErrorInfo,
    Project,
    ProjectStatus,
    StageSnapshot,
    StageStatus,
)
from buildq.transitions import (
    ALLOWED,
    Backoff,
    ClaimRefusal,
    FailureOutcome,
    check_transition,
    claim_refusal,
    claimed,
    failure_outcome,
    new_project,
    pending_stages,
    stage_finished,
    stage_started,
)

S = ProjectStatus
T0 = "2024-05-01T12:00:00.000Z"
T1 = "2024-05-01T12:00:05.000Z"
T2 = "2024-05-01T12:00:10.000Z"
NOW_MS = 1_714_564_805_000
STAGES = ("plan", "generate", "build", "package")

ALLOWED_PAIRS = sorted((src, dst) for src, targets in ALLOWED.items() for dst in targets)
DISALLOWED_PAIRS = sorted(
    (src, dst) for src, dst in itertools.product(S, S) if dst not in ALLOWED[src]
)


def make_project(
    status: ProjectStatus = S.QUEUED,
    *,
    attempt: int = 0,
    lease_expires_at: int | None = None,
    started_at: str | None = None,
    stage_statuses: tuple[StageStatus, ...] | None = None,
) -> Project:
    project = new_project(
        tenant_id="tenant-a",
        project_id="01HZXPROJECT",
        name="my project",
        workflow="demo",
        stage_names=STAGES,
        parameters={"stage_seconds": 0},
        now=T0,
    )
    stages = project.stages
    if stage_statuses is not None:
        stages = tuple(
            StageSnapshot(name=name, status=status)
            for name, status in zip(STAGES, stage_statuses, strict=True)
        )
    return project.model_copy(
        update={
            "status": status,
            "attempt": attempt,
            "lease_expires_at": lease_expires_at,
            "lease_owner": "worker-old" if lease_expires_at is not None else None,
            "started_at": started_at,
            "stages": stages,
        }
    )


# -- ALLOWED / check_transition ------------------------------------------------


def test_allowed_covers_every_status() -> None:
    assert set(ALLOWED) == set(S)


def test_allowed_table_is_exactly_the_documented_machine() -> None:
    expected = {
        S.QUEUED: {S.BUILDING, S.CANCELLED},
        S.BUILDING: {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED},
        S.FAILED: {S.QUEUED},
        S.SUCCEEDED: set(),
        S.CANCELLED: set(),
    }
    assert dict(ALLOWED) == expected


@pytest.mark.parametrize(("current", "target"), ALLOWED_PAIRS)
def test_check_transition_accepts_every_allowed_pair(
    current: ProjectStatus, target: ProjectStatus
) -> None:
    check_transition(current, target)  # does not raise


@pytest.mark.parametrize(("current", "target"), DISALLOWED_PAIRS)
def test_check_transition_refuses_every_other_pair(
    current: ProjectStatus, target: ProjectStatus
) -> None:
    with pytest.raises(InvalidTransitionError, match=f"a {current} project cannot become {target}"):
        check_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.QUEUED, S.SUCCEEDED),
        (S.QUEUED, S.FAILED),
        (S.QUEUED, S.QUEUED),
        (S.BUILDING, S.BUILDING),
        (S.FAILED, S.BUILDING),
        (S.FAILED, S.SUCCEEDED),
        (S.SUCCEEDED, S.QUEUED),
        (S.CANCELLED, S.QUEUED),
    ],
)
def test_check_transition_sample_of_disallowed_pairs(
    current: ProjectStatus, target: ProjectStatus
) -> None:
    with pytest.raises(InvalidTransitionError):
        check_transition(current, target)


@pytest.mark.parametrize("terminal", [S.SUCCEEDED, S.CANCELLED])
def test_final_states_allow_nothing(terminal: ProjectStatus) -> None:
    assert ALLOWED[terminal] == frozenset()
    for target in S:
        with pytest.raises(InvalidTransitionError):
            check_transition(terminal, target)


def test_failed_is_terminal_but_can_only_be_replayed() -> None:
    # FAILED counts as terminal (models.TERMINAL_STATUSES) yet a replay moves it
    # back to QUEUED; nothing else leaves FAILED.
    assert S.FAILED in TERMINAL_STATUSES
    assert ALLOWED[S.FAILED] == frozenset({S.QUEUED})


def test_terminal_property_matches_terminal_statuses() -> None:
    assert {status for status in S if status.terminal} == {S.SUCCEEDED, S.FAILED, S.CANCELLED}


# -- new_project ----------------------------------------------------------------


def test_new_project_is_queued_attempt_zero_with_pending_stages_in_order() -> None:
    project = new_project(
        tenant_id="tenant-a",
        project_id="01HZX",
        name="n",
        workflow="demo",
        stage_names=["plan", "generate", "build", "package"],
        parameters={"stage_seconds": 0.5},
        now=T0,
    )
    assert project.status is S.QUEUED
    assert project.attempt == 0
    assert project.created_at == T0
    assert project.updated_at == T0
    assert project.parameters == {"stage_seconds": 0.5}
    assert [stage.name for stage in project.stages] == ["plan", "generate", "build", "package"]
    assert all(stage.status is StageStatus.PENDING for stage in project.stages)
    assert all(stage.attempt == 0 for stage in project.stages)
    assert all(stage.output is None and stage.error is None for stage in project.stages)
    assert project.started_at is None
    assert project.finished_at is None
    assert project.lease_owner is None
    assert project.lease_expires_at is None
    assert project.worker_id is None
    assert project.cancel_requested is False


def test_new_project_without_stages() -> None:
    project = new_project(
        tenant_id="t", project_id="p", name="n", workflow="w", stage_names=[], parameters={}, now=T0
    )
    assert project.stages == ()


# -- claim_refusal ---------------------------------------------------------------


def test_claim_refusal_missing_project() -> None:
    assert claim_refusal(None, NOW_MS) is ClaimRefusal.MISSING


def test_claim_refusal_queued_is_claimable() -> None:
    assert claim_refusal(make_project(S.QUEUED), NOW_MS) is None


def test_claim_refusal_building_with_live_lease() -> None:
    project = make_project(S.BUILDING, attempt=1, lease_expires_at=NOW_MS + 30_000)
    assert claim_refusal(project, NOW_MS) is ClaimRefusal.LEASED


def test_claim_refusal_lease_expiring_this_millisecond_is_still_live() -> None:
    # The store's condition is ``lease_expires_at < now - margin``: equal means held.
    project = make_project(S.BUILDING, attempt=1, lease_expires_at=NOW_MS - CLOCK_MARGIN_MS)
    assert claim_refusal(project, NOW_MS) is ClaimRefusal.LEASED
    project = make_project(S.BUILDING, attempt=1, lease_expires_at=NOW_MS)
    assert claim_refusal(project, NOW_MS, margin_ms=0) is ClaimRefusal.LEASED


def test_claim_refusal_building_with_expired_lease_is_claimable() -> None:
    project = make_project(S.BUILDING, attempt=1, lease_expires_at=NOW_MS - CLOCK_MARGIN_MS - 1)
    assert claim_refusal(project, NOW_MS) is None


@pytest.mark.parametrize("past_expiry_ms", [1, 1_000, CLOCK_MARGIN_MS - 1, CLOCK_MARGIN_MS])
def test_claim_refusal_a_lease_is_live_until_the_clock_margin_past_its_expiry(
    past_expiry_ms: int,
) -> None:
    project = make_project(S.BUILDING, attempt=1, lease_expires_at=NOW_MS - past_expiry_ms)
    assert CLOCK_MARGIN_MS == 3_000  # BUILDQ_CLOCK_MARGIN_SECONDS's default
    assert claim_refusal(project, NOW_MS) is ClaimRefusal.LEASED


def test_claim_refusal_takes_the_margin_it_is_given() -> None:
    project = make_project(S.BUILDING, attempt=1, lease_expires_at=NOW_MS - 1)
    assert claim_refusal(project, NOW_MS, margin_ms=0) is None
    project = make_project(S.BUILDING, attempt=1, lease_expires_at=NOW_MS - 9_999)
    assert claim_refusal(project, NOW_MS, margin_ms=10_000) is ClaimRefusal.LEASED
    assert claim_refusal(project, NOW_MS + 2, margin_ms=10_000) is None


@pytest.mark.parametrize("holder_error_ms", [-1_500, -400, 0, 700, 1_500])
@pytest.mark.parametrize("claimer_error_ms", [-1_500, -400, 0, 700, 1_500])
def test_clocks_that_disagree_by_under_the_margin_never_take_a_live_lease(
    holder_error_ms: int, claimer_error_ms: int
) -> None:
    """The holder writes its lease's expiry from its estimate of AWS's clock, the
    claimer compares it with its own: each off by up to half the margin."""
    lease_ms, margin = 4_000, CLOCK_MARGIN_MS
    written_at = NOW_MS
    expires = written_at + holder_error_ms + lease_ms
    project = make_project(S.BUILDING, attempt=1, lease_expires_at=expires)
    for true_now in range(written_at, written_at + lease_ms + 1, 250):  # while it lives
        assert claim_refusal(project, true_now + claimer_error_ms) is ClaimRefusal.LEASED
    # ... and it can be taken within the margin and the errors past its true expiry.
    late = written_at + lease_ms + margin + abs(holder_error_ms) + abs(claimer_error_ms) + 1
    assert claim_refusal(project, late + claimer_error_ms) is None


def test_claim_refusal_building_without_lease_is_claimable() -> None:
    assert claim_refusal(make_project(S.BUILDING, attempt=1), NOW_MS) is None


@pytest.mark.parametrize("status", [S.SUCCEEDED, S.CANCELLED])
def test_claim_refusal_finished_project_is_terminal(status: ProjectStatus) -> None:
    assert claim_refusal(make_project(status, attempt=1), NOW_MS) is ClaimRefusal.TERMINAL


def test_claim_refusal_failed_is_not_claimable() -> None:
    assert claim_refusal(make_project(S.FAILED, attempt=3), NOW_MS) is ClaimRefusal.NOT_CLAIMABLE


# -- claimed ---------------------------------------------------------------------


def test_claimed_takes_the_lease_and_the_next_attempt() -> None:
    project = make_project(S.QUEUED, attempt=0)
    result = claimed(
        project, worker_id="worker-1", now=T1, now_ms=NOW_MS, lease_expires_at=NOW_MS + 60_000
    )
    assert result.status is S.BUILDING
    assert result.attempt == 1
    assert result.lease_owner == "worker-1"
    assert result.worker_id == "worker-1"
    assert result.lease_expires_at == NOW_MS + 60_000
    assert result.started_at == T1
    assert result.updated_at == T1
    # Identity and stages are untouched; the input is not mutated.
    assert result.project_id == project.project_id
    assert result.stages == project.stages
    assert project.status is S.QUEUED
    assert project.attempt == 0


def test_claimed_keeps_an_existing_started_at() -> None:
    project = make_project(S.QUEUED, attempt=2, started_at=T0)
    result = claimed(project, worker_id="w", now=T2, now_ms=NOW_MS, lease_expires_at=NOW_MS + 1)
    assert result.attempt == 3
    assert result.started_at == T0
    assert result.updated_at == T2


def test_claimed_takes_over_an_expired_lease() -> None:
    expired = NOW_MS - CLOCK_MARGIN_MS - 5
    project = make_project(S.BUILDING, attempt=4, lease_expires_at=expired, started_at=T0)
    result = claimed(
        project, worker_id="worker-new", now=T1, now_ms=NOW_MS, lease_expires_at=NOW_MS + 9
    )
    assert result.status is S.BUILDING
    assert result.attempt == 5
    assert result.lease_owner == "worker-new"
    assert result.lease_expires_at == NOW_MS + 9
    assert result.started_at == T0


@pytest.mark.parametrize(
    ("project", "refusal"),
    [
        (make_project(S.BUILDING, attempt=1, lease_expires_at=NOW_MS + 1), ClaimRefusal.LEASED),
        (make_project(S.SUCCEEDED, attempt=1), ClaimRefusal.TERMINAL),
        (make_project(S.CANCELLED, attempt=1), ClaimRefusal.TERMINAL),
        (make_project(S.FAILED, attempt=3), ClaimRefusal.NOT_CLAIMABLE),
    ],
    ids=["leased", "succeeded", "cancelled", "failed"],
)
def test_claimed_raises_when_refused(project: Project, refusal: ClaimRefusal) -> None:
    with pytest.raises(InvalidTransitionError, match=f"cannot be claimed: {refusal}"):
        claimed(project, worker_id="w", now=T1, now_ms=NOW_MS, lease_expires_at=NOW_MS + 1)


# -- pending_stages ----------------------------------------------------------------

P, R, OK, F, SK = (
    StageStatus.PENDING,
    StageStatus.RUNNING,
    StageStatus.SUCCEEDED,
    StageStatus.FAILED,
    StageStatus.SKIPPED,
)


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ((P, P, P, P), ["plan", "generate", "build", "package"]),
        ((OK, OK, P, P), ["build", "package"]),
        ((OK, SK, P, P), ["build", "package"]),
        ((OK, OK, F, P), ["build", "package"]),
        ((OK, R, P, P), ["generate", "build", "package"]),
        ((SK, OK, OK, P), ["package"]),
        ((OK, OK, OK, OK), []),
        ((OK, SK, SK, OK), []),
        ((P, OK, P, OK), ["plan", "build"]),
    ],
)
def test_pending_stages(statuses: tuple[StageStatus, ...], expected: list[str]) -> None:
    project = make_project(S.BUILDING, attempt=1, stage_statuses=statuses)
    assert pending_stages(project) == expected


def test_pending_stages_of_a_project_without_stages() -> None:
    assert pending_stages(make_project().model_copy(update={"stages": ()})) == []


# -- stage_started / stage_finished -----------------------------------------------


def test_stage_started_marks_running_and_clears_a_previous_failure() -> None:
    previous = StageSnapshot(
        name="build",
        status=StageStatus.FAILED,
        attempt=1,
        worker_id="worker-old",
        started_at=T0,
        finished_at=T1,
        error=ErrorInfo(type="RetryableError", message="boom"),
    )
    started = stage_started(previous, attempt=2, worker_id="worker-new", now=T2)
    assert started.name == "build"
    assert started.status is StageStatus.RUNNING
    assert started.attempt == 2
    assert started.worker_id == "worker-new"
    assert started.started_at == T2
    assert started.finished_at is None
    assert started.error is None
    assert previous.status is StageStatus.FAILED  # not mutated


def test_stage_finished_with_output_succeeds() -> None:
    started = stage_started(StageSnapshot(name="plan"), attempt=1, worker_id="w", now=T0)
    finished = stage_finished(started, now=T1, output={"files": 3})
    assert finished.status is StageStatus.SUCCEEDED
    assert finished.finished_at == T1
    assert finished.output == {"files": 3}
    assert finished.error is None
    assert (finished.started_at, finished.attempt, finished.worker_id) == (T0, 1, "w")


def test_stage_finished_without_output_succeeds() -> None:
    started = stage_started(StageSnapshot(name="plan"), attempt=1, worker_id="w", now=T0)
    finished = stage_finished(started, now=T1)
    assert finished.status is StageStatus.SUCCEEDED
    assert finished.output is None


def test_stage_finished_with_error_fails() -> None:
    started = stage_started(StageSnapshot(name="plan"), attempt=1, worker_id="w", now=T0)
    error = ErrorInfo(type="PermanentError", message="nope")
    finished = stage_finished(started, now=T1, error=error)
    assert finished.status is StageStatus.FAILED
    assert finished.error == error
    assert finished.output is None
    assert finished.finished_at == T1


# -- failure_outcome ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "permanent", "expected"),
    [
        (1, 3, False, FailureOutcome.RETRY),
        (2, 3, False, FailureOutcome.RETRY),
        (3, 3, False, FailureOutcome.FAIL),
        (4, 3, False, FailureOutcome.FAIL),
        (1, 1, False, FailureOutcome.FAIL),
        (1, 3, True, FailureOutcome.FAIL),
        (1, 100, True, FailureOutcome.FAIL),
    ],
)
def test_failure_outcome(
    attempt: int, max_attempts: int, permanent: bool, expected: FailureOutcome
) -> None:
    assert (
        failure_outcome(attempt=attempt, max_attempts=max_attempts, permanent=permanent) is expected
    )


# -- Backoff -------------------------------------------------------------------------


class _TopOfRange(random.Random):
    """An rng whose ``uniform`` always answers the top of the range: the ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


class _BottomOfRange(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (8, 128.0), (9, 256.0), (10, 300.0)],
)
def test_backoff_ceiling_doubles_per_attempt_and_is_capped(attempt: int, ceiling: float) -> None:
    backoff = Backoff(base_seconds=1.0, cap_seconds=300.0)
    assert backoff.delay(attempt, _TopOfRange()) == ceiling
    assert backoff.delay(attempt, _BottomOfRange()) == ceiling / 2


@pytest.mark.parametrize("attempt", range(1, 16))
def test_backoff_delay_is_within_half_ceiling_and_ceiling(attempt: int) -> None:
    backoff = Backoff(base_seconds=2.0, cap_seconds=60.0)
    ceiling = min(60.0, 2.0 * 2 ** (attempt - 1))
    rng = random.Random(1234 + attempt)
    delays = [backoff.delay(attempt, rng) for _ in range(200)]
    assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
    assert len(set(delays)) > 1  # jittered, not constant


def test_backoff_is_deterministic_for_a_seeded_rng() -> None:
    backoff = Backoff()
    first = [backoff.delay(n, random.Random(42)) for n in range(1, 8)]
    second = [backoff.delay(n, random.Random(42)) for n in range(1, 8)]
    assert first == second


def test_backoff_defaults_and_module_rng() -> None:
    backoff = Backoff()
    assert (backoff.base_seconds, backoff.cap_seconds) == (1.0, 300.0)
    assert 2.0 <= backoff.delay(3) <= 4.0  # without an rng: the random module


def test_backoff_with_zero_cap_is_zero() -> None:
    assert Backoff(base_seconds=2.0, cap_seconds=0.0).delay(5, random.Random(0)) == 0.0


def test_backoff_very_large_attempt_is_capped() -> None:
    backoff = Backoff(base_seconds=1.0, cap_seconds=300.0)
    assert backoff.delay(1100, _TopOfRange()) == 300.0
