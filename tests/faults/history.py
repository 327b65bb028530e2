"""The history checker of the fault campaign (``test_campaign``): pure functions over
what a run left behind, and the verdict they give.

What the campaign gathers, and what is checked against it:

- the table's project items (a scan) and the projects the API accepted (202):
  every accepted project ends in exactly one terminal state;
- the DLQ's messages with their attributes: FAILED ⇔ at least one DLQ entry, all
  copies of a project's failure carry its attempt (``buildq-project-attempt``), and
  no DLQ entry belongs to a project that is not FAILED;
- the ledger (a line per stage ``start``, and per ``end`` of its work or ``stop``
  mid-work, with the process id and the machine's monotonic clock) and the kill /
  freeze windows: no stage executed in two live processes at overlapping times
  (``find_overlaps``);
- the workers' JSON logs (claims and the ends of runs) with the same windows: a
  project used no more attempts than its budget plus the disruptions that hit it;
- the build queue's depth at the end: empty.

Every time here is on the machine's monotonic clock (``time.monotonic()`` of any
process, whatever its wall clock says); log lines, stamped with their process's own
(possibly skewed) wall clock, are brought onto it with ``to_monotonic``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from buildq.items import project_from_item
from buildq.models import Project

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
PROJECT_ATTEMPT = "buildq-project-attempt"  # buildq.queue.DLQ_PROJECT_ATTEMPT
Interval = tuple[float, float]


# -- the ledger and the overlap rule -----------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """One execution of a stage, from the ledger: ``end`` is when it wrote its ``end``
    line (its work done) or, ``stopped``, its ``stop`` line (stopped mid-work: its
    task cancelled); None if it wrote neither (its process died mid-stage)."""

    project_id: str
    stage: str
    attempt: int
    pid: int
    start: float
    end: float | None = None
    stopped: bool = False


@dataclass(frozen=True)
class Overlap:
    """Two executions of one stage of one project that were alive at once."""

    first: Execution  # the one that started first
    second: Execution
    seconds: float  # how long both were live (0 for an end line after a take-over)
    why: str

    def describe(self, t0: float = 0.0) -> str:
        def one(e: Execution) -> str:
            end = "no end" if e.end is None else f"{e.end - t0:.3f}"
            end += " stopped" if e.stopped else ""
            return f"pid {e.pid} attempt {e.attempt} [{e.start - t0:.3f}, {end}]"

        return (
            f"{self.first.project_id} {self.first.stage}: {one(self.first)} and "
            f"{one(self.second)}: {self.why}"
        )


def parse_ledger(lines: Iterable[str]) -> tuple[list[Execution], list[str]]:
    """The executions a ledger tells of, and the lines it could not read (a process
    killed mid-write can leave a torn line: an artefact, reported, never an error).

    Lines are paired by (project, stage, attempt, pid), in order: an ``end`` or a
    ``stop`` closes the oldest open ``start`` of the same key."""
    open_starts: dict[tuple[str, str, int, int], list[float]] = defaultdict(list)
    done: list[Execution] = []
    unreadable: list[str] = []
    for raw in lines:
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            key = (
                str(line["project_id"]),
                str(line["stage"]),
                int(line["attempt"]),
                int(line["pid"]),
            )
            event, t = str(line["event"]), float(line["t"])
        except (ValueError, KeyError, TypeError):
            unreadable.append(raw)
            continue
        if event == "start":
            open_starts[key].append(t)
        elif event in ("end", "stop") and open_starts[key]:
            start = open_starts[key].pop(0)
            done.append(Execution(*key, start=start, end=t, stopped=event == "stop"))
        else:
            unreadable.append(raw)  # an end with no start, or an unknown event
    for key, starts in open_starts.items():
        done.extend(Execution(*key, start=start) for start in starts)
    return sorted(done, key=lambda e: (e.project_id, e.stage, e.start)), unreadable


def live_pieces(interval: Interval, frozen: Sequence[Interval]) -> list[Interval]:
    """``interval`` less the windows in which its process was frozen (SIGSTOP ..
    SIGCONT): the times its process was live."""
    pieces = [interval]
    for f0, f1 in sorted(frozen):
        cut: list[Interval] = []
        for a, b in pieces:
            if f1 <= a or f0 >= b:
                cut.append((a, b))
                continue
            if a < f0:
                cut.append((a, f0))
            if f1 < b:
                cut.append((f1, b))
        pieces = cut
    return pieces


def common_length(xs: Sequence[Interval], ys: Sequence[Interval]) -> float:
    """How long two sets of disjoint intervals overlap."""
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in xs for c, d in ys)


THAW_SECONDS = 0.5
"""How long a stale execution may live on after its process is thawed (SIGCONT):
the lease watch's period (0.25 s) and a busy machine's scheduling."""


def _thawed_and_stopped(piece: Interval, frozen: Sequence[Interval]) -> bool:
    """Whether ``piece`` (an execution's last live piece) begins as its process is
    thawed and is over within ``THAW_SECONDS``."""
    start, end = piece
    return any(f1 == start for _, f1 in frozen) and end - start <= THAW_SECONDS


def _frozen_at(t: float, windows: Sequence[Interval]) -> bool:
    return any(f0 <= t <= f1 for f0, f1 in windows)


def find_overlaps(
    executions: Sequence[Execution],
    *,
    frozen: Mapping[int, Sequence[Interval]],
    deaths: Mapping[int, float],
    run_end: float,
) -> list[Overlap]:
    """Every pair of executions of one (project, stage) that were alive at once.

    An execution spans [start, end] (its ``end`` or ``stop`` line); one with neither
    ends when its process died (``deaths``) or, if it lives on, at ``run_end``. Of two
    executions of different processes, the one that started first (A) and the other
    (B):

    - A wrote its ``end`` line (its work done) after B started: an overlap, even if
      A's process was frozen when B started (it came back and went on with a stage
      someone else had taken over);
    - otherwise (A was stopped, or has no line at all) the times both processes were
      live (their frozen windows left out) must not overlap. A process frozen past
      its lease is not live. Nor is a stale execution that comes back from a freeze
      and stops (or its process dies) within ``THAW_SECONDS``: its code ran only to
      its first checkpoint (``ctx.sleep``, ``ctx.raise_if_cancelled``) or the lease
      watch, where it stopped, its work undone, and nothing can stop sooner a
      process that was frozen mid-instruction.

    Two executions of the same process (two runs of one stage at once in a worker)
    must not overlap at all.
    """
    by_stage: dict[tuple[str, str], list[Execution]] = defaultdict(list)
    for execution in executions:
        by_stage[(execution.project_id, execution.stage)].append(execution)
    found: list[Overlap] = []
    for group in by_stage.values():
        group.sort(key=lambda e: e.start)
        for i, a in enumerate(group):
            a_end = a.end if a.end is not None else deaths.get(a.pid, run_end)
            a_finished = a.end is not None and not a.stopped  # its work done, to the end
            for b in group[i + 1 :]:
                if b.start >= a_end:
                    continue  # b started after a was over (the group is by start)
                b_end = b.end if b.end is not None else deaths.get(b.pid, run_end)
                if a.pid == b.pid:
                    seconds = min(a_end, b_end) - b.start
                    found.append(Overlap(a, b, seconds, "two executions in one process"))
                    continue
                a_frozen = frozen.get(a.pid, ())
                if a_finished:
                    why = (
                        "its process was frozen when the other started, and wrote its end after"
                        if _frozen_at(b.start, a_frozen)
                        else "both live at once"
                    )
                    seconds = common_length(
                        live_pieces((a.start, a_end), a_frozen),
                        live_pieces((b.start, b_end), frozen.get(b.pid, ())),
                    )
                    found.append(Overlap(a, b, seconds, why))
                    continue
                a_live = live_pieces((a.start, a_end), a_frozen)
                if a_live and _thawed_and_stopped(a_live[-1], a_frozen):
                    a_live = a_live[:-1]
                seconds = common_length(
                    a_live, live_pieces((b.start, b_end), frozen.get(b.pid, ()))
                )
                if seconds > 0:
                    if a.stopped:
                        why = "both live at once (the first stopped mid-work)"
                    else:
                        why = "the first had no end line and its process was live until " + (
                            f"it died at {a_end:.3f}" if a.pid in deaths else "the end of the run"
                        )
                    found.append(Overlap(a, b, seconds, why))
    return found


# -- the logs: runs, and what hit them -----------------------------------------------------


def to_monotonic(timestamp: str, *, skew: float, wall_minus_monotonic: float) -> float:
    """A log line's time (ISO, its process's wall clock, ``skew`` seconds ahead of the
    machine's) on the machine's monotonic clock."""
    wall = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    return wall - skew - wall_minus_monotonic


# What ends a run in its worker's log (for the attempt a claim took).
RUN_ENDS = frozenset(
    {
        "project.succeeded",
        "project.cancelled",
        "project.failed",
        "project.retry_scheduled",
        "project.released",
        "project.lease_lost",
        "project.lease_lost_seen",
        "project.lease_expired_locally",
        "message.dead_lettered",
    }
)


@dataclass(frozen=True)
class Run:
    """A claim, in the log of the worker that made it, and when that run ended there
    (None: never, in the log)."""

    proc: str
    project_id: str
    attempt: int
    claimed: float
    ended: float | None
    receive_count: int
    reason: str


@dataclass(frozen=True)
class Disruption:
    """Something done to (or by) a worker process: SIGKILL, SIGSTOP..SIGCONT, or an
    exit of its own (crash-only). ``start`` = ``end`` for a death."""

    kind: Literal["kill", "freeze", "crash"]
    proc: str
    pid: int
    start: float
    end: float


def runs_of(events: Sequence[Mapping[str, Any]], times: Sequence[float]) -> list[Run]:
    """The runs in the logs: each claim, and the first end of a run for the same
    project after it, in the same process's log. ``times[i]`` is ``events[i]``'s time
    on the monotonic clock; the events are in each process's log order."""
    open_runs: dict[tuple[str, str], list[int]] = defaultdict(list)
    claims: list[tuple[int, float | None]] = []
    for index, event in enumerate(events):
        name = event.get("event")
        key = (str(event.get("_proc")), str(event.get("project_id")))
        if name == "project.claimed":
            open_runs[key].append(len(claims))
            claims.append((index, None))
        elif name in RUN_ENDS and open_runs.get(key):
            for slot in open_runs.pop(key):
                claims[slot] = (claims[slot][0], times[index])
    runs = []
    for index, ended in claims:
        event = events[index]
        runs.append(
            Run(
                proc=str(event.get("_proc")),
                project_id=str(event.get("project_id")),
                attempt=int(event.get("attempt", 0)),
                claimed=times[index],
                ended=ended,
                receive_count=int(event.get("receive_count", 0)),
                reason=str(event.get("reason", "")),
            )
        )
    return runs


