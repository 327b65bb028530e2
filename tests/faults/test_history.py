"""The campaign's history checker on hand-made histories (no processes)."""

from __future__ import annotations

import json

from tests.faults.history import (
    DeadLetterCopy,
    Disruption,
    Execution,
    Run,
    check_dead_letters,
    find_overlaps,
    hits,
    live_pieces,
    parse_ledger,
    projects_of,
)

RUN_END = 100.0


def ex(
    pid: int,
    start: float,
    end: float | None,
    attempt: int = 1,
    stage: str = "s",
    stopped: bool = False,
) -> Execution:
    return Execution("p1", stage, attempt, pid, start, end, stopped)


def overlaps(
    *executions: Execution,
    frozen: dict[int, list[tuple[float, float]]] | None = None,
    deaths: dict[int, float] | None = None,
) -> list[str]:
    found = find_overlaps(executions, frozen=frozen or {}, deaths=deaths or {}, run_end=RUN_END)
    return [o.why for o in found]


def test_sequential_runs_in_two_processes_pass() -> None:
    assert overlaps(ex(1, 0, 1), ex(2, 1.5, 2.5, attempt=2), ex(1, 3, 4, attempt=3)) == []


def test_runs_of_different_stages_or_projects_never_collide() -> None:
    other = Execution("p2", "s", 1, 2, 0.5, 1.5)
    assert overlaps(ex(1, 0, 1), ex(2, 0.5, 1.5, stage="t"), other) == []


def test_two_live_executions_at_once_are_caught() -> None:
    found = find_overlaps(
        [ex(1, 0, 2), ex(2, 1, 3, attempt=2)], frozen={}, deaths={}, run_end=RUN_END
    )
    assert [(o.first.pid, o.second.pid, o.seconds, o.why) for o in found] == [
        (1, 2, 1.0, "both live at once")
    ]


def test_an_execution_without_end_lasts_until_its_process_died() -> None:
    # Killed at 5: whoever starts the stage before that overlaps it.
    assert overlaps(ex(1, 0, None), ex(2, 4, 6, attempt=2), deaths={1: 5}) != []
    assert overlaps(ex(1, 0, None), ex(2, 6, 7, attempt=2), deaths={1: 5}) == []


def test_an_execution_without_end_in_a_living_process_lasts_to_the_end_of_the_run() -> None:
    assert overlaps(ex(1, 0, None), ex(2, 50, 51, attempt=2)) != []


def test_a_frozen_process_is_not_live() -> None:
    # Pid 1 frozen from 1 to 20 mid-stage, killed while frozen: pid 2 ran it meanwhile.
    assert (
        overlaps(ex(1, 0, None), ex(2, 10, 12, attempt=2), frozen={1: [(1, 20)]}, deaths={1: 15})
        == []
    )
    # Resumed at 20 and died at 21 without an end line: excused while 2 ran within the freeze...
    assert (
        overlaps(ex(1, 0, None), ex(2, 10, 12, attempt=2), frozen={1: [(1, 20)]}, deaths={1: 21})
        == []
    )
    # ... but not if 2 was still running when 1 lived on for a second after it came back;
    assert (
        overlaps(ex(1, 0, None), ex(2, 10, 22, attempt=2), frozen={1: [(1, 20)]}, deaths={1: 21})
        != []
    )
    # dying at once as it came back (a crash-only exit: its lease watch found a sync
    # stage still running) is excused.
    assert (
        overlaps(ex(1, 0, None), ex(2, 10, 22, attempt=2), frozen={1: [(1, 20)]}, deaths={1: 20.1})
        == []
    )


def test_an_end_line_after_someone_else_took_the_stage_over_is_an_overlap() -> None:
    # Frozen past its lease; resumed at 20 and went on to write its end at 20.01.
    [why] = overlaps(ex(1, 0, 20.01), ex(2, 10, 12, attempt=2), frozen={1: [(1, 20)]})
    assert "frozen" in why


