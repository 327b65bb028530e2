"""On-call commands: the DLQ, the queue, projects and the worker fleet."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from buildq.clock import epoch_ms, parse_iso
from buildq.errors import BuildqError
from buildq.models import Project, ProjectStatus
from buildq_ops import dlq as dead_letters
from buildq_ops.runtime import Ops, emit, run, table

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON")]
TimeLimitOption = Annotated[
    str, typer.Option("--time-limit", help="Stop receiving from the DLQ after this long, e.g. 30m")
]

dlq_app = typer.Typer(help="Inspect, replay and purge the dead-letter queue.", no_args_is_help=True)
queue_app = typer.Typer(help="The build queue.", no_args_is_help=True)
projects_app = typer.Typer(help="Look at projects of any tenant.", no_args_is_help=True)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise typer.BadParameter(f"{text!r}: use a number and s, m, h or d, e.g. 30m or 7d")
    value, unit = float(match.group(1)), match.group(2)
    return timedelta(seconds=value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


def parse_time(text: str) -> datetime:
    try:
        moment = parse_iso(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO-8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- buildq dlq -------------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many")] = 100,
    time_limit: TimeLimitOption = "1h",
    as_json: JsonOption = False,
) -> None:
    """Peek at dead-lettered messages (nothing is consumed) and why each failed.

    COPIES counts the listed messages of the same project and attempt (a partial fault
    can leave more than one; replaying one skips and deletes the others)."""
    seconds = parse_duration(time_limit).total_seconds()
    peeked = run(
        lambda ops: dead_letters.peek(
            ops.queue, limit=limit, hold=ops.settings.dlq_hold_seconds, time_limit=seconds
        )
    )
    copies = Counter(_failure(entry) for entry in peeked.entries)
    rows = [{**entry.public(), "copies": copies[_failure(entry)]} for entry in peeked.entries]
    emit(
        rows,
        as_json=as_json,
        human=lambda: table(
            [{**r, "reason": f"{r['error_type']}: {r['error_message']}"[:80]} for r in rows],
            ["message_id", "project_id", "tenant_id", "attempts", "copies", "failed_at", "reason"],
        ),
    )
    _note_unfinished(peeked.scan)


def _failure(entry: dead_letters.DeadLetterEntry) -> tuple[object, ...]:
    """One failure of one project: its messages are copies of each other."""
    if entry.project_id is None:
        return ("message", entry.message_id)
    return (entry.tenant_id, entry.project_id, entry.attempts)


def _note_unfinished(scan: dead_letters.ScanReport) -> None:
    """Say on stderr when a pass did not see the whole DLQ, and why."""
    why = {
        dead_letters.LIMIT: f"stopped after {scan.messages} messages (the limit); more may wait",
        dead_letters.TIME_LIMIT: "stopped at the time limit; run it again for the rest",
        dead_letters.QUIET: f"the DLQ still shows {scan.visible_left} visible message(s) that "
        f"{dead_letters.QUIET_SECONDS:g} s of polls did not bring (SQS's count lags, or "
        "another command holds them); run it again to be sure",
    }.get(scan.stopped)
    if why:
        typer.echo(f"note: {why}", err=True)


@dlq_app.command("show")
def dlq_show(
    ident: Annotated[str, typer.Argument(metavar="MESSAGE_ID|PROJECT_ID")],
    as_json: JsonOption = False,
) -> None:
    """One dead-lettered message, with its project's record and stages."""

    async def find(ops: Ops) -> tuple[dict[str, Any], Project | None]:
        peeked = await dead_letters.peek(
            ops.queue, limit=dead_letters.MAX_SCAN, hold=ops.settings.dlq_hold_seconds
        )
        for entry in peeked.entries:
            if ident in (entry.message_id, entry.project_id):
                project = None
                if entry.tenant_id and entry.project_id:
                    project = await ops.store.get(entry.tenant_id, entry.project_id)
                return entry.public(), project
        raise BuildqError(f"no dead-lettered message with id or project {ident}")

    entry, project = run(find)
    data = {"message": entry, "project": project.model_dump(mode="json") if project else None}

    def human() -> None:
        for key in ("message_id", "project_id", "tenant_id", "error_type", "error_message"):
            typer.echo(f"{key:14} {entry[key]}")
        typer.echo(f"{'attempts':14} {entry['attempts']}  failed_at {entry['failed_at']}")
        if project is not None:
            _print_project(project)

    emit(data, as_json=as_json, human=human)