def hits(runs: Sequence[Run], disruptions: Sequence[Disruption]) -> Counter[str]:
    """For each project, how many disruptions found a run of it in the process they
    hit (claimed before, not ended before): each may cost it an attempt."""
    counted: Counter[str] = Counter()
    for disruption in disruptions:
        for run in runs:
            if run.proc != disruption.proc or run.claimed > disruption.start:
                continue
            if run.ended is None or run.ended > disruption.start:
                counted[run.project_id] += 1
    return counted


# -- the checks ------------------------------------------------------------------------------


def projects_of(items: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Project], list[str]]:
    """The project items of a scan (other entities left out), by id, and the ids found
    more than once."""
    projects: dict[str, Project] = {}
    repeated: list[str] = []
    for item in items:
        if item.get("entity", {}).get("S") != "project":
            continue
        project = project_from_item(dict(item))
        if project.project_id in projects:
            repeated.append(project.project_id)
        projects[project.project_id] = project
    return projects, repeated


def check_terminal(
    accepted: Iterable[str], projects: Mapping[str, Project], repeated: Sequence[str] = ()
) -> list[str]:
    """1. Every accepted project is in exactly one terminal state."""
    problems = [f"{pid}: more than one item" for pid in repeated]
    for project_id in accepted:
        project = projects.get(project_id)
        if project is None:
            problems.append(f"{project_id}: accepted (202) but not in the table")
        elif project.status.value not in TERMINAL:
            problems.append(
                f"{project_id}: {project.status.value} (attempt {project.attempt}, "
                f"lease {project.lease_owner}), not terminal"
            )
    return problems


