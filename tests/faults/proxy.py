"""A small HTTP fault proxy between processes under test and the AWS emulator.

Point a process's ``AWS_ENDPOINT_URL`` at ``proxy.url``: every request is forwarded to
``upstream`` untouched, unless a rule (a ``Fault``) matches it; then the proxy answers
an AWS error, a throttle or a canned body without forwarding, hangs, delays, or
forwards and drops the answer. Requests are told apart by what botocore's JSON protocol
sends for DynamoDB and SQS alike: ``X-Amz-Target: <prefix>.<Operation>`` and a JSON
body with ``TableName`` / ``QueueUrl``.

    with FaultProxy(upstream=emulator) as proxy:
        rule = proxy.add(Fault(kind="throttle", operation="PutItem", times=3))
        ...  # processes started with AWS_ENDPOINT_URL=proxy.url
        assert proxy.injected[("throttle", "PutItem")] == 3
        proxy.remove(rule)

Each service can have its own upstream: ``FaultProxy(upstream=moto,
upstreams={"sqs": localstack})`` forwards SQS requests to LocalStack and the rest to
moto, so processes pointed at one proxy reach both. Without ``upstreams``, a service's
upstream is the one the test process's own botocore clients use for it
(``AWS_ENDPOINT_URL_SQS``, ``AWS_ENDPOINT_URL_DYNAMODB``: see tests/conftest.py's
``emulator``), else ``upstream``; ``upstreams={}`` sends everything to ``upstream``.

The proxy serves on 127.0.0.1 from a background thread with its own event loop, one
task per client connection (keep-alive, no timeout of its own: a 20 s ReceiveMessage
long poll passes). Nothing of buildq is touched: the faults are what the network and
AWS could do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs

import aiohttp

Kind = Literal["error", "throttle", "hang", "drop_response", "delay", "respond"]
Service = Literal["dynamodb", "sqs"]
KINDS: frozenset[str] = frozenset(
    {"error", "throttle", "hang", "drop_response", "delay", "respond"}
)

# What botocore sends (X-Amz-Target) and parses back (the error's "__type" prefix).
_TARGET_PREFIXES: dict[str, Service] = {"DynamoDB_20120810": "dynamodb", "AmazonSQS": "sqs"}
_ERROR_NAMESPACES: dict[str, str] = {
    "dynamodb": "com.amazonaws.dynamodb.v20120810",
    "sqs": "com.amazonaws.sqs",
}
# The code botocore parses out of each service's throttling answer.
THROTTLE_CODES: dict[str, str] = {"dynamodb": "ThrottlingException", "sqs": "RequestThrottled"}
_JSON = "application/x-amz-json-1.0"
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
    }
)
# botocore's service-specific endpoint variables, by the services the proxy tells apart.
_ENDPOINT_VARIABLES: dict[str, str] = {
    "dynamodb": "AWS_ENDPOINT_URL_DYNAMODB",
    "sqs": "AWS_ENDPOINT_URL_SQS",
}
_REASONS = {200: "OK", 400: "Bad Request", 500: "Internal Server Error", 502: "Bad Gateway"}
_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class Fault:
    """What to do to the requests that match.

    kind:
      - ``error``: answer ``status`` (500) with AWS error ``code`` ("InternalServerError"),
        ``message`` and ``extra`` merged into the JSON error body (e.g.
        ``{"CancellationReasons": [...]}``); not forwarded.
      - ``throttle``: an error with status 400 and the service's throttling code
        (DynamoDB ``ThrottlingException``, SQS ``RequestThrottled``); not forwarded.
      - ``hang``: read the request, answer nothing for ``seconds`` (30), then close the
        connection; not forwarded.
      - ``drop_response``: forward (the call lands), then close the connection instead
        of answering.
      - ``delay``: wait ``seconds`` (1), then forward normally.
      - ``respond``: answer ``status`` (200) with ``body`` as JSON; not forwarded.

    Matching (None = any): ``operation`` ("PutItem"), ``service`` ("dynamodb" | "sqs"),
    ``resource`` (a substring of the body's TableName / QueueUrl / QueueName, at any
    depth: a transaction's items count), ``body_contains`` (a substring of the raw
    body). Of the matching requests, the first ``after`` pass, then at most ``times``
    (None = unlimited) are hit, each with ``probability``.
    """

    kind: Kind
    operation: str | None = None
    service: Service | None = None
    resource: str | None = None
    body_contains: str | None = None
    times: int | None = None
    probability: float = 1.0
    after: int = 0
    status: int | None = None
    code: str | None = None
    message: str = "injected by the fault proxy"
    extra: Mapping[str, Any] | None = None
    body: Mapping[str, Any] | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(KINDS)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        if (self.times is not None and self.times < 0) or self.after < 0:
            raise ValueError("times and after must not be negative")


@dataclass(eq=False)
class Rule:
    """A fault as added to a proxy, with what it saw: ``matched`` requests (``after``
    included) and ``injected`` faults."""

    fault: Fault
    matched: int = 0
    injected: int = 0


@dataclass
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    keep_alive: bool
    service: Service | None = None
    operation: str = ""
    resources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        header = self.header("x-amz-target") or ""
        prefix, _, operation = header.partition(".")
        self.service = _TARGET_PREFIXES.get(prefix)
        self.operation = operation
        if not header and self.body:  # the query protocol (form-encoded, Action=...)
            form = parse_qs(self.body.decode(errors="replace"))
            self.operation = form.get("Action", [""])[0]
            self.service = "sqs" if self.operation else None
            self.resources = [url for url in form.get("QueueUrl", [])]
            return
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            self.resources = list(_resources(json.loads(self.body or b"{}")))

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def _resources(value: Any) -> Iterator[str]:
    """Every table and queue a request body names, at any depth."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in ("TableName", "QueueUrl", "QueueName") and isinstance(inner, str):
                yield inner
            elif key == "RequestItems" and isinstance(inner, dict):
                yield from (name for name in inner if isinstance(name, str))
            yield from _resources(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _resources(inner)


def _environment_upstreams() -> dict[str, str]:
    """The service-specific endpoints of this process's environment, by service."""
    found = {
        service: os.environ.get(name, "").strip() for service, name in _ENDPOINT_VARIABLES.items()
    }
    return {service: url for service, url in found.items() if url}


def _matches(fault: Fault, request: _Request) -> bool:
    if fault.operation is not None and fault.operation != request.operation:
        return False
    if fault.service is not None and fault.service != request.service:
        return False
    if fault.resource is not None and not any(fault.resource in r for r in request.resources):
        return False
    return fault.body_contains is None or fault.body_contains.encode() in request.body


class FaultProxy:
    """The proxy; see the module's docstring."""

    def __init__(
        self,
        upstream: str,
        *,
        upstreams: Mapping[str, str] | None = None,
        seed: int | None = 0,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        if upstreams is None:
            upstreams = _environment_upstreams()
        unknown = set(upstreams) - set(_ENDPOINT_VARIABLES)
        if unknown:
            raise ValueError(f"no such service {sorted(unknown)}; one of {_ENDPOINT_VARIABLES}")
        # Where each service's requests go (a request of no known service: ``upstream``).
        self.upstreams: dict[str, str] = {
            service: upstreams.get(service, upstream).rstrip("/") for service in _ENDPOINT_VARIABLES
        }
        self.injected: Counter[tuple[str, str]] = Counter()
        self.requests: Counter[str] = Counter()
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._port: int | None = None

    # -- the API tests use ---------------------------------------------------------

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("start() the proxy first")
        return f"http://127.0.0.1:{self._port}"

    def add(self, fault: Fault) -> Rule:
        """Add a rule after the others (the first matching rule with budget left wins)."""
        rule = Rule(fault)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear(self) -> None:
        """Remove every rule (the counters stay)."""
        with self._lock:
            self._rules.clear()

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        loop = self._loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open(sock))
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._close())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"fault-proxy-{self._port}", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the fault proxy did not start")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop serving: open connections (hanging ones too) are closed."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the loop's side -----------------------------------------------------------

    async def _open(self, sock: socket.socket) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=5),
            connector=aiohttp.TCPConnector(limit=0),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=_MAX_HEAD)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                request = await _read_request(reader, writer)
                if request is None or not await self._handle(request, reader, writer):
                    break
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            aiohttp.ClientError,
            ValueError,  # not HTTP: drop the connection
        ):
            pass
        finally:
            self._connections.discard(task)
            writer.transport.abort()

    def _choose(self, request: _Request) -> Fault | None:
        with self._lock:
            self.requests[request.operation] += 1
            for rule in self._rules:
                fault = rule.fault
                if not _matches(fault, request):
                    continue
                rule.matched += 1
                if rule.matched <= fault.after:
                    continue
                if fault.times is not None and rule.injected >= fault.times:
                    continue
                if fault.probability < 1.0 and self._random.random() >= fault.probability:
                    continue
                rule.injected += 1
                self.injected[(fault.kind, request.operation)] += 1
                return fault
        return None

    async def _handle(
        self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False: the connection is to be closed."""
        fault = self._choose(request)
        if fault is None:
            return await self._forward(request, writer)
        if fault.kind == "hang":
            await _hang(reader, 30.0 if fault.seconds is None else fault.seconds)
            return False
        if fault.kind == "delay":
            await asyncio.sleep(1.0 if fault.seconds is None else fault.seconds)
            return await self._forward(request, writer)
        if fault.kind == "drop_response":
            await self._upstream(request)  # lands; what it answered is lost
            return False
        if fault.kind == "respond":
            body = json.dumps(dict(fault.body or {})).encode()
            headers = [("Content-Type", _JSON), ("x-amzn-RequestId", str(uuid.uuid4()))]
            await _write(writer, fault.status or 200, headers, body, request.keep_alive)
            return request.keep_alive
        status, headers, body = _error(fault, request)
        await _write(writer, status, headers, body, request.keep_alive)
        return request.keep_alive

    async def _upstream(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        assert self._session is not None
        headers = [(k, v) for k, v in request.headers if k.lower() not in _HOP_BY_HOP]
        upstream = self.upstreams.get(request.service or "", self.upstream)
        async with self._session.request(
            request.method,
            upstream + request.target,
            headers=headers,
            data=request.body,
            allow_redirects=False,
        ) as response:
            body = await response.read()
            return response.status, list(_decoded(response.raw_headers)), body

    async def _forward(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        try:
            status, headers, body = await self._upstream(request)
        except (aiohttp.ClientError, OSError):
            status, headers, body = 502, [], b""  # the emulator is gone: a gateway's answer
        headers = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
        await _write(writer, status, headers, body, request.keep_alive)
        return request.keep_alive


def _decoded(raw: tuple[tuple[bytes, bytes], ...]) -> Iterator[tuple[str, str]]:
    for key, value in raw:
        yield key.decode("latin-1"), value.decode("latin-1")


def _error(fault: Fault, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
    """An AWS JSON-protocol error as botocore parses it into ``ClientError``."""
    service = fault.service or request.service or "dynamodb"
    if fault.kind == "throttle":
        status = fault.status or 400
        code = fault.code or THROTTLE_CODES[service]
    else:
        status = fault.status or 500
        code = fault.code or "InternalServerError"
    payload: dict[str, Any] = {
        "__type": f"{_ERROR_NAMESPACES[service]}#{code}",
        "message": fault.message,
        **dict(fault.extra or {}),
    }
    headers = [
        ("Content-Type", _JSON),
        ("x-amzn-RequestId", str(uuid.uuid4())),
        ("X-Amzn-Errortype", code),
    ]
    if service == "sqs":
        # SQS is "awsQueryCompatible": botocore takes the code from this header.
        headers.append(("x-amzn-query-error", f"{code};{'Sender' if status < 500 else 'Receiver'}"))
    return status, headers, json.dumps(payload).encode()


async def _hang(reader: asyncio.StreamReader, seconds: float) -> None:
    """Say nothing for ``seconds``, or until the client gives up and closes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            return
        if not chunk:
            return


async def _read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> _Request | None:
    """One HTTP/1.1 request (Content-Length or chunked body); None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers.append((key.strip(), value.strip()))
    lowered = {key.lower(): value for key, value in headers}
    if lowered.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    if "chunked" in lowered.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from botocore
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    else:
        body = await reader.readexactly(int(lowered.get("content-length", "0")))
    connection = lowered.get("connection", "").lower()
    keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
    return _Request(method, target, headers, body, keep_alive)


async def _write(
    writer: asyncio.StreamWriter,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    keep_alive: bool,
) -> None:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{key}: {value}" for key, value in headers]
    lines += [
        f"Content-Length: {len(body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
