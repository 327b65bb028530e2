"""Real processes for tests: the emulator, the API under uvicorn, worker processes.

Nothing here is mocked: every process is started from its console script and
talks to the emulator over HTTP, exactly as in production.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import boto3
import httpx

from buildq.aws import aws_clients
from buildq.resources import bootstrap
from buildq.settings import Settings
from buildq.store import DynamoProjectStore

BIN = Path(sys.executable).parent
API_KEY = "test-key"  # tenant "demo"
OTHER_API_KEY = "other-key"  # tenant "other"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    check: Callable[[], T | None], *, timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
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
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last={last!r}")


def create_demo(http: httpx.Client, name: str = "p", **parameters: Any) -> str:
    """POST a ``demo`` project; returns its id."""
    response = http.post(
        "/v1/projects", json={"name": name, "workflow": "demo", "parameters": parameters}
    )
    assert response.status_code == 202, response.text
    project_id: str = response.json()["id"]
    return project_id


@dataclass
class Proc:
    """A started process and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """The process's structured log lines (JSON), optionally of one event."""
        parsed = []
        for line in self.log().splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if event is None or record.get("event") == event:
                parsed.append(record)
        return parsed

    def kill(self) -> float:
        """SIGKILL, wait until it is gone; returns the time of death (epoch seconds)."""
        self.popen.kill()
        self.popen.wait()
        return time.time()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