def test_a_stop_as_its_process_comes_back_after_the_other_is_over_is_excused() -> None:
    # Its task cancelled at once on SIGCONT (20.002): the stage did no more work.
    stopped = ex(1, 0, 20.002, stopped=True)
    assert overlaps(stopped, ex(2, 10, 12, attempt=2), frozen={1: [(1, 20)]}) == []
    # While the other still runs too: it ran to its first checkpoint, and stopped there.
    assert overlaps(stopped, ex(2, 10, 25, attempt=2), frozen={1: [(1, 20)]}) == []
    # Not if it went on for longer than a checkpoint or the lease watch could take.
    late = ex(1, 0, 20.8, stopped=True)
    assert overlaps(late, ex(2, 10, 25, attempt=2), frozen={1: [(1, 20)]}) != []
    # Nor stopped late in a process never frozen.
    assert overlaps(ex(1, 0, 11, stopped=True), ex(2, 10, 12, attempt=2)) != []


def test_two_executions_in_one_process_must_not_overlap() -> None:
    assert overlaps(ex(1, 0, 2), ex(1, 1, 3, attempt=2)) == ["two executions in one process"]


def test_live_pieces_cut_the_frozen_windows_out() -> None:
    assert live_pieces((0, 10), [(2, 3), (5, 12)]) == [(0, 2), (3, 5)]
    assert live_pieces((0, 10), [(20, 30)]) == [(0, 10)]


def test_the_ledger_pairs_lines_and_reports_torn_ones() -> None:
    def line(event: str, t: float, pid: int = 7) -> str:
        return json.dumps(
            {"project_id": "p1", "stage": "s", "attempt": 1, "pid": pid, "event": event, "t": t}
        )

    executions, unreadable = parse_ledger(
        [
            line("start", 1),
            line("end", 2),
            line("start", 3, pid=8),
            line("start", 4, pid=9),
            line("stop", 5, pid=9),
            '{"project_id": "p1", "st',
        ]
    )
    assert executions == [ex(7, 1, 2), ex(8, 3, None), ex(9, 4, 5, stopped=True)]
    assert len(unreadable) == 1


def test_a_disruption_hits_the_runs_its_process_held() -> None:
    runs = [
        Run("worker-1", "a", 1, claimed=1, ended=5, receive_count=1, reason="create"),
        Run("worker-1", "b", 1, claimed=1, ended=None, receive_count=1, reason="create"),
        Run("worker-1", "c", 1, claimed=1, ended=2, receive_count=1, reason="create"),
        Run("worker-2", "d", 1, claimed=1, ended=None, receive_count=1, reason="create"),
        Run("worker-1", "e", 1, claimed=4, ended=None, receive_count=1, reason="create"),
    ]
    freeze = Disruption("freeze", "worker-1", 11, start=3, end=13)
    assert hits(runs, [freeze]) == {"a": 1, "b": 1}


def _item(project_id: str, status: str, attempt: int) -> dict[str, dict[str, str]]:
    return {
        "entity": {"S": "project"},
        "tenant_id": {"S": "demo"},
        "project_id": {"S": project_id},
        "name": {"S": "x"},
        "workflow": {"S": "demo"},
        "status": {"S": status},
        "attempt": {"N": str(attempt)},
        "created_at": {"S": "2026-01-01T00:00:00Z"},
        "updated_at": {"S": "2026-01-01T00:00:00Z"},
    }


def test_failed_iff_dlq_entries_of_its_attempt() -> None:
    items = [_item("ok", "FAILED", 2), _item("none", "FAILED", 1), _item("done", "SUCCEEDED", 1)]
    projects, _ = projects_of([*items, {"entity": {"S": "lock"}}])

    def copy(pid: str, attempt: str) -> DeadLetterCopy:
        return DeadLetterCopy(f"m-{pid}-{attempt}", pid, {"buildq-project-attempt": attempt})

    problems, duplicates = check_dead_letters(
        projects, [copy("ok", "2"), copy("ok", "2"), copy("done", "1")]
    )
    assert duplicates == {"ok": 1}
    assert len(problems) == 2
    assert "none: FAILED" in problems[0]
    assert "done: SUCCEEDED" in problems[1]
    problems, _ = check_dead_letters(projects, [copy("ok", "2"), copy("ok", "1")])
    assert any("carry attempts ['1', '2']" in p for p in problems)
