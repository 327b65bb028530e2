"""Putting a failure on the DLQ, the one way every part of the worker does it.

FAILED ⇔ one DLQ entry (invariant 11): the project is written FAILED first, then its
failure is sent to the DLQ, then the project records that the DLQ holds it
(``dead_lettered_attempt``), and only then is the build message deleted. Whoever
finds a FAILED project without that record (a later claim of its message, or the
sweeper, where it stays indexed until then) sends it. A crash or a lost answer
between the send and the record leaves a second copy of the same failure (the same
``buildq-project-attempt``), never none.
"""

from __future__ import annotations

import structlog

from buildq.errors import BuildqError
from buildq.models import ErrorInfo, Project, ProjectStatus
from buildq.queue import BuildQueue, DeadLetter
from buildq.store import ProjectStore

log = structlog.get_logger()


async def dead_letter(
    queue: BuildQueue,
    store: ProjectStore,
    body: str,
    letter: DeadLetter,
    *,
    tenant_id: str | None = None,
    project_id: str | None = None,
) -> None:
    """Send ``body`` to the DLQ with why it failed; then, for a project's failure
    (``letter.project_attempt`` set), record on the project that the DLQ holds it."""
    await queue.dead_letter(body, letter)
    if letter.project_attempt is None or tenant_id is None or project_id is None:
        return
    try:
        await store.mark_dead_lettered(tenant_id, project_id, letter.project_attempt)
    except BuildqError as exc:
        # The DLQ holds it: the cost is one more copy, sent by whoever finds the
        # project still unmarked.
        log.warning("dlq.mark_failed", project_id=project_id, error=str(exc))


def failure_of(project: Project, worker_id: str) -> DeadLetter:
    """The DLQ entry of a FAILED project, from its record."""
    error = project.last_error or ErrorInfo(type="Failed", message="no error was recorded")
    return DeadLetter(
        error=error,
        attempts=project.attempts_used,
        worker_id=worker_id,
        project_attempt=project.attempt,
    )


def needs_dead_letter(project: Project | None) -> bool:
    """A FAILED project whose failure the DLQ does not hold yet (as far as it knows)."""
    return (
        project is not None
        and project.status is ProjectStatus.FAILED
        and project.dead_lettered_attempt != project.attempt
    )