@dataclass(frozen=True)
class DeadLetterCopy:
    """A message on the DLQ: its project (from its body) and its attributes."""

    message_id: str
    project_id: str | None
    attributes: Mapping[str, str]


def dead_letter_copy(message_id: str, body: str, attributes: Mapping[str, str]) -> DeadLetterCopy:
    try:
        project_id = json.loads(body).get("project_id")
    except (ValueError, AttributeError):
        project_id = None
    return DeadLetterCopy(message_id, None if project_id is None else str(project_id), attributes)


def check_dead_letters(
    projects: Mapping[str, Project], copies: Sequence[DeadLetterCopy]
) -> tuple[list[str], dict[str, int]]:
    """2. FAILED ⇔ at least one DLQ entry, every copy of a project's failure carrying
    the project's attempt; no entry for a project that is not FAILED. Returns the
    problems and the copies beyond the first, by project ("duplicate copies")."""
    by_project: dict[str | None, list[DeadLetterCopy]] = defaultdict(list)
    for copy in copies:
        by_project[copy.project_id].append(copy)
    problems: list[str] = []
    for copy in by_project.pop(None, []):
        problems.append(f"DLQ message {copy.message_id} names no project: {copy.attributes}")
    duplicates = {pid: len(c) - 1 for pid, c in by_project.items() if pid and len(c) > 1}
    for project_id, project in projects.items():
        mine = by_project.get(project_id, [])
        if project.status.value == "FAILED":
            if not mine:
                problems.append(
                    f"{project_id}: FAILED (attempt {project.attempt}, "
                    f"dead_lettered_attempt {project.dead_lettered_attempt}) with no DLQ entry"
                )
            attempts = sorted({c.attributes.get(PROJECT_ATTEMPT, "-") for c in mine})
            if mine and attempts != [str(project.attempt)]:
                problems.append(
                    f"{project_id}: FAILED at attempt {project.attempt}, its DLQ copies "
                    f"carry attempts {attempts}"
                )
        elif mine:
            problems.append(
                f"{project_id}: {project.status.value} but {len(mine)} DLQ entr"
                f"{'y' if len(mine) == 1 else 'ies'} ({[dict(c.attributes) for c in mine]})"
            )
    for named in by_project:
        if named is not None and named not in projects:
            problems.append(f"DLQ entry for {named}, not in the table")
    return problems, duplicates


