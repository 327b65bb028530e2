"""Time in one format and on one clock.

The format: UTC, millisecond ISO-8601 strings that sort as they compare.

The clock: AWS's, not this machine's. Leases, the sweeper's cutoffs and every
timestamp buildq writes are compared with times other processes wrote, so every
process reads time from one clock: the local wall clock plus an estimate of its
offset to the AWS servers' clock (``CLOCK``). Every AWS HTTP response carries a
``Date`` header; ``buildq.aws.aws_clients`` feeds each one to ``CLOCK.observe``
with the local times the request went out and the response came back. Before the
first response the offset is 0 (the local clock).

``Date`` is cut to the second, so one response says only that the offset lies in
``[date - received, date + 1 - sent]``. The samples are combined into the range most
of the recent ones agree on (Marzullo's algorithm, as NTP uses it): samples taken at
different points of a second narrow it to about a round trip, a garbled or lying
header is outvoted, a missing one is skipped, a response slower than 2 s (a long
poll) is not a sample, and after a step of the local clock (the newest few samples
agree with each other and not with the range) the older samples go.

The offset is the point of that range nearest to 0: the local clock is kept as
long as the headers allow it, and otherwise moved by the least they require. A
synced clock (NTP, the Amazon Time Sync Service) is far more precise than a
one-second header, so processes whose clocks agree keep agreeing to the
millisecond instead of each carrying its own estimate's error; a clock that is off
by more than a round trip is corrected to within one. ``CLOCK.error`` bounds how
wrong the offset can be (the range's far edge): at most about a second plus a round
trip after the first response, a round trip once samples span a second. The
claim's margin (``clock_margin_seconds``) covers two processes' errors. The offset
is logged (``clock.offset``) when first estimated and whenever it moves by over a
second, and is the gauge ``buildq_clock_offset_seconds``.

Log lines keep the local clock's timestamps (structlog's): they say when this
process thought it was.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import structlog

log = structlog.get_logger()

SAMPLE_WINDOW = 64  # the most recent samples the estimate is taken over
SAMPLE_SPACING = 0.1  # s (monotonic): responses closer than this to a kept one are skipped
SAMPLE_MAX_AGE = 600.0  # s (monotonic): an older sample no longer counts
SAMPLE_MAX_RTT = 2.0  # s: a slower response (a long poll) says too little to count
STEP_SAMPLES = 4  # this many newest samples that agree, all against the estimate: a step
LOG_CHANGE = 1.0  # s: log the offset again when it moves by more than this
MAX_HELD_BACK = 2.0  # s: a refined estimate holds time back at most this far, never more

CLOCK_MARGIN_SECONDS = 3.0
"""How long past its expiry a lease is taken over, by default (the setting
``BUILDQ_CLOCK_MARGIN_SECONDS``): the holder wrote the expiry and the claimer compares
it with its own now, two estimates of AWS's clock that each may be off by about half a
second plus a round trip. Three seconds cover that with room to spare."""
CLOCK_MARGIN_MS = int(CLOCK_MARGIN_SECONDS * 1000)


class ServerClock:
    """The local wall clock plus an estimated offset to a server's clock, learned
    from HTTP ``Date`` headers (see the module docstring). Thread-safe."""

    def __init__(
        self,
        *,
        window: int = SAMPLE_WINDOW,
        spacing: float = SAMPLE_SPACING,
        max_age: float = SAMPLE_MAX_AGE,
        max_rtt: float = SAMPLE_MAX_RTT,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._spacing = spacing
        self._max_age = max_age
        self._max_rtt = max_rtt
        # (kept at, monotonic; lowest offset, highest offset), oldest first
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._offset = 0.0
        self._error: float | None = None
        self._logged: float | None = None
        self._last_date: tuple[str, float] | None = None
        self._last_time = 0.0

    @property
    def offset(self) -> float:
        """Server time minus local time, s: the nearest to 0 the samples allow (0 until
        the first sample, and while the local clock agrees with them)."""
        return self._offset

    @property
    def error(self) -> float | None:
        """How far ``offset`` may be from the truth, s; None before the first sample."""
        return self._error

    def local(self) -> float:
        """Now on this machine's wall clock, epoch seconds (what samples are taken in)."""
        return self._wall()

    def time(self) -> float:
        """Now on the server's clock, epoch seconds; never earlier than what it last
        said when the estimate is refined by a little (an interval stays positive and
        two times of one process keep their order); a real step (over
        ``MAX_HELD_BACK`` back) is taken as it is."""
        now = self._wall() + self._offset
        with self._lock:
            last = self._last_time
            if last - MAX_HELD_BACK < now < last:
                return last
            self._last_time = now
        return now

    def observe(self, date: object, *, sent: float, received: float) -> bool:
        """One response: its ``Date`` header, and the local wall-clock times its
        request was sent and it was received. Returns whether the sample was kept (not:
        a missing or garbled header, one too soon after the last kept, or one that took
        over ``max_rtt``: its range is too wide to say much)."""
        now = self._monotonic()
        if self._samples and now - self._samples[-1][0] < self._spacing:
            return False
        server = self._parse(date)
        if server is None or not (0 <= received - sent <= self._max_rtt):
            return False
        low, high = server - received, server + 1.0 - sent
        with self._lock:
            self._samples.append((now, low, high))
            while self._samples and now - self._samples[0][0] > self._max_age:
                self._samples.popleft()
            low, high = self._estimate()
            self._offset = min(max(0.0, low), high)
            self._error = max(self._offset - low, high - self._offset)
            changed = self._logged is None or abs(self._offset - self._logged) > LOG_CHANGE
            if changed:
                self._logged = self._offset
        if changed:
            log.info(
                "clock.offset",
                offset_ms=round(self._offset * 1000),
                error_ms=round(self._error * 1000),
                samples=len(self._samples),
            )
        return True

    def _estimate(self) -> tuple[float, float]:
        """The range of offsets the samples agree on. When the newest few agree with
        each other and all disagree with it, this machine's clock (or the server's)
        stepped: the older samples are dropped instead of outvoting the new ones."""
        spans = [(low, high) for _, low, high in self._samples]
        low, high = best_range(spans)
        middle = (low + high) / 2
        newest = spans[-STEP_SAMPLES:]
        if len(newest) == STEP_SAMPLES and all(not (a <= middle <= b) for a, b in newest):
            new_low, new_high = best_range(newest)
            if all(a <= (new_low + new_high) / 2 <= b for a, b in newest):
                for _ in range(len(spans) - STEP_SAMPLES):
                    self._samples.popleft()
                return new_low, new_high
        return low, high

    def _parse(self, date: object) -> float | None:
        """An HTTP date (``Tue, 01 Dec 2026 10:00:00 GMT``) as epoch seconds, or None."""
        if not isinstance(date, str):
            return None
        cached = self._last_date
        if cached is not None and cached[0] == date:
            return cached[1]
        try:
            parsed = parsedate_to_datetime(date)
        except (TypeError, ValueError, IndexError):
            return None
        if parsed is None:  # pragma: no cover: older Pythons answered None
            return None
        if parsed.tzinfo is None:  # "-0000": UTC, by RFC 5322
            parsed = parsed.replace(tzinfo=UTC)
        value = parsed.timestamp()
        self._last_date = (date, value)
        return value


