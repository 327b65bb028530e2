"""Real processes for the benchmark: the emulator, the API, workers, load generators.

A small copy of what ``tests/harness.py`` does (that module imports buildq, which lives
in ``.venv``; this driver runs from ``.tools/bench``), plus a sampler that records the
CPU time and RSS of every process it is told about, so each measurement window can say
where the CPU went. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import boto3
import psutil
from boto3.dynamodb.types import TypeDeserializer

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"  # the benchmarked code, exactly as uv.lock pins it
LOADGEN = ROOT / "bench" / "loadgen.py"
API_KEY = "bench-key"  # tenant "demo"
MACHINE = "machine"  # the sampler's name for all cores together
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    check: Callable[[], T | None], *, timeout: float, interval: float = 0.1, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # not ready yet
            last = exc
        if last and not isinstance(last, Exception):
            return cast(T, last)
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}: last={last!r}")


def epoch(iso: str) -> float:
    """buildq's ISO timestamps (UTC, ``Z``) as epoch seconds."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# -- processes -----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _counts: dict[str, tuple[int, bytes, int]] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def events(self, event: str) -> list[dict[str, Any]]:
        """Structured (JSON) log lines of one event."""
        found = []
        for line in self.log().splitlines():
            if line.startswith("{") and f'"{event}"' in line:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == event:
                    found.append(record)
        return found

    def count(self, needle: str) -> int:
        """How many log lines so far contain ``needle`` (reads only what is new)."""
        offset, partial, total = self._counts.get(needle, (0, b"", 0))
        with self.log_path.open("rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
        lines = (partial + chunk).split(b"\n")
        partial = lines.pop()
        total += sum(1 for line in lines if needle.encode() in line)
        self._counts[needle] = (offset + len(chunk), partial, total)
        return total

    def signal_stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        self.signal_stop()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()


def start_process(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as handle:
        popen = subprocess.Popen(
            argv, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Proc(name, popen, log_path)


def aws_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }


def base_env() -> dict[str, str]:
    """The environment of every child: this one, less anything naming another venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- CPU and memory sampling ---------------------------------------------------------------


@dataclass
class Sample:
    t: float  # epoch seconds
    cpu: float  # user + system seconds so far
    rss: int  # bytes


class Sampler:
    """Every ``interval`` s, the CPU time and RSS of each registered process."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.samples: dict[str, list[Sample]] = {}
        self._procs: dict[str, psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def add(self, name: str, pid: int) -> None:
        with self._lock:
            self._procs[name] = psutil.Process(pid)
            self.samples[name] = []
        self._sample_one(name)

    def remove(self, name: str) -> None:
        self._sample_one(name)
        with self._lock:
            self._procs.pop(name, None)

    def _sample_one(self, name: str) -> None:
        with self._lock:
            proc = self._procs.get(name)
        if proc is None:
            return
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                rss = proc.memory_info().rss
        except psutil.Error:
            return
        cpu = times.user + times.system  # not children's: the driver waits for loadgens
        with self._lock:
            self.samples.setdefault(name, []).append(Sample(time.time(), cpu, rss))

    def _sample_machine(self) -> None:
        """The whole machine as a series too: busy CPU seconds over all cores."""
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        with self._lock:
            self.samples.setdefault(MACHINE, []).append(Sample(time.time(), busy, 0))

    def _run(self) -> None:
        self._sample_machine()
        while not self._stop.wait(self.interval):
            self._sample_machine()
            with self._lock:
                names = list(self._procs)
            for name in names:
                self._sample_one(name)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _window(self, name: str, t0: float, t1: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples.get(name, []) if t0 <= s.t <= t1]

    def cpu_share(self, name: str, t0: float, t1: float) -> float | None:
        """CPU seconds per wall second of ``name`` within [t0, t1] (1.0 = one core)."""
        with self._lock:
            series = list(self.samples.get(name, []))
        before = [s for s in series if s.t <= t0]
        after = [s for s in series if s.t >= t1]
        inside = [s for s in series if t0 <= s.t <= t1]
        first = before[-1] if before else (inside[0] if inside else None)
        last = after[0] if after else (inside[-1] if inside else None)
        if first is None or last is None or last.t - first.t < 0.1:
            return None
        return (last.cpu - first.cpu) / (last.t - first.t)

    def rss_max(self, name: str, t0: float, t1: float) -> int | None:
        window = self._window(name, t0, t1)
        return max((s.rss for s in window), default=None)

    def rss_at(self, name: str, t: float) -> int | None:
        with self._lock:
            series = [s for s in self.samples.get(name, []) if s.t <= t]
        return series[-1].rss if series else None

    def names(self, prefix: str) -> list[str]:
        with self._lock:
            return [name for name in self.samples if name.startswith(prefix)]


# -- the emulator and one isolated buildq deployment ---------------------------------------


class Emulator:
    def __init__(self, log_dir: Path, sampler: Sampler, name: str = "emulator") -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = start_process(
            name,
            [str(VENV_BIN / "buildq"), "emulator", "--port", str(self.port)],
            # moto refuses a second PurgeQueue within 60 s, as SQS does; the benchmark
            # empties its queue between measurements, so it lifts that limit.
            {**base_env(), "MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR": "false"},
            log_dir,
        )
        self.sampler = sampler

        def listening() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_until(listening, timeout=60, what="the emulator to listen")
        sampler.add("emulator", self.proc.pid)

    def stop(self) -> None:
        self.sampler.remove("emulator")
        self.proc.stop()


_deserializer = TypeDeserializer()


def post_demo(api_url: str, name: str, parameters: object, *, timeout: float) -> str:
    """POST one demo project (stdlib HTTP); its id."""
    body = json.dumps({"name": name, "workflow": "demo", "parameters": parameters})
    request = urllib.request.Request(
        f"{api_url}/v1/projects",
        data=body.encode(),
        headers={"authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return str(json.loads(response.read())["id"])


@dataclass
class Stack:
    """Its own table and queues on the shared emulator, and the processes it starts."""

    emulator: Emulator
    log_dir: Path
    sampler: Sampler
    label: str = "stack"
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    procs: list[Proc] = field(default_factory=list)
    api_url: str = ""
    api: Proc | None = None
    workers: list[Proc] = field(default_factory=list)  # the ones running now
    started_workers: int = 0
    receive_wait: int = 5

    @property
    def table_name(self) -> str:
        return f"bench-{self.suffix}"

    @property
    def queue_name(self) -> str:
        return f"bench-{self.suffix}"

    @property
    def dlq_name(self) -> str:
        return f"bench-{self.suffix}-dlq"

    def env(self, **overrides: object) -> dict[str, str]:
        env = {
            **base_env(),
            **aws_env(self.emulator.endpoint),
            "BUILDQ_TABLE_NAME": self.table_name,
            "BUILDQ_QUEUE_NAME": self.queue_name,
            "BUILDQ_DLQ_NAME": self.dlq_name,
            "BUILDQ_LOG_FORMAT": "json",
            "BUILDQ_DRAIN_SECONDS": "2",
            "BUILDQ_METRICS_PORT": "0",
            # A stopping worker first finishes its long poll: 5 s (1 s in --quick) instead
            # of the default 20 keeps the many stops of a benchmark short; an idle worker
            # is waiting in a poll either way.
            "BUILDQ_RECEIVE_WAIT_SECONDS": str(self.receive_wait),
            "BUILDQ_API_KEYS": f"{API_KEY}=demo",
        }
        env.update({f"BUILDQ_{key.upper()}": str(value) for key, value in overrides.items()})
        return env

    def bootstrap(self) -> None:
        result = subprocess.run(
            [str(VENV_BIN / "buildq"), "bootstrap"],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"bootstrap failed: {result.stdout}{result.stderr}")

    def client(self, service: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.emulator.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    def queue_url(self, name: str | None = None) -> str:
        url: str = self.client("sqs").get_queue_url(QueueName=name or self.queue_name)["QueueUrl"]
        return url

    def queue_depth(self, name: str | None = None) -> int:
        """Visible + in-flight messages of the build queue (or another queue)."""
        attributes = self.client("sqs").get_queue_attributes(
            QueueUrl=self.queue_url(name),
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(
            attributes["ApproximateNumberOfMessagesNotVisible"]
        )

    def projects(self, table: str | None = None) -> list[dict[str, Any]]:
        """Every project item of the table, as plain values."""
        dynamodb = self.client("dynamodb")
        kwargs: dict[str, Any] = {
            "TableName": table or self.table_name,
            "FilterExpression": "begins_with(sk, :p)",
            "ExpressionAttributeValues": {":p": {"S": "PROJECT#"}},
        }
        items: list[dict[str, Any]] = []
        while True:
            page = dynamodb.scan(**kwargs)
            items += [
                {key: _deserializer.deserialize(value) for key, value in item.items()}
                for item in page.get("Items", [])
            ]
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _track(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        self.sampler.add(f"{self.label}/{proc.name}", proc.pid)
        return proc

    def start_api(self, **settings: object) -> str:
        port = free_port()
        proc = start_process(
            f"{self.label}-api",
            [str(VENV_BIN / "buildq-api")],
            self.env(api_port=port, **settings),
            self.log_dir,
        )
        proc.name = "api"
        self.api = self._track(proc)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if not proc.alive():
                raise RuntimeError(proc.log())
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        wait_until(healthy, timeout=60, what="the API to listen")
        self.api_url = url
        return url

    def start_worker(self, *, wait: bool = True, **settings: object) -> Proc:
        self.started_workers += 1
        index = self.started_workers
        settings.setdefault("worker_id", f"{self.label}-worker-{index}-{self.suffix}")
        proc = start_process(
            f"{self.label}-worker-{index}",
            [str(VENV_BIN / "buildq-worker")],
            self.env(**settings),
            self.log_dir,
        )
        proc.name = f"worker-{index}"
        self.workers.append(self._track(proc))
        if wait:
            self.wait_started(proc)
        return proc

    def wait_started(self, proc: Proc, needle: str = '"worker.started"') -> None:
        def started() -> bool:
            if not proc.alive():
                raise RuntimeError(proc.log()[-3000:])
            return needle in proc.log()

        wait_until(started, timeout=60, interval=0.05, what=f"{proc.name} to start")

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        """Any other long-running process of this stack (the Celery peer)."""
        proc = start_process(f"{self.label}-{name}", argv, env, self.log_dir)
        proc.name = name
        return self._track(proc)

    def loadgen(self, mode: str, *args: str, timeout: float = 600) -> Any:
        """Run one ``bench/loadgen.py`` mode with ``.venv``'s python; its JSON result."""
        result = subprocess.run(
            [str(VENV_BIN / "python"), str(LOADGEN), mode, *args],
            env=self.env(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"loadgen {mode} failed: {result.stderr.decode()[-3000:]}")
        return json.loads(result.stdout)

    def create(self, count: int, *, concurrency: int = 16, **parameters: object) -> list[str]:
        """Create ``count`` demo projects through the API (set-up, not a measurement);
        their ids. Threads and the stdlib: no process to start, nothing to import."""

        def one(_: int) -> str:
            return post_demo(self.api_url, "bench", parameters, timeout=30)

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, range(count)))

    def start_celery(self, name: str, queue: str, env: dict[str, str], *, threads: int) -> Proc:
        """The Celery peer's worker (``bench.peer_celery``) on ``queue``: a threads pool,
        prefetch 1, acks late (set in the app)."""
        argv = [str(Path(sys.executable).parent / "celery"), "-A", "bench.peer_celery", "worker"]
        argv += ["--pool", "threads", "--concurrency", str(threads), "--prefetch-multiplier", "1"]
        argv += ["--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        argv += ["--without-heartbeat", "--queues", queue]
        return self.start(name, argv, env)

    def wait_succeeded(
        self,
        count: int,
        *,
        timeout: float,
        procs: list[Proc] | None = None,
        needle: str = '"project.succeeded"',
    ) -> None:
        """Until the workers have logged ``count`` ``project.succeeded`` lines (no AWS
        calls: reading the logs costs the emulator nothing)."""
        watched = procs if procs is not None else self.workers

        def done() -> bool:
            return sum(proc.count(needle) for proc in watched) >= count

        wait_until(done, timeout=timeout, interval=0.05, what=f"{count} projects to succeed")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.stop()
            self.sampler.remove(f"{self.label}/{proc.name}")

    def destroy(self) -> None:
        """Kill the processes (nothing of this stack is measured any more) and delete the
        table and queues (keeps the emulator light)."""
        for proc in self.procs:
            if proc.alive():
                proc.kill()
            self.sampler.remove(f"{self.label}/{proc.name}")
        with contextlib.suppress(Exception):
            self.client("dynamodb").delete_table(TableName=self.table_name)
        sqs = self.client("sqs")
        for name in (self.queue_name, self.dlq_name):
            with contextlib.suppress(Exception):
                sqs.delete_queue(QueueUrl=self.queue_url(name))