def check_attempts(
    projects: Mapping[str, Project], max_attempts: int, hit: Mapping[str, int]
) -> list[str]:
    """4. Attempts used (claims less releases, since the last replay) ≤ the budget
    plus the disruptions that hit the project."""
    problems = []
    for project_id, project in projects.items():
        used = project.attempt - project.releases - project.attempt_base
        allowed = max_attempts + hit.get(project_id, 0)
        if used > allowed:
            problems.append(
                f"{project_id}: {used} attempts used (attempt {project.attempt}, releases "
                f"{project.releases}), budget {max_attempts} + {hit.get(project_id, 0)} hits; "
                f"{project.status.value}, last error {project.last_error}"
            )
    return problems


def check_queue(depth: Mapping[str, int]) -> list[str]:
    """5. The build queue is empty at the end."""
    return [] if not any(depth.values()) else [f"the build queue is not empty: {dict(depth)}"]


# -- the whole verdict -------------------------------------------------------------------------


@dataclass
class History:
    """Everything a campaign gathered."""

    seed: int
    accepted: Mapping[str, str]  # project id -> the kind of project the campaign made
    items: Sequence[Mapping[str, Any]]
    dead_letters: Sequence[DeadLetterCopy]
    ledger: Sequence[str]
    events: Sequence[Mapping[str, Any]]  # every process's log lines, with "_proc"
    skews: Mapping[str, float]  # proc name -> how far its wall clock is ahead, s
    pids: Mapping[str, int]  # worker proc name -> pid
    disruptions: Sequence[Disruption]
    deaths: Mapping[int, float]  # pid -> when it died (monotonic)
    exit_codes: Mapping[str, int | None]
    depth: Mapping[str, int]
    injected: Mapping[tuple[str, str], int]
    requests: Mapping[str, int]
    max_attempts: int
    wall_minus_monotonic: float
    t0: float  # the campaign's start (monotonic)
    run_end: float
    notes: list[str] = field(default_factory=list)  # what the campaign itself found wrong
    refused: int = 0  # POSTs that got no 202


@dataclass
class Verdict:
    violations: list[str]
    table: str
    overlaps: list[Overlap]
    executions: list[Execution]

    def __bool__(self) -> bool:
        return not self.violations


def _event_times(history: History) -> list[float]:
    times = []
    for event in history.events:
        stamp = event.get("timestamp")
        skew = history.skews.get(str(event.get("_proc")), 0.0)
        times.append(
            to_monotonic(str(stamp), skew=skew, wall_minus_monotonic=history.wall_minus_monotonic)
            if stamp
            else history.run_end
        )
    return times