def best_range(ranges: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """The range covered by the most of ``ranges`` (each ``(low, high)``, in order,
    oldest first); of several covered as often, the one the newest range covers."""
    spans = list(ranges)
    edges = sorted(
        [(low, 0) for low, _ in spans] + [(high, 1) for _, high in spans]
    )  # at one point a start sorts before an end: closed ranges that touch overlap
    best, count, start = 0, 0, 0.0
    regions: list[tuple[float, float]] = []
    for value, kind in edges:
        if kind == 0:
            count += 1
            if count > best:
                best, regions = count, []
            start = value
        else:
            if count == best:
                regions.append((start, value))
            count -= 1
    if len(regions) == 1:
        return regions[0]

    def newest(region: tuple[float, float]) -> int:
        middle = (region[0] + region[1]) / 2
        return max(i for i, (low, high) in enumerate(spans) if low <= middle <= high)

    return max(regions, key=newest)


CLOCK = ServerClock()
"""This process's clock: every buildq time comes from it."""


def utcnow() -> datetime:
    return datetime.fromtimestamp(CLOCK.time(), UTC)


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def now_iso() -> str:
    return iso(utcnow())


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def epoch_ms(ts: datetime | None = None) -> int:
    return int((CLOCK.time() if ts is None else ts.timestamp()) * 1000)
