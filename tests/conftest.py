from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.faults.proxy import FaultProxy
from tests.harness import Stack, aws_env, running_emulator
from tests.localstack.server import running_localstack, sqs_backend


@pytest.fixture(scope="session")
def sqs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """Where SQS is when it is not on the emulator: LocalStack's SQS (started for the
    session, tests/localstack/server.py) under ``BUILDQ_TEST_SQS=localstack``; else None."""
    if sqs_backend() != "localstack":
        yield None
        return
    with running_localstack(tmp_path_factory.mktemp("localstack")) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory, sqs_endpoint: str | None) -> Iterator[str]:
    """The embedded AWS emulator (moto server) on a free loopback port, for the session;
    with ``sqs_endpoint`` (LocalStack), only DynamoDB is used on it."""
    with running_emulator(tmp_path_factory.mktemp("emulator")) as endpoint:
        # The test process itself talks to the emulator only (adapters, bootstrap), and
        # to LocalStack for SQS when it is on (AWS_ENDPOINT_URL_SQS).
        saved = dict(os.environ)
        os.environ.pop("AWS_ENDPOINT_URL_SQS", None)
        os.environ.update(aws_env(endpoint, sqs_endpoint))
        try:
            yield endpoint
        finally:
            os.environ.clear()
            os.environ.update(saved)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return bool(report is None or report.failed)


@pytest.fixture
def make_stack(
    emulator: str, sqs_endpoint: str | None, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[], Stack]]:
    """Factory: a bootstrapped, isolated stack; the test starts the processes it needs."""
    stacks: list[Stack] = []

    def make() -> Stack:
        stack = Stack(endpoint=emulator, log_dir=tmp_path, sqs_endpoint=sqs_endpoint)
        stack.bootstrap()
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()
        if _failed(request):
            print(stack.logs())


@pytest.fixture
def stack(make_stack: Callable[[], Stack]) -> Stack:
    return make_stack()


@pytest.fixture(scope="module")
def make_module_stack(
    emulator: str, sqs_endpoint: str | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A stack with an API and no workers, shared by a module's read-only tests."""
    stack = Stack(
        endpoint=emulator, log_dir=tmp_path_factory.mktemp("stack"), sqs_endpoint=sqs_endpoint
    )
    stack.bootstrap()
    stack.start_api()
    yield stack
    stack.stop()


@pytest.fixture
def fault_proxy(emulator: str, sqs_endpoint: str | None) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's emulator (and of LocalStack for SQS, when
    it is on), stopped after the test. Route a stack's processes through it with
    ``stack.via(fault_proxy.url)`` before starting them; the test's own boto3 clients
    keep talking to the emulator (and LocalStack) directly."""
    upstreams = {"sqs": sqs_endpoint} if sqs_endpoint else {}
    with FaultProxy(upstream=emulator, upstreams=upstreams) as proxy:
        yield proxy