def timeline(history: History, project_id: str, times: Sequence[float] | None = None) -> str:
    """What the logs, the ledger and the disruptions say of one project, in time order
    (seconds since the campaign's start)."""
    times = times if times is not None else _event_times(history)
    names = {pid: proc for proc, pid in history.pids.items()}
    rows: list[tuple[float, str]] = []
    for event, t in zip(history.events, times, strict=True):
        if event.get("project_id") == project_id:
            extra = {
                k: v
                for k, v in event.items()
                if k in ("attempt", "stage", "reason", "receive_count", "error_type", "refusal")
            }
            rows.append((t, f"{event.get('_proc')}: {event.get('event')} {extra}"))
    for raw in history.ledger:
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if line.get("project_id") == project_id:
            proc = names.get(int(line["pid"]), str(line["pid"]))
            rows.append(
                (
                    float(line["t"]),
                    f"{proc}: ledger {line['event']} {line['stage']} attempt {line['attempt']}",
                )
            )
    for d in history.disruptions:
        if d.kind == "freeze":
            rows.append((d.start, f"{d.proc}: SIGSTOP (pid {d.pid})"))
            rows.append((d.end, f"{d.proc}: SIGCONT (pid {d.pid})"))
        else:
            rows.append((d.start, f"{d.proc}: {d.kind} (pid {d.pid})"))
    rows.sort()
    # Disruptions only around the project's own lines.
    first = min((t for t, text in rows if "ledger" in text or "project" in text), default=0.0)
    last = max((t for t, text in rows if "ledger" in text or "project" in text), default=0.0)
    return "\n".join(
        f"  {t - history.t0:8.3f}  {text}" for t, text in rows if first - 15 <= t <= last + 1
    )


def check(history: History) -> Verdict:
    """All five checks, and the table of what was injected and seen."""
    projects, repeated = projects_of(history.items)
    times = _event_times(history)
    executions, unreadable = parse_ledger(history.ledger)
    frozen: dict[int, list[Interval]] = defaultdict(list)
    for d in history.disruptions:
        if d.kind == "freeze":
            frozen[d.pid].append((d.start, d.end))
    overlaps = find_overlaps(
        executions, frozen=frozen, deaths=history.deaths, run_end=history.run_end
    )
    runs = runs_of(history.events, times)
    hit = hits(runs, history.disruptions)
    terminal = check_terminal(history.accepted, projects, repeated)
    dlq, duplicates = check_dead_letters(
        {pid: p for pid, p in projects.items() if pid in history.accepted}, history.dead_letters
    )
    attempts = check_attempts(
        {pid: p for pid, p in projects.items() if pid in history.accepted},
        history.max_attempts,
        hit,
    )
    queue = check_queue(history.depth)
    overlap_text = [o.describe(history.t0) for o in overlaps]
    violations = [f"setup: {n}" for n in history.notes]
    for label, problems in (
        ("1 terminal", terminal),
        ("2 dlq", dlq),
        ("3 overlap", overlap_text),
        ("4 attempts", attempts),
        ("5 queue", queue),
    ):
        violations += [f"{label}: {p}" for p in problems]
    # Timelines of the first few projects in trouble.
    troubled = [o.first.project_id for o in overlaps] + [p.split(":")[0] for p in attempts]
    for project_id in list(dict.fromkeys(troubled))[:4]:
        violations.append(f"timeline of {project_id}:\n{timeline(history, project_id, times)}")
    table = _table(
        history,
        projects,
        runs,
        hit,
        duplicates,
        executions,
        unreadable,
        overlaps,
        checks=[
            ("1 every accepted project terminal, once", terminal),
            ("2 FAILED <=> DLQ entries of its attempt", dlq),
            ("3 no stage in two live processes at once", overlap_text),
            ("4 attempts within budget + hits", attempts),
            ("5 build queue empty", queue),
        ],
    )
    return Verdict(violations, table, overlaps, executions)


