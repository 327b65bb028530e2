"""A randomized fault campaign: real workers under random AWS faults, kills and
freezes, a mixed workload, and a history checker (``history``) over what it left.

Three workers, one of them with its wall clock 20 s ahead, talk to the emulator
through the fault proxy; the API talks to it directly (so every POST gets its 202).
Over the first minute the campaign creates projects of every kind (successes,
failures that recover, that exhaust their attempts, that are permanent,
cancellations, sync stages), every one of them writing a ledger of its stage
executions. During a middle phase of about 90 s it injects faults at random into
every AWS operation the workers use, kills a worker now and then (a fresh one takes
its place) and freezes one past its lease (SIGSTOP .. SIGCONT). Then it lets the
system converge and checks the history (see ``history``).

Seeded: the seed is printed; ``BUILDQ_CAMPAIGN_SEED=<n>`` replays its choices (not
its timings). Run with ``-s`` to see the table of what was injected and seen::

    BUILDQ_CAMPAIGN_SEED=1 .venv/bin/pytest -s tests/faults/test_campaign.py
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.history import (
    DeadLetterCopy,
    Disruption,
    History,
    check,
    dead_letter_copy,
    parse_ledger,
    projects_of,
)
from tests.faults.proxy import Fault, FaultProxy, Kind
from tests.harness import Proc, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
SAMPLES = "tests.e2e.sample_workflows:WORKFLOWS"
EMPTY = {"visible": 0, "in_flight": 0, "delayed": 0}

# Every AWS operation the workers use, and what may happen to each request.
OPERATIONS = (
    "UpdateItem",
    "GetItem",
    "Query",
    "PutItem",
    "TransactWriteItems",
    "SendMessage",
    "ReceiveMessage",
    "ChangeMessageVisibility",
    "ChangeMessageVisibilityBatch",
    "DeleteMessageBatch",
    "DeleteMessage",
    "GetQueueAttributes",
)
FAULT_KINDS: tuple[Kind, ...] = ("error", "throttle", "hang", "drop_response", "delay")

MAX_ATTEMPTS = 3
WORKER: dict[str, Any] = {
    "workflows": SAMPLES,
    "visibility_timeout": 6,
    "lease_seconds": 4,
    "max_attempts": MAX_ATTEMPTS,
    "retry_base_seconds": 0.2,
    "sweep_interval": 1,
    "sweep_queued_after": 8,
    "sweep_building_after": 2,
    "sync_stage_grace_seconds": 5,
    "max_workflow_workers": 5,
}
WORKERS = 3
SKEW, SKEW_SECONDS = "+20s", 20.0

# The timeline, in seconds from the campaign's start.
PROJECTS, CREATE_SECONDS = 165, 60.0
FAULTS_FROM, FAULTS_UNTIL, FAULT_WAVES = 10.0, 100.0, 3
CHAOS_FROM, CHAOS_UNTIL = 12.0, 72.0  # kills and freezes, while projects are in flight
KILLS, FREEZES = (3, 4), (2, 3)  # how many: bounds of a random draw
FREEZE_SECONDS = (9.0, 13.0)  # past the lease (4 s) + the claim margin (3 s)
CONVERGE_SECONDS = 120.0
TICK = 0.1


def campaign_seed() -> int:
    given = os.environ.get("BUILDQ_CAMPAIGN_SEED")
    return int(given) if given else random.SystemRandom().randrange(1, 2**31)


# -- the workload ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectSpec:
    kind: str
    workflow: str
    parameters: dict[str, Any]
    cancel_after: float | None = None  # seconds after its 202


STAGES = {
    "ledgered-demo": ("plan", "generate", "build", "package"),
    "ledgered": ("fetch", "compile", "link", "verify"),  # async, sync, async, sync
}
KIND_WEIGHTS = {
    "success": 35,
    "recovers": 15,  # transient, fail_times=1
    "exhausts": 10,  # transient every attempt
    "permanent": 10,
    "cancelled": 15,
    "sync-success": 15,
}


def draw_project(rng: random.Random, ledger: Path) -> ProjectSpec:
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    workflow = "ledgered" if kind == "sync-success" else rng.choice(list(STAGES))
    parameters: dict[str, Any] = {
        "ledger": str(ledger),
        "stage_seconds": round(rng.uniform(0.05, 0.5), 3),
    }
    stage = rng.choice(STAGES[workflow])
    cancel_after = None
    if kind == "recovers":
        parameters |= {"fail_at_stage": stage, "fail_times": 1}
    elif kind == "exhausts":
        parameters |= {"fail_at_stage": stage}
    elif kind == "permanent":
        parameters |= {"fail_at_stage": stage, "fail_mode": "permanent"}
    elif kind == "cancelled":
        parameters["stage_seconds"] = round(rng.uniform(0.3, 0.5), 3)
        cancel_after = round(rng.uniform(0.0, 3.0), 3)
    return ProjectSpec(kind, workflow, parameters, cancel_after)


def draw_faults(rng: random.Random) -> list[Fault]:
    """One wave of rules: for each operation, 2-5 % of its requests hit, split at
    random over the kinds."""
    rules = []
    for operation in OPERATIONS:
        rate = rng.uniform(0.02, 0.05)
        weights = [rng.random() for _ in FAULT_KINDS]
        for kind, weight in zip(FAULT_KINDS, weights, strict=True):
            seconds = None
            if kind == "hang":
                seconds = round(rng.uniform(1.0, 3.0), 2)
            elif kind == "delay":
                seconds = round(rng.uniform(0.2, 1.0), 2)
            probability = rate * weight / sum(weights)
            rules.append(
                Fault(kind=kind, operation=operation, probability=probability, seconds=seconds)
            )
    return rules


# -- the chaos: faults, kills, freezes -------------------------------------------------------


@dataclass
class Chaos:
    """Runs the fault phase on a thread of its own: fault waves, kills (each followed
    by a fresh worker), freezes; it also replaces a worker that exits by itself."""

    stack: Stack
    proxy: FaultProxy
    rng: random.Random
    t0: float
    ledger: Path
    workers: list[Proc] = field(default_factory=list)  # the current fleet
    skews: dict[str, float] = field(default_factory=dict)
    offsets: dict[str, str | None] = field(default_factory=dict)
    disruptions: list[Disruption] = field(default_factory=list)
    deaths: dict[int, float] = field(default_factory=dict)
    killed: set[int] = field(default_factory=set)
    waves: list[tuple[float, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # chaos actions that found no victim
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _frozen: dict[int, tuple[Proc, float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start_worker(self, clock_offset: str | None) -> Proc:
        settings = dict(WORKER)
        if clock_offset is not None:
            settings["clock_offset"] = clock_offset
        proc = self.stack.start_worker(**settings)
        self.skews[proc.name] = SKEW_SECONDS if clock_offset == SKEW else 0.0
        self.offsets[proc.name] = clock_offset
        with self._lock:
            self.workers.append(proc)
        threading.Thread(target=self._watch, args=(proc,), daemon=True).start()
        return proc

    def _watch(self, proc: Proc) -> None:
        proc.popen.wait()
        self.deaths[proc.popen.pid] = time.monotonic()

    # -- the schedule --

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            self._schedule()
        except BaseException as exc:  # the main thread re-raises it
            self.error = exc
        finally:
            for proc, _, _ in list(self._frozen.values()):
                self._resume(proc)
            self.proxy.clear()
            self.done.set()

    def _schedule(self) -> None:
        rng = self.rng
        wave_at = [
            FAULTS_FROM + i * (FAULTS_UNTIL - FAULTS_FROM) / FAULT_WAVES for i in range(FAULT_WAVES)
        ]
        waves = [draw_faults(rng) for _ in wave_at]
        kills = sorted(rng.uniform(CHAOS_FROM, CHAOS_UNTIL) for _ in range(rng.randint(*KILLS)))
        freezes = sorted(
            (rng.uniform(CHAOS_FROM, CHAOS_UNTIL - 10), rng.uniform(*FREEZE_SECONDS))
            for _ in range(rng.randint(*FREEZES))
        )
        while self.now() < FAULTS_UNTIL:
            now = self.now()
            if wave_at and now >= wave_at[0]:
                wave_at.pop(0)
                self.proxy.clear()
                for fault in waves.pop(0):
                    self.proxy.add(fault)
                self.waves.append((now, FAULT_WAVES - len(waves)))
            for proc, _, until in list(self._frozen.values()):
                if now >= until:
                    self._resume(proc)
            if kills and now >= kills[0]:
                kills.pop(0)
                self._kill()
            if freezes and now >= freezes[0][0]:
                if self._frozen:  # one at a time: try again in a second
                    freezes[0] = (now + 1.0, freezes[0][1])
                else:
                    self._freeze(freezes.pop(0)[1])
            self._replace_the_dead()
            time.sleep(TICK)

    def _candidates(self) -> tuple[list[Proc], list[Proc]]:
        """Live, unfrozen workers, and those of them running a stage right now."""
        frozen = {proc.popen.pid for proc, _, _ in self._frozen.values()}
        live = [w for w in self.workers if w.alive() and w.popen.pid not in frozen]
        executions, _ = parse_ledger(self.ledger.read_text(errors="replace").splitlines())
        busy = {e.pid for e in executions if e.end is None}
        return live, [w for w in live if w.popen.pid in busy]

    def _kill(self) -> None:
        live, busy = self._candidates()
        if not live:
            self.skipped.append(f"kill at {self.now():.1f} s: no live worker")
            return
        victim = self.rng.choice(busy or live)
        at = time.monotonic()
        self.killed.add(victim.popen.pid)
        victim.kill()
        self.disruptions.append(Disruption("kill", victim.name, victim.popen.pid, at, at))
        self._replace(victim)

    def _freeze(self, seconds: float) -> None:
        live, busy = self._candidates()
        if len(live) < 2:  # keep one worker going
            self.skipped.append(f"freeze at {self.now():.1f} s: {len(live)} live worker(s)")
            return
        victim = self.rng.choice(busy or live)
        victim.signal(signal.SIGSTOP)
        _wait_stopped(victim.popen.pid)
        at = time.monotonic()  # frozen from here at the latest: live until then
        self._frozen[victim.popen.pid] = (victim, at, self.now() + seconds)

    def _resume(self, proc: Proc) -> None:
        _, at, _ = self._frozen.pop(proc.popen.pid)
        resumed = time.monotonic()  # live from here at the earliest
        proc.signal(signal.SIGCONT)
        self.disruptions.append(Disruption("freeze", proc.name, proc.popen.pid, at, resumed))

    def _replace(self, dead: Proc) -> None:
        with self._lock:
            self.workers.remove(dead)
        self.start_worker(self.offsets[dead.name])

    def _replace_the_dead(self) -> None:
        for proc in list(self.workers):
            if proc.alive():
                continue
            pid = proc.popen.pid
            if pid not in self.killed:  # it ended by itself (crash-only)
                died = self.deaths.get(pid, time.monotonic())
                self.disruptions.append(Disruption("crash", proc.name, pid, died, died))
            self._replace(proc)

    def keep_fleet(self) -> None:
        """After the chaos: every worker that died replaced, so ``WORKERS`` run."""
        self._replace_the_dead()
        while sum(w.alive() for w in self.workers) < WORKERS:
            self.start_worker(None)


def _wait_stopped(pid: int, timeout: float = 2.0) -> None:
    """Until the kernel shows ``pid`` stopped (state T), so its frozen window starts no
    earlier than it really does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rpartition(")")[2].split()[0] in ("T", "t"):
            return
        time.sleep(0.001)