def start_process(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Proc:
    log_path = log_dir / f"{name}.log"
    handle = log_path.open("wb")
    popen = subprocess.Popen(
        argv, env=env, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    handle.close()
    return Proc(name, popen, log_path)


def skewed_clock_env(offset: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """What a process's environment needs for its wall clock to run ``offset`` off
    ("+50s", "-30s"): the libfaketime shipped by the PyPI package ``libfaketime`` (the
    dev group), preloaded. Monotonic clocks stay true: the event loop runs on them."""
    spec = importlib.util.find_spec("libfaketime")
    if spec is None or not spec.origin:
        raise RuntimeError("libfaketime is not installed (make install)")
    library = Path(spec.origin).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1"
    assert library.is_file(), f"libfaketime ships no {library}"
    preload = " ".join(p for p in ((env or {}).get("LD_PRELOAD", ""), str(library)) if p)
    return {
        "LD_PRELOAD": preload,
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "DONT_FAKE_MONOTONIC": "1",  # the same, as older libfaketime spells it
    }


def aws_env(endpoint: str, sqs_endpoint: str | None = None) -> dict[str, str]:
    """AWS settings for a process: everything at ``endpoint``, except SQS at
    ``sqs_endpoint`` when given (botocore's service-specific ``AWS_ENDPOINT_URL_SQS``)."""
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }
    if sqs_endpoint is not None:
        env["AWS_ENDPOINT_URL_SQS"] = sqs_endpoint
    return env


def _without_service_endpoints(env: dict[str, str]) -> dict[str, str]:
    """``env`` less botocore's service-specific endpoints (``AWS_ENDPOINT_URL_<SERVICE>``)."""
    return {key: value for key, value in env.items() if not key.startswith("AWS_ENDPOINT_URL_")}


def _listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@contextmanager
def running_emulator(log_dir: Path, port: int | None = None) -> Iterator[str]:
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = start_process(
        "emulator", [str(BIN / "buildq"), "emulator", "--port", str(port)], env, log_dir
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: _listening(port),
            timeout=30,
            what="the emulator to listen",
        )
        yield endpoint
    finally:
        proc.stop()


@dataclass
class Stack:
    """One isolated buildq deployment on the shared emulator: its own table and
    queues, and whatever API and worker processes a test starts.

    ``endpoint`` is where bootstrap and the test's own inspection (``client``,
    ``with_store``) go. The processes the stack starts (API, workers, CLI) use
    ``process_endpoint`` when it is set (``via``), e.g. a ``FaultProxy`` in front of
    the emulator, so a test injects faults into them and still sees the truth.

    ``sqs_endpoint``, when set (by default the test process's ``AWS_ENDPOINT_URL_SQS``:
    LocalStack under ``BUILDQ_TEST_SQS=localstack``), is where SQS is instead, for the
    test's own clients and for the processes; those started ``via`` a proxy send SQS
    to the proxy too, which routes it there (``FaultProxy(upstreams=...)``)."""

    endpoint: str
    log_dir: Path
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    procs: list[Proc] = field(default_factory=list)
    api_url: str | None = None
    process_endpoint: str | None = None
    sqs_endpoint: str | None = field(
        default_factory=lambda: os.environ.get("AWS_ENDPOINT_URL_SQS") or None
    )

    def via(self, endpoint: str) -> Stack:
        """Processes started from now on talk to AWS through ``endpoint``."""
        self.process_endpoint = endpoint
        return self

    @property
    def table_name(self) -> str:
        return f"buildq-test-{self.suffix}"

    @property
    def queue_name(self) -> str:
        return f"buildq-test-{self.suffix}"

    @property
    def dlq_name(self) -> str:
        return f"buildq-test-{self.suffix}-dlq"

    def env(self, **overrides: Any) -> dict[str, str]:
        env = {
            **_without_service_endpoints(dict(os.environ)),
            **aws_env(
                self.process_endpoint or self.endpoint,
                None if self.process_endpoint else self.sqs_endpoint,
            ),
            "PYTHONUNBUFFERED": "1",
            "BUILDQ_TABLE_NAME": self.table_name,
            "BUILDQ_QUEUE_NAME": self.queue_name,
            "BUILDQ_DLQ_NAME": self.dlq_name,
            "BUILDQ_LOG_FORMAT": "json",
            "BUILDQ_RECEIVE_WAIT_SECONDS": "2",
            "BUILDQ_DRAIN_SECONDS": "2",
            "BUILDQ_METRICS_PORT": "0",  # tests that read metrics pick a free port
            "BUILDQ_API_KEYS": f"{API_KEY}=demo,{OTHER_API_KEY}=other",
        }
        env.update({f"BUILDQ_{key.upper()}": str(value) for key, value in overrides.items()})
        return env

    # -- resources -----------------------------------------------------------

    def bootstrap(self, **overrides: Any) -> None:
        """Create this stack's table and queues (in-process, over HTTP to the emulator);
        again with ``overrides`` (``max_attempts``: the queue's redrive count) to
        reconcile them."""
        settings = Settings(
            table_name=self.table_name,
            queue_name=self.queue_name,
            dlq_name=self.dlq_name,
            **overrides,
        )

        async def run() -> None:
            async with aws_clients(settings) as clients:
                await bootstrap(clients, settings)

        asyncio.run(run())

    def cli(self, *args: str, **settings: Any) -> subprocess.CompletedProcess[str]:
        """Run the ``buildq`` CLI against this stack."""
        return subprocess.run(
            [str(BIN / "buildq"), *args],
            env=self.env(**settings),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def client(self, service: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.sqs_endpoint
            if service == "sqs" and self.sqs_endpoint
            else self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    def queue_url(self, dlq: bool = False) -> str:
        name = self.dlq_name if dlq else self.queue_name
        url: str = self.client("sqs").get_queue_url(QueueName=name)["QueueUrl"]
        return url

    def queue_depth(self, dlq: bool = False) -> dict[str, int]:
        attributes = self.client("sqs").get_queue_attributes(
            QueueUrl=self.queue_url(dlq),
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )["Attributes"]
        return {
            "visible": int(attributes["ApproximateNumberOfMessages"]),
            "in_flight": int(attributes["ApproximateNumberOfMessagesNotVisible"]),
            "delayed": int(attributes["ApproximateNumberOfMessagesDelayed"]),
        }

    def send_raw(self, body: str) -> None:
        """Put a message on the build queue as any producer could."""
        self.client("sqs").send_message(QueueUrl=self.queue_url(), MessageBody=body)

    def dlq_messages(self) -> list[tuple[str, dict[str, str]]]:
        """Every message on the DLQ: (body, attributes). They stay hidden for 60 s."""
        sqs = self.client("sqs")
        found: list[tuple[str, dict[str, str]]] = []
        while True:
            batch = sqs.receive_message(
                QueueUrl=self.queue_url(dlq=True),
                MaxNumberOfMessages=10,
                MessageAttributeNames=["All"],
                VisibilityTimeout=60,
                WaitTimeSeconds=0,
            ).get("Messages", [])
            if not batch:
                return found
            for message in batch:
                attributes = {
                    name: value["StringValue"]
                    for name, value in message.get("MessageAttributes", {}).items()
                }
                found.append((message["Body"], attributes))

    def with_store(self, fn: Callable[[DynamoProjectStore], Awaitable[T]]) -> T:
        """Run ``fn`` with this stack's real DynamoDB store (over HTTP to the emulator)."""
        settings = Settings(table_name=self.table_name)

        async def main() -> T:
            async with aws_clients(settings) as clients:
                return await fn(DynamoProjectStore.from_settings(clients.dynamodb, settings))

        return asyncio.run(main())

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """Structured log lines of every process of this stack."""
        return [
            {**record, "_proc": proc.name} for proc in self.procs for record in proc.events(event)
        ]

    def logged(
        self, event: str, project_id: str, *, count: int = 1, timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """A project's ``event`` lines, once at least ``count`` are written.

        A worker logs an event just after the write a test sees over HTTP, so a test
        that saw the write waits here for the line instead of racing it.
        """

        def found() -> list[dict[str, Any]] | None:
            lines = [e for e in self.events(event) if e.get("project_id") == project_id]
            return lines if len(lines) >= count else None

        lines = wait_until(found, timeout=timeout, what=f"{count} x {event} of {project_id}")
        return sorted(lines, key=lambda e: str(e["timestamp"]))

    def table_items(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.client("dynamodb").scan(TableName=self.table_name)[
            "Items"
        ]
        return items

    # -- processes -----------------------------------------------------------

    def start_api(self, **settings: Any) -> str:
        port = free_port()
        proc = start_process(
            f"api-{port}",
            [str(BIN / "buildq-api")],
            self.env(api_port=port, **settings),
            self.log_dir,
        )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200,
            timeout=30,
            what="the API to answer /healthz",
        )
        self.api_url = self.api_url or url
        return url

    def start_worker(self, **settings: Any) -> Proc:
        """Start a ``buildq-worker`` with these settings (``worker_id`` = its name);
        with ``clock_offset`` ("+50s", "-30s"; not a setting) its wall clock is that
        far off (``skewed_clock_env``)."""
        name = f"worker-{len([p for p in self.procs if p.name.startswith('worker')]) + 1}"
        settings.setdefault("worker_id", f"{name}-{self.suffix}")
        clock_offset: str | None = settings.pop("clock_offset", None)
        env = self.env(**settings)
        if clock_offset is not None:
            env.update(skewed_clock_env(clock_offset, env))
        proc = start_process(name, [str(BIN / "buildq-worker")], env, self.log_dir)
        self.procs.append(proc)
        wait_until(
            lambda: '"worker.started"' in proc.log() or not proc.alive(),
            timeout=30,
            what=f"{name} to start",
        )
        assert proc.alive(), proc.log()
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.signal(signal.SIGTERM)
        for proc in self.procs:
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.log()[-6000:]}" for p in self.procs)

    # -- the API -------------------------------------------------------------

    def http(self, api_key: str = API_KEY) -> httpx.Client:
        """An HTTP client for the API, authenticated as tenant "demo" by default."""
        assert self.api_url, "start_api() first"
        return httpx.Client(
            base_url=self.api_url,
            timeout=30,
            headers={"Authorization": f"Bearer {api_key}"},
        )

    def wait_for_status(
        self, http: httpx.Client, project_id: str, statuses: set[str], timeout: float = 60
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            body: dict[str, Any] = http.get(f"/v1/projects/{project_id}").json()
            return body if body["status"] in statuses else None

        return wait_until(check, timeout=timeout, interval=0.2, what=f"{project_id} in {statuses}")

    def wait_for_stage(
        self, http: httpx.Client, project_id: str, stage: int, status: str, timeout: float = 30
    ) -> dict[str, Any]:
        """Wait for one stage's status (the claim and the first stage's start are two
        writes: BUILDING alone does not mean a stage runs yet)."""

        def check() -> dict[str, Any] | None:
            body: dict[str, Any] = http.get(f"/v1/projects/{project_id}").json()
            return body if body["stages"][stage]["status"] == status else None

        return wait_until(check, timeout=timeout, interval=0.1, what=f"stage {stage} {status}")
