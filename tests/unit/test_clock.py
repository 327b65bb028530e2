"""The process clock: AWS's time, estimated from the Date headers of AWS responses."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest
from structlog.testing import capture_logs

from buildq import clock
from buildq.clock import ServerClock, best_range

TRUE_DATE = object()  # Machine.call's default: the server's true Date header


class Machine:
    """A local wall clock that is ``skew`` s off the server's, a monotonic clock, and
    a server that answers every request ``rtt`` s after it is sent (writing its Date
    half-way), cut to the second as HTTP dates are."""

    def __init__(self, skew: float, *, start: float = 1_796_000_000.25, rtt: float = 0.01):
        self.server_time = start
        self.skew = skew
        self.rtt = rtt
        self.mono = 1000.0

    def wall(self) -> float:
        return self.server_time + self.skew

    def monotonic(self) -> float:
        return self.mono

    def clock(self, **kwargs: Any) -> ServerClock:
        return ServerClock(wall=self.wall, monotonic=self.monotonic, **kwargs)

    def call(self, target: ServerClock, *, date: object = TRUE_DATE) -> bool:
        """One request and its response; then 0.137 s pass (a new phase of the second)."""
        sent = self.wall()
        self.server_time += self.rtt / 2
        header = http_date(self.server_time) if date is TRUE_DATE else date
        self.server_time += self.rtt / 2
        kept = target.observe(header, sent=sent, received=self.wall())
        self.advance(0.137)
        return kept

    def advance(self, seconds: float) -> None:
        self.server_time += seconds
        self.mono += seconds


def http_date(epoch: float) -> str:
    return format_datetime(datetime.fromtimestamp(int(epoch), UTC), usegmt=True)


def test_before_any_response_the_offset_is_zero_and_time_is_the_local_clock() -> None:
    machine = Machine(skew=50)
    fresh = machine.clock()
    assert fresh.offset == 0.0
    assert fresh.error is None
    assert fresh.time() == machine.wall()


def test_one_response_brackets_the_offset_within_a_second_and_the_round_trip() -> None:
    machine = Machine(skew=50, rtt=0.2)  # this machine runs 50 s fast
    est = machine.clock()
    assert machine.call(est)
    assert est.error is not None
    assert est.error <= 1 + 0.2
    assert abs(est.offset - -50) <= est.error
    assert abs(est.time() - machine.server_time) <= est.error


@pytest.mark.parametrize("skew", [50.0, -30.0, 0.0, 12.345, -0.5])
def test_responses_at_different_points_of_a_second_narrow_it_to_about_a_round_trip(
    skew: float,
) -> None:
    machine = Machine(skew=skew, rtt=0.01)
    est = machine.clock()
    for _ in range(40):
        machine.call(est)
    assert est.error is not None
    assert est.error < 0.05  # the range: about a round trip either side
    assert abs(est.offset + skew) <= est.error
    assert abs(est.time() - machine.server_time) <= est.error


@pytest.mark.parametrize("skew", [0.0, 0.004, -0.004])
def test_a_clock_the_headers_agree_with_is_not_moved(skew: float) -> None:
    """A synced clock is more precise than a one-second Date: the offset stays 0
    from the first response on, so two synced processes keep agreeing to the
    millisecond instead of each carrying its own estimate's error (CI saw two
    processes on one machine 0.24 s apart when the offset was the range's middle)."""
    machine = Machine(skew=skew, rtt=0.01)
    ests = [machine.clock(), machine.clock()]
    for i in range(40):
        machine.call(ests[i % 2])
        assert [est.offset for est in ests[: i + 1]] == [0.0] * min(i + 1, 2)
    assert ests[0].time() == ests[1].time() == machine.wall()


def test_a_clock_the_headers_disagree_with_moves_by_the_least_they_require() -> None:
    machine = Machine(skew=3.0, rtt=0.01)  # 3 s fast: no Date can be read as agreeing
    est = machine.clock()
    machine.call(est)
    assert est.error is not None
    # one response: the range is [date - received, date + 1 - sent], and the offset
    # is its edge nearest to 0 (the truth lies at most the range's width below it)
    assert est.offset - est.error <= -3.0 <= est.offset < -2.0
    for _ in range(40):
        machine.call(est)
    assert abs(est.offset + 3.0) <= est.error < 0.05


@pytest.mark.parametrize(
    "garbled",
    [None, "", "yesterday", "Tue, 32 Dec 2026 99:00:00 GMT", 1_796_000_000, b"Tue", "GMT"],
)
def test_a_missing_or_garbled_date_is_ignored(garbled: object) -> None:
    machine = Machine(skew=50)
    est = machine.clock()
    assert not machine.call(est, date=garbled)
    assert (est.offset, est.error) == (0.0, None)
    machine.call(est)
    before = est.offset
    assert not machine.call(est, date=garbled)
    assert est.offset == before