# -- gathering the history -------------------------------------------------------------------


def scan(stack: Stack) -> list[dict[str, Any]]:
    client = stack.client("dynamodb")
    items: list[dict[str, Any]] = []
    request: dict[str, Any] = {"TableName": stack.table_name, "ConsistentRead": True}
    while True:
        page = client.scan(**request)
        items.extend(page["Items"])
        if "LastEvaluatedKey" not in page:
            return items
        request["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def read_dlq(stack: Stack) -> list[DeadLetterCopy]:
    """Every DLQ message (long polls until two come back empty); hidden for 5 min."""
    sqs = stack.client("sqs")
    url = stack.queue_url(dlq=True)
    copies: dict[str, DeadLetterCopy] = {}
    empty = 0
    while empty < 2:
        batch = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            VisibilityTimeout=300,
            WaitTimeSeconds=1,
        ).get("Messages", [])
        empty = 0 if batch else empty + 1
        for message in batch:
            attributes = {
                name: str(value.get("StringValue"))
                for name, value in message.get("MessageAttributes", {}).items()
            }
            copies[message["MessageId"]] = dead_letter_copy(
                message["MessageId"], message["Body"], attributes
            )
    return list(copies.values())


def converge(stack: Stack, accepted: dict[str, str], timeout: float) -> float | None:
    """Wait until every accepted project is terminal, every FAILED one on the DLQ as
    its record says, and the build queue empty; how long it took (None: it did not)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        projects, _ = projects_of(scan(stack))
        pending = [
            pid
            for pid in accepted
            if pid not in projects
            or projects[pid].status.value not in ("SUCCEEDED", "FAILED", "CANCELLED")
            or (
                projects[pid].status.value == "FAILED"
                and projects[pid].dead_lettered_attempt != projects[pid].attempt
            )
        ]
        if not pending and stack.queue_depth() == EMPTY:
            return time.monotonic() - began
        time.sleep(1.0)
    return None


# -- the campaign ----------------------------------------------------------------------------


def test_randomized_fault_campaign(
    stack: Stack, emulator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = campaign_seed()
    print(f"\nfault campaign seed: {seed} (BUILDQ_CAMPAIGN_SEED={seed} replays its choices)")
    rng = random.Random(seed)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the processes import tests.e2e
    ledger = tmp_path / "ledger.jsonl"
    ledger.touch()
    # The redrive count: kills and redeliveries must not move a message to the DLQ.
    stack.bootstrap(max_attempts=50)
    with FaultProxy(upstream=emulator, seed=seed) as proxy:
        try:
            stack.via(proxy.url)
            # Through the proxy too: a POST may get a 503 (a client retries it under its
            # Idempotency-Key) or land while its answer is lost.
            stack.start_api(workflows=SAMPLES)
            t0 = time.monotonic()
            chaos = Chaos(stack, proxy, rng, t0, ledger)
            notes: list[str] = []
            skewed_index = rng.randrange(WORKERS)
            for index in range(WORKERS):
                chaos.start_worker(SKEW if index == skewed_index else None)
            skewed = chaos.workers[skewed_index]
            offset = _clock_offset(skewed, timeout=15)
            if offset is None or abs(offset + SKEW_SECONDS) > 1.0:
                notes.append(f"{skewed.name} estimated clock.offset {offset}, not about -20 s")
            t0 = chaos.t0 = time.monotonic()
            chaos.start()
            accepted, refused = _workload(stack, rng, ledger, t0, chaos)
            chaos.join(timeout=FAULTS_UNTIL + 60)
            assert chaos.done.is_set(), "the chaos thread did not end"
            proxy.clear()
            chaos.keep_fleet()
            took = converge(stack, accepted, CONVERGE_SECONDS)
            if took is None:
                notes.append(f"did not converge within {CONVERGE_SECONDS:.0f} s")
            for proc in [p for p in stack.procs if p.name in chaos.skews]:
                if chaos.offsets.get(proc.name) == SKEW:
                    late = _clock_offset(proc, timeout=0)
                    if late is not None and abs(late + SKEW_SECONDS) > 1.0:
                        notes.append(f"{proc.name} estimated clock.offset {late}, not about -20 s")
            run_end = time.monotonic()
            history = History(
                seed=seed,
                accepted=accepted,
                items=scan(stack),
                dead_letters=read_dlq(stack),
                ledger=ledger.read_text(errors="replace").splitlines(),
                events=stack.events(),
                skews=chaos.skews,
                pids={p.name: p.popen.pid for p in stack.procs if p.name in chaos.skews},
                disruptions=chaos.disruptions,
                deaths=dict(chaos.deaths),
                exit_codes={p.name: p.popen.poll() for p in stack.procs if p.name in chaos.skews},
                depth=stack.queue_depth(),
                injected=dict(proxy.injected),
                requests=dict(proxy.requests),
                max_attempts=MAX_ATTEMPTS,
                wall_minus_monotonic=time.time() - time.monotonic(),
                t0=t0,
                run_end=run_end,
                notes=notes,
                refused=refused,
            )
            verdict = check(history)
            converged = "did not converge" if took is None else f"converged in {took:.0f} s"
            table = (
                f"{verdict.table}\n  {converged}; skewed worker {skewed.name} offset "
                f"{offset}; fault waves at {[round(t) for t, _ in chaos.waves]} s; "
                f"chaos skipped: {chaos.skipped or 'none'}; "
                f"logs and ledger in {tmp_path}"
            )
            print(table)
            for violation in verdict.violations:
                print(f"VIOLATION {violation}")
            assert len(accepted) >= 150, f"only {len(accepted)} projects accepted\n{table}"
            assert verdict, "\n".join([table, *verdict.violations])
        finally:
            stack.stop()  # while the proxy still serves their last calls


def _clock_offset(worker: Proc, timeout: float) -> float | None:
    """The worker's latest estimate of its clock's offset to AWS's, s."""
    deadline = time.monotonic() + timeout
    while True:
        logged = worker.events("clock.offset")
        if logged:
            return float(logged[-1]["offset_ms"]) / 1000
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def _workload(
    stack: Stack, rng: random.Random, ledger: Path, t0: float, chaos: Chaos
) -> tuple[dict[str, str], int]:
    """Create the projects over ``CREATE_SECONDS`` and cancel some; returns the
    accepted ones (id -> kind) and how many POSTs got no 202."""
    specs = [draw_project(rng, ledger) for _ in range(PROJECTS)]
    accepted: dict[str, str] = {}
    refused = 0
    cancels: list[tuple[float, str]] = []

    def cancel_due(http: Any) -> None:
        now = time.monotonic()
        for entry in [c for c in cancels if c[0] <= now]:
            cancels.remove(entry)
            _post(http, f"/v1/projects/{entry[1]}/cancel", None, key=None)

    with stack.http() as http:
        for index, spec in enumerate(specs):
            due = t0 + index * CREATE_SECONDS / PROJECTS
            while time.monotonic() < due:
                cancel_due(http)
                time.sleep(min(0.05, max(0.0, due - time.monotonic())))
            if chaos.error is not None:
                raise chaos.error
            response = _post(
                http,
                "/v1/projects",
                {"name": spec.kind, "workflow": spec.workflow, "parameters": spec.parameters},
                key=f"campaign-{index}",
            )
            if response.status_code != 202:
                refused += 1
                continue
            project_id = str(response.json()["id"])
            accepted[project_id] = spec.kind
            if spec.cancel_after is not None:
                cancels.append((time.monotonic() + spec.cancel_after, project_id))
        while cancels:
            cancel_due(http)
            time.sleep(0.05)
    return accepted, refused