def _table(
    history: History,
    projects: Mapping[str, Project],
    runs: Sequence[Run],
    hit: Mapping[str, int],
    duplicates: Mapping[str, int],
    executions: Sequence[Execution],
    unreadable: Sequence[str],
    overlaps: Sequence[Overlap],
    *,
    checks: Sequence[tuple[str, Sequence[str]]],
) -> str:
    out: list[str] = []
    add = out.append
    add(
        f"== fault campaign, seed {history.seed}: {len(history.accepted)} projects accepted "
        f"({history.refused} refused), {history.run_end - history.t0:.0f} s =="
    )
    kinds = ["error", "throttle", "hang", "drop_response", "delay"]
    operations = sorted({op for _, op in history.injected} | set(history.requests))
    add(f"  {'injected':<30}" + "".join(f"{k:>14}" for k in [*kinds, "total", "requests"]))
    for op in operations:
        row = [history.injected.get((k, op), 0) for k in kinds]
        if not sum(row) and not history.requests.get(op):
            continue
        add(
            f"  {op:<30}"
            + "".join(f"{n:>14}" for n in [*row, sum(row), history.requests.get(op, 0)])
        )
    totals = [sum(n for (k, _), n in history.injected.items() if k == kind) for kind in kinds]
    add(
        f"  {'all':<30}"
        + "".join(f"{n:>14}" for n in [*totals, sum(totals), sum(history.requests.values())])
    )
    by_kind: dict[str, list[Disruption]] = defaultdict(list)
    for d in history.disruptions:
        by_kind[d.kind].append(d)
    labels = {"kill": "kills", "freeze": "freezes", "crash": "crash-only exits"}
    for kind, label in labels.items():
        listed = ", ".join(
            f"{d.proc}@{d.start - history.t0:.1f}s"
            + (f"+{d.end - d.start:.1f}s" if d.kind == "freeze" else "")
            for d in by_kind[kind]
        )
        add(f"  {label:<18}{len(by_kind[kind]):>4}  {listed}")
    exits = Counter(str(code) for code in history.exit_codes.values())
    add(f"  worker exit codes so far: {dict(exits)}")

    events = Counter(str(e.get("event")) for e in history.events)
    reruns = sum(1 for r in runs if r.receive_count > 1 or r.attempt > 1)
    lease = (
        events["project.lease_lost"],
        events["project.lease_lost_seen"],
        events["project.lease_expired_locally"],
    )
    add("  seen:")
    seen = [
        ("claims", len(runs)),
        ("re-runs (receive>1 or attempt>1)", reruns),
        ("retries scheduled", events["project.retry_scheduled"]),
        ("lease losses (lost/seen/expired locally)", "/".join(map(str, lease))),
        ("crash-only exits", events["worker.crash_only"]),
        ("redelivered while running", events["message.redelivered_while_running"]),
        ("messages dropped (refused claims)", events["message.dropped"]),
        (
            "retry not due / lease expiring",
            f"{events['message.retry_not_due']}/{events['message.lease_expiring']}",
        ),
        (
            "swept / dead-lettered by sweeper",
            f"{events['project.swept']}/{events['project.dead_lettered_by_sweeper']}",
        ),
        ("sync stages waited for", events["stage.sync_waiting"]),
        (
            "heartbeat failures (lease/visibility)",
            f"{events['heartbeat.lease_failed']}/{events['heartbeat.visibility_failed']}",
        ),
        (
            "DLQ copies / duplicate copies",
            f"{len(history.dead_letters)}/{sum(duplicates.values())}",
        ),
        ("projects hit by a disruption", f"{len(hit)} ({sum(hit.values())} hits)"),
        (
            "stage executions (ledger) / stopped / no end",
            f"{len(executions)}/{sum(1 for e in executions if e.stopped)}"
            f"/{sum(1 for e in executions if e.end is None)}",
        ),
        ("ledger lines unreadable", len(unreadable)),
    ]
    for label, value in seen:
        add(f"    {label:<46}{value}")
    statuses: dict[str, Counter[str]] = defaultdict(Counter)
    attempts: dict[str, Counter[int]] = defaultdict(Counter)
    for project_id, kind in history.accepted.items():
        project = projects.get(project_id)
        statuses[kind][project.status.value if project else "MISSING"] += 1
        if project:
            attempts[kind][project.attempt - project.releases - project.attempt_base] += 1
    add("  outcomes by kind (status counts; attempts used: count):")
    for kind in sorted(statuses):
        add(
            f"    {kind:<20}{dict(sorted(statuses[kind].items()))}  "
            f"attempts {dict(sorted(attempts[kind].items()))}"
        )
    add("  checks:")
    for label, problems in checks:
        add(
            f"    {'ok  ' if not problems else 'FAIL'} {label}"
            + (f": {len(problems)}" if problems else "")
        )
    if overlaps:
        add(f"  overlaps: {len(overlaps)}")
    return "\n".join(out)