def test_a_response_that_lies_about_the_time_is_outvoted() -> None:
    machine = Machine(skew=-30)
    est = machine.clock()
    for _ in range(10):
        machine.call(est)
    assert machine.call(est, date=http_date(machine.server_time + 3600))  # one liar
    for _ in range(2):
        machine.call(est)
    assert abs(est.offset - 30) < 0.2


def test_a_slow_response_a_long_poll_say_does_not_count() -> None:
    machine = Machine(skew=5, rtt=20.0)  # its range would be 21 s wide
    est = machine.clock()
    assert not machine.call(est)
    assert (est.offset, est.error) == (0.0, None)


def test_responses_close_together_count_once() -> None:
    machine = Machine(skew=5)
    est = machine.clock(spacing=0.1)
    assert machine.call(est)
    machine.mono -= 0.137 - 0.05  # the next response 50 ms after the first
    assert not machine.call(est)
    assert machine.call(est)


def test_the_window_keeps_the_most_recent_samples_and_forgets_old_ones() -> None:
    machine = Machine(skew=0)
    est = machine.clock(window=8, max_age=60)
    for _ in range(20):
        machine.call(est)
    assert len(est._samples) == 8
    machine.advance(61)
    machine.call(est)
    assert len(est._samples) == 1  # the others were over a minute old


def test_after_the_local_clock_steps_the_estimate_follows_within_a_few_samples() -> None:
    machine = Machine(skew=0)
    est = machine.clock(window=64)
    for _ in range(60):
        machine.call(est)
    assert abs(est.offset) < 0.02
    machine.skew = 7.5  # NTP stepped this machine's clock 7.5 s ahead
    for _ in range(clock.STEP_SAMPLES):
        machine.call(est)
    assert abs(est.offset + 7.5) < 0.6  # four new samples, not 33 of 64, win
    for _ in range(20):
        machine.call(est)
    assert abs(est.offset + 7.5) < 0.02


def test_the_offset_is_logged_when_first_estimated_and_when_it_moves_over_a_second() -> None:
    machine = Machine(skew=50)
    est = machine.clock()
    with capture_logs() as logs:
        for _ in range(10):
            machine.call(est)
        machine.skew = 52  # a 2 s step
        for _ in range(10):
            machine.call(est)
    offsets = [entry for entry in logs if entry["event"] == "clock.offset"]
    assert len(offsets) == 2, offsets
    assert abs(offsets[0]["offset_ms"] + 50_000) <= 1200
    assert abs(offsets[1]["offset_ms"] + 52_000) <= 1200
    assert offsets[0]["samples"] == 1


def test_best_range_is_where_most_ranges_agree_and_the_newest_breaks_a_tie() -> None:
    assert best_range([(0, 1)]) == (0, 1)
    assert best_range([(0, 1), (0.5, 2), (0.7, 3)]) == (0.7, 1)
    assert best_range([(0, 1), (1, 2)]) == (1, 1)  # closed ranges that touch agree
    assert best_range([(0, 1), (0.2, 0.8), (5, 6)]) == (0.2, 0.8)  # the outlier loses
    assert best_range([(0, 1), (5, 6)]) == (5, 6)  # a tie: the newer wins
    assert best_range([(5, 6), (0, 1)]) == (0, 1)


def test_the_module_s_time_is_the_process_clock_s(monkeypatch: pytest.MonkeyPatch) -> None:
    machine = Machine(skew=50)
    est = machine.clock()
    for _ in range(40):
        machine.call(est)
    monkeypatch.setattr(clock, "CLOCK", est)
    truth = machine.server_time
    assert abs(clock.epoch_ms() - truth * 1000) < 20
    assert abs(clock.utcnow().timestamp() - truth) < 0.02
    assert abs(clock.parse_iso(clock.now_iso()).timestamp() - truth) < 0.021
    fixed = datetime(2026, 5, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    assert clock.epoch_ms(fixed) == int(fixed.timestamp() * 1000)  # a given time is as is


def test_time_never_runs_back_while_the_estimate_is_refined() -> None:
    """A refined estimate can move the offset back by part of a second: the process's
    time holds still meanwhile, so its intervals stay positive and in order (a run's
    start and end, two runs of one slot)."""
    machine = Machine(skew=0.0, rtt=0.01)
    est = machine.clock()
    seen = [est.time()]
    for _ in range(40):
        machine.call(est)
        seen.append(est.time())
    assert seen == sorted(seen)
    assert abs(est.time() - machine.server_time) < 0.02


def test_a_step_of_the_local_clock_is_not_held_back() -> None:
    """Holding time still is only for refinements: when this machine's clock steps
    30 s back, time follows at once (a 30 s freeze would stall every lease), and is on
    the server's clock again as soon as the estimate has followed the step."""
    machine = Machine(skew=0.0, rtt=0.01)
    est = machine.clock()
    for _ in range(10):
        machine.call(est)
    before = est.time()
    machine.skew = -30.0
    assert est.time() < before - 29  # not frozen at ``before``
    for _ in range(10):
        machine.call(est)
    assert abs(est.time() - machine.server_time) < 0.05