def _filter(
    all_: bool,
    project: list[str] | None,
    tenant: str | None,
    reason_contains: str | None,
    failed_after: str | None,
) -> dead_letters.Filter:
    if not (all_ or project or tenant or reason_contains or failed_after):
        raise typer.BadParameter(
            "say which messages: --all, --project, --tenant, --reason-contains or --failed-after"
        )
    return dead_letters.Filter(
        all=all_,
        projects=frozenset(project or ()),
        tenant=tenant,
        reason_contains=reason_contains,
        failed_after=parse_time(failed_after) if failed_after else None,
    )


@dlq_app.command("replay")
def dlq_replay(
    all_: Annotated[bool, typer.Option("--all", help="Every message")] = False,
    project: Annotated[
        list[str] | None, typer.Option("--project", help="A project id (repeatable)")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's")] = None,
    reason_contains: Annotated[str | None, typer.Option(help="Failure reason contains")] = None,
    failed_after: Annotated[str | None, typer.Option(help="Failed after (ISO-8601)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Change nothing")] = False,
    rate: Annotated[float, typer.Option(min=0.1, help="At most this many per second")] = 10.0,
    time_limit: TimeLimitOption = "1h",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask")] = False,
    as_json: JsonOption = False,
) -> None:
    """Put failed projects back to QUEUED with a fresh attempt budget, and send them again."""
    selection = _filter(all_, project, tenant, reason_contains, failed_after)
    seconds = parse_duration(time_limit).total_seconds()
    if not dry_run and not yes:
        preview = run(
            lambda ops: dead_letters.replay(
                ops.queue,
                ops.store,
                selection,
                dry_run=True,
                rate=None,
                hold=ops.settings.dlq_hold_seconds,
                time_limit=seconds,
            )
        )
        if preview.matched == 0:
            typer.echo("no dead-lettered message matches")
            return
        typer.confirm(f"Replay {preview.matched} dead-lettered message(s)?", abort=True)
    summary = run(
        lambda ops: dead_letters.replay(
            ops.queue,
            ops.store,
            selection,
            dry_run=dry_run,
            rate=rate,
            hold=ops.settings.dlq_hold_seconds,
            time_limit=seconds,
        )
    )
    data = {
        "dry_run": summary.dry_run,
        "matched": summary.matched,
        "replayed": summary.replayed,
        "skipped": summary.skipped,
        "errors": summary.errors,
        "scan": {**asdict(summary.scan), "complete": summary.scan.complete},
    }

    def human() -> None:
        verb = "would replay" if dry_run else "replayed"
        typer.echo(
            f"{verb} {len(summary.replayed)}, skipped {len(summary.skipped)}, "
            f"errors {len(summary.errors)} (of {summary.matched} matching)"
        )
        for item in summary.skipped:
            typer.echo(f"  skipped {item['project_id'] or item['message_id']}: {item['reason']}")
        for item in summary.errors:
            typer.echo(f"  error   {item['project_id'] or item['message_id']}: {item['reason']}")

    emit(data, as_json=as_json, human=human)
    _note_unfinished(summary.scan)
    if summary.errors:
        raise typer.Exit(1)


@dlq_app.command("purge")
def dlq_purge(
    older_than: Annotated[
        str | None, typer.Option(help="Only messages that failed longer ago, e.g. 7d")
    ] = None,
    time_limit: TimeLimitOption = "1h",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask")] = False,
) -> None:
    """Delete dead-lettered messages for good; their projects stay FAILED."""
    before = datetime.now(UTC) - parse_duration(older_than) if older_than else None
    seconds = parse_duration(time_limit).total_seconds()
    selection = dead_letters.Filter(all=True, failed_before=before)
    what = f"failed before {before:%Y-%m-%d %H:%M}" if before else "all"
    if not yes:
        typer.confirm(f"Delete {what} dead-lettered messages for good?", abort=True)
    purged = run(
        lambda ops: dead_letters.purge(
            ops.queue, selection, hold=ops.settings.dlq_hold_seconds, time_limit=seconds
        )
    )
    typer.echo(f"purged {len(purged.deleted)}")
    _note_unfinished(purged.scan)


# -- buildq queue -----------------------------------------------------------------------


@queue_app.command("stats")
def queue_stats(as_json: JsonOption = False) -> None:
    """Depths, the age of the oldest waiting project, and the backlog per worker slot."""

    async def gather(ops: Ops) -> dict[str, Any]:
        depth = await ops.queue.depth()
        workers = await ops.store.list_workers()
        oldest = await ops.store.oldest_queued_since()
        slots = sum(worker.slots_total for worker in workers)
        return {
            "queue": ops.settings.queue_name,
            "visible": depth.visible,
            "in_flight": depth.in_flight,
            "delayed": depth.delayed,
            "dlq": depth.dlq_visible,
            "oldest_queued_seconds": round((epoch_ms() - oldest) / 1000, 1) if oldest else None,
            "live_workers": len(workers),
            "worker_slots": slots,
            "slots_in_use": sum(worker.slots_used for worker in workers),
            "backlog_per_slot": round(depth.visible / slots, 2) if slots else None,
        }

    stats = run(gather)

    def human() -> None:
        for key, value in stats.items():
            typer.echo(f"{key:22} {'-' if value is None else value}")

    emit(stats, as_json=as_json, human=human)


# -- buildq projects / workers -----------------------------------------------------------


def _print_project(project: Project) -> None:
    typer.echo(
        f"project {project.project_id}  tenant {project.tenant_id}  {project.status}"
        f"  attempt {project.attempt}  workflow {project.workflow}"
    )
    if project.last_error:
        typer.echo(f"last_error {project.last_error.type}: {project.last_error.message}")
    table(
        [
            {
                "stage": s.name,
                "status": s.status.value,
                "attempt": s.attempt,
                "worker": s.worker_id or "",
                "started": s.started_at or "",
                "finished": s.finished_at or "",
                "error": f"{s.error.type}: {s.error.message}"[:60] if s.error else "",
            }
            for s in project.stages
        ],
        ["stage", "status", "attempt", "worker", "started", "finished", "error"],
    )


@projects_app.command("get")
def projects_get(
    project_id: str,
    tenant: Annotated[
        str | None, typer.Option(help="Its tenant (without it, the table is scanned)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """One project: its record, stages and last error."""

    async def find(ops: Ops) -> Project | None:
        if tenant is not None:
            return await ops.store.get(tenant, project_id)
        found = await ops.store.scan_projects(limit=1, project_id=project_id)
        return found[0] if found else None

    project = run(find)
    if project is None:
        typer.echo(f"error: no project {project_id}", err=True)
        raise typer.Exit(1)
    emit(project.model_dump(mode="json"), as_json=as_json, human=lambda: _print_project(project))


@projects_app.command("list")
def projects_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's (else: a scan)")] = None,
    status: Annotated[ProjectStatus | None, typer.Option(help="Only this status")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    as_json: JsonOption = False,
) -> None:
    """Projects, newest first."""

    async def fetch(ops: Ops) -> list[Project]:
        if tenant is not None:
            projects, _ = await ops.store.list_projects(tenant, limit=limit, status=status)
            return projects
        return await ops.store.scan_projects(limit=limit, status=status)

    projects = run(fetch)
    rows = [
        {
            "id": p.project_id,
            "tenant": p.tenant_id,
            "status": p.status.value,
            "attempt": p.attempt,
            "workflow": p.workflow,
            "created_at": p.created_at,
            "last_error": f"{p.last_error.type}: {p.last_error.message}"[:60]
            if p.last_error
            else "",
        }
        for p in projects
    ]
    emit(
        [p.model_dump(mode="json") for p in projects],
        as_json=as_json,
        human=lambda: table(
            rows, ["id", "tenant", "status", "attempt", "workflow", "created_at", "last_error"]
        ),
    )


def workers_command(as_json: JsonOption = False) -> None:
    """Live workers: slots in use, and what each is running."""
    workers = run(lambda ops: ops.store.list_workers())
    rows = [worker.model_dump(mode="json") for worker in workers]
    emit(
        rows,
        as_json=as_json,
        human=lambda: table(
            [
                {
                    **r,
                    "slots": f"{r['slots_used']}/{r['slots_total']}",
                    "running": ",".join(r["running"]),
                }
                for r in rows
            ],
            ["worker_id", "host", "version", "slots", "started_at", "last_seen", "running"],
        ),
    )