POST_TRIES = 5


def _post(http: Any, path: str, body: dict[str, Any] | None, *, key: str | None) -> Any:
    """A POST as a careful client sends it: a 5xx (or a lost answer) is tried again,
    under the same Idempotency-Key, after the Retry-After the API gave."""
    headers = {"Idempotency-Key": key} if key else {}
    response = None
    for _ in range(POST_TRIES):
        try:
            response = http.post(path, json=body, headers=headers)
        except httpx.TransportError:
            time.sleep(0.5)
            continue
        if response.status_code < 500:
            return response
        time.sleep(min(float(response.headers.get("Retry-After", 1)), 2.0))
    return response if response is not None else httpx.Response(599)


def test_the_fault_waves_cover_every_operation_and_kind() -> None:
    """The campaign's draw (no processes): every operation gets every kind, 2-5 % in all."""
    rules = draw_faults(random.Random(1))
    assert {(r.operation, r.kind) for r in rules} == {
        (op, kind) for op in OPERATIONS for kind in FAULT_KINDS
    }
    for operation in OPERATIONS:
        total = sum(r.probability for r in rules if r.operation == operation)
        assert 0.02 <= total <= 0.05 + 1e-9
    specs = [draw_project(random.Random(seed), Path("l")) for seed in range(200)]
    assert {s.kind for s in specs} == set(KIND_WEIGHTS)
    assert all(json.dumps(s.parameters) for s in specs)
