"""A worker's run: the claim that takes the lease and the next attempt, and every
later write of the run, fenced by owner and attempt (invariant 3)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from buildq.clock import CLOCK_MARGIN_SECONDS, epoch_ms, iso, utcnow
from buildq.errors import ConflictError, LeaseLostError
from buildq.items import project_from_item, project_key, sweep_shard
from buildq.models import ErrorInfo, Project, ProjectStatus, StageSnapshot, StageStatus
from buildq.store.base import DynamoTable, Update
from buildq.transitions import ClaimRefusal, check_transition, claim_refusal, next_stage

CLAIM_TRIES = 3  # on the hints, on the truth, and once more if it moved meanwhile


@dataclass(frozen=True)
class RunToken:
    """Who runs a project, and which attempt: the fencing token of every run write."""

    tenant_id: str
    project_id: str
    worker_id: str
    attempt: int


class ClaimRefusedError(ConflictError):
    def __init__(self, refusal: ClaimRefusal, current: Project | None) -> None:
        super().__init__(f"claim refused: {refusal}")
        self.refusal = refusal
        self.current = current


class Runs(Protocol):
    """What a worker writes while it runs a project."""

    async def claim(
        self,
        tenant_id: str,
        project_id: str,
        *,
        worker_id: str,
        lease_seconds: float,
        start: str | None = None,
        seen_attempt: int = 0,
        margin_seconds: float = CLOCK_MARGIN_SECONDS,
    ) -> Project: ...
    async def save_stages(self, token: RunToken, *stages: StageSnapshot) -> bool: ...
    async def extend_lease(self, token: RunToken, lease_seconds: float) -> bool: ...
    async def finish(
        self,
        token: RunToken,
        status: ProjectStatus,
        *,
        error: ErrorInfo | None = None,
        stages: Sequence[StageSnapshot] = (),
    ) -> None: ...
    async def requeue(
        self,
        token: RunToken,
        *,
        error: ErrorInfo | None,
        stages: Sequence[StageSnapshot] = (),
        retry_at: int | None = None,
    ) -> None: ...
    async def release(self, token: RunToken, *, stages: Sequence[StageSnapshot] = ()) -> None: ...
    async def mark_dead_lettered(self, tenant_id: str, project_id: str, attempt: int) -> bool: ...


@dataclass(frozen=True)
class _ClaimHint:
    """What a claim assumes of the project: the attempt it is at, and the first stage
    it will run (None: the claim starts no stage)."""

    attempt: int
    stage: str | None

    def corrected(self, project: Project) -> _ClaimHint:
        """The truth, from the item a refused claim read: its attempt, and its first
        pending stage (only if this hint named a stage at all)."""
        first = next_stage(project) if self.stage is not None else None
        return _ClaimHint(project.attempt, first)


class _WrongHintError(Exception):
    """A claim refused only because it assumed the wrong attempt or first stage."""

    def __init__(self, truth: _ClaimHint) -> None:
        super().__init__(truth)
        self.truth = truth


class DynamoRuns(DynamoTable):
    """``Runs`` on the projects table."""

    async def claim(
        self,
        tenant_id: str,
        project_id: str,
        *,
        worker_id: str,
        lease_seconds: float,
        start: str | None = None,
        seen_attempt: int = 0,
        margin_seconds: float = CLOCK_MARGIN_SECONDS,
    ) -> Project:
        """Take the lease and the next attempt, or raise ``ClaimRefusedError`` saying why.

        ``start`` and ``seen_attempt`` are the message's hints: the stage the run will
        likely begin with, and the attempt the project was at when the message was sent
        (0: a new project). The claim is one write that assumes both. It sets the next
        attempt outright, conditional on the one seen (so two claims never both win),
        and marks ``start`` RUNNING for it, which saves the run its first stage write. A
        stale hint costs one more try, with the truth read from the refused write's old
        item.

        A BUILDING project's lease is taken only ``margin_seconds`` past its expiry: the
        margin for two processes' estimates of AWS's clock (``claim_refusal``).
        """
        hint = _ClaimHint(seen_attempt, start)
        for _ in range(CLAIM_TRIES):
            try:
                return await self._claim(
                    tenant_id, project_id, worker_id, lease_seconds, hint, margin_seconds
                )
            except _WrongHintError as wrong:
                hint = wrong.truth  # claimable: only the guess was wrong
        raise ConflictError(f"project {project_id} kept changing under its claim; try again")

    async def _claim(
        self,
        tenant_id: str,
        project_id: str,
        worker_id: str,
        lease_seconds: float,
        hint: _ClaimHint,
        margin_seconds: float,
    ) -> Project:
        now = utcnow()
        now_ms = epoch_ms(now)
        expires = now_ms + int(lease_seconds * 1000)
        token = uuid.uuid4().hex  # tells a retry of this claim from someone else's
        attempt = hint.attempt + 1
        update = (
            Update()
            .set("status", ProjectStatus.BUILDING.value)
            .set("claim_token", token)
            .set("attempt", attempt)
            .set("lease_owner", worker_id)
            .set("lease_expires_at", expires)
            .set("worker_id", worker_id)
            .set("updated_at", iso(now))
            .set("sweep_shard", sweep_shard(project_id, ProjectStatus.BUILDING))
            .set("sweep_at", expires)
        )
        started = update.name("started_at")
        update.sets.append(f"{started} = if_not_exists({started}, {update.value(iso(now))})")
        status, lease = update.name("status"), update.name("lease_expires_at")
        # A lease expired only if it did so a margin ago (see claim_refusal).
        expired_before = update.value(now_ms - int(margin_seconds * 1000))
        # Every project item has an attempt: comparing it also refuses a missing one.
        retry_at, now_value = update.name("retry_at"), update.value(now_ms)
        condition = (
            f"{update.name('attempt')} = {update.value(hint.attempt)}"
            f" AND (({status} = {update.value(ProjectStatus.QUEUED.value)}"
            f" AND (attribute_not_exists({retry_at}) OR {retry_at} <= {now_value}))"
            f" OR ({status} = {update.value(ProjectStatus.BUILDING.value)}"
            f" AND {lease} < {expired_before}))"
        )
        if hint.stage is not None:
            running = StageSnapshot(
                name=hint.stage,
                status=StageStatus.RUNNING,
                attempt=attempt,
                worker_id=worker_id,
                started_at=iso(now),
            )
            condition += update.start_stage(running)
        try:
            item = await self._update(
                project_key(tenant_id, project_id), update, condition, what="claim"
            )
        except ConflictError as exc:
            if exc.item and exc.item.get("claim_token", {}).get("S") == token:
                return project_from_item(exc.item)  # a retry: the first try had landed
            current = project_from_item(exc.item) if exc.item else None
            refusal = claim_refusal(current, now_ms, margin_ms=int(margin_seconds * 1000))
            if refusal is None and current is not None:
                raise _WrongHintError(hint.corrected(current)) from None
            raise ClaimRefusedError(refusal or ClaimRefusal.LEASED, current) from None
        return project_from_item(item)

    async def save_stages(self, token: RunToken, *stages: StageSnapshot) -> bool:
        """Write stage snapshots, unless a cancel has been requested: then nothing is
        written (the run's final write carries them) and this returns True.

        The refusal itself tells of the cancel (with the item as it was), so the write
        asks for nothing back: no copy of the stages map on every stage boundary.
        """
        update = Update().set_stages(stages).set("updated_at", iso(utcnow()))
        flag = update.name("cancel_requested")
        not_cancelled = f"(attribute_not_exists({flag}) OR {flag} = {update.value(False)})"
        try:
            await self._fenced(token, update, "save_stages", also=not_cancelled)
        except LeaseLostError as lost:
            old = project_from_item(lost.item) if lost.item else None
            if (
                old is not None
                and (old.lease_owner, old.attempt) == (token.worker_id, token.attempt)
                and old.cancel_requested
            ):
                return True  # still ours: refused only because of the cancel
            raise
        return False

    async def extend_lease(self, token: RunToken, lease_seconds: float) -> bool:
        """Push the lease out; returns whether a cancel has been requested."""
        expires = epoch_ms() + int(lease_seconds * 1000)
        update = Update().set("lease_expires_at", expires).set("sweep_at", expires)
        return await self._fenced(token, update, "extend_lease", want_cancel=True)

    async def finish(
        self,
        token: RunToken,
        status: ProjectStatus,
        *,
        error: ErrorInfo | None = None,
        stages: Sequence[StageSnapshot] = (),
    ) -> None:
        """End the run in a terminal status; the project leaves the sweeper index.

        A FAILED project stays in it until ``mark_dead_lettered``: should the DLQ send
        never happen (the worker died, SQS was down), the sweeper finds it and sends it.
        """
        check_transition(ProjectStatus.BUILDING, status)
        if not status.terminal:
            raise ValueError(f"finish() takes a terminal status, not {status}")
        now = iso(utcnow())
        update = (
            Update()
            .set_stages(stages)
            .set("status", status.value)
            .set("finished_at", now)
            .set("updated_at", now)
            .remove("lease_owner", "lease_expires_at")
        )
        if status is ProjectStatus.FAILED:
            shard = sweep_shard(token.project_id, ProjectStatus.FAILED)
            update.set("sweep_shard", shard).set("sweep_at", epoch_ms())
        else:
            update.remove("sweep_shard", "sweep_at")
        if error is not None:
            update.set("last_error", error.model_dump())
        await self._fenced(token, update, f"finish({status})", landed=_ended_in(status, token))

    async def requeue(
        self,
        token: RunToken,
        *,
        error: ErrorInfo | None,
        stages: Sequence[StageSnapshot] = (),
        retry_at: int | None = None,
    ) -> None:
        """Back to QUEUED for a retry after a transient failure, not to be claimed
        before ``retry_at`` (epoch ms; the claim refuses it until then). The sweeper's
        clock starts then too: a long backoff is not a lost project."""
        update = self._back_to_queue(token, stages, due=retry_at)
        if retry_at is not None:
            update.set("retry_at", retry_at)
        if error is not None:
            update.set("last_error", error.model_dump())
        landed = _ended_in(ProjectStatus.QUEUED, token)
        await self._fenced(token, update, "requeue", landed=landed)

    async def release(self, token: RunToken, *, stages: Sequence[StageSnapshot] = ()) -> None:
        """Hand the project back unfinished (a draining worker): QUEUED, lease cleared,
        and ``releases`` counts it, so the claim it used costs no attempt."""
        update = self._back_to_queue(token, stages).increment("releases")
        await self._fenced(token, update, "release", landed=_ended_in(ProjectStatus.QUEUED, token))

    async def mark_dead_lettered(self, tenant_id: str, project_id: str, attempt: int) -> bool:
        """Record that the DLQ holds the failure of ``attempt``: the project leaves the
        sweeper index, and a later message for it is dropped, not forwarded again.
        False if the project is no longer FAILED at that attempt (replayed meanwhile)."""
        update = Update().set("dead_lettered_attempt", attempt).remove("sweep_shard", "sweep_at")
        condition = (
            f"{update.name('status')} = {update.value(ProjectStatus.FAILED.value)}"
            f" AND {update.name('attempt')} = {update.value(attempt)}"
        )
        key = project_key(tenant_id, project_id)
        try:
            await self._update(key, update, condition, what="dead_lettered", returns="NONE")
        except ConflictError:
            return False
        return True

    def _back_to_queue(
        self, token: RunToken, stages: Sequence[StageSnapshot], *, due: int | None = None
    ) -> Update:
        """QUEUED, lease cleared; the sweeper's clock starts at ``due`` (default now),
        with no backoff from earlier sweeps."""
        return (
            Update()
            .set_stages(stages)
            .set("status", ProjectStatus.QUEUED.value)
            .set("updated_at", iso(utcnow()))
            .set("sweep_shard", sweep_shard(token.project_id, ProjectStatus.QUEUED))
            .set("sweep_at", due if due is not None else epoch_ms())
            .remove("lease_owner", "lease_expires_at", "sweep_backoff")
        )

    async def _fenced(
        self,
        token: RunToken,
        update: Update,
        what: str,
        *,
        want_cancel: bool = False,
        also: str | None = None,
        landed: Callable[[Project], bool] | None = None,
    ) -> bool:
        """An UpdateItem that lands only while ``token`` still holds the project.

        ``also`` is ANDed into the condition. ``landed`` recognises this very write in
        the item a refused try read: the try before had landed but its answer was lost
        (a timeout, a dropped connection), so the retry found the lease gone.

        With ``want_cancel`` the result says whether a cancel was requested (heartbeats
        learn of cancels this way): the write asks for the attributes it changed
        (UPDATED_NEW), not the whole item; ``cancel_seen`` copies ``cancel_requested``
        so that a new cancel changes it and comes back. (An attribute written with its
        old value may not come back: moto leaves it out, so the copy must change to be
        seen. A cancel seen once stays seen by the run; its claim reads the flag
        itself.)
        """
        if want_cancel:
            seen, flag = update.name("cancel_seen"), update.name("cancel_requested")
            update.sets.append(f"{seen} = if_not_exists({flag}, {update.value(False)})")
        owner, attempt = update.name("lease_owner"), update.name("attempt")
        condition = (
            f"{owner} = {update.value(token.worker_id)}"
            f" AND {attempt} = {update.value(token.attempt)}"
        )
        if also is not None:
            condition += f" AND {also}"
        key = project_key(token.tenant_id, token.project_id)
        try:
            item = await self._update(
                key, update, condition, what=what, returns="UPDATED_NEW" if want_cancel else "NONE"
            )
        except ConflictError as exc:
            if landed is not None and exc.item and landed(project_from_item(exc.item)):
                return False
            raise LeaseLostError(
                f"{what}: project {token.project_id} is no longer held by "
                f"{token.worker_id} at attempt {token.attempt}",
                item=exc.item,
            ) from None
        return bool(item.get("cancel_seen", {}).get("BOOL", False))


def _ended_in(status: ProjectStatus, token: RunToken) -> Callable[[Project], bool]:
    """Whether a project is as this run's end left it: ``status`` at the run's attempt,
    with no lease (nobody claimed it since: a claim would have raised the attempt)."""

    def landed(project: Project) -> bool:
        return (
            project.status is status
            and project.attempt == token.attempt
            and project.lease_owner is None
        )

    return landed
