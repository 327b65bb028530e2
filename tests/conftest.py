from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.faults.proxy import FaultProxy
from tests.harness import Stack, aws_env, running_emulator


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded AWS emulator (moto server) on a free loopback port, for the session."""
    with running_emulator(tmp_path_factory.mktemp("emulator")) as endpoint:
        # The test process itself talks to the emulator only (adapters, bootstrap).
        saved = dict(os.environ)
        os.environ.update(aws_env(endpoint))
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
    emulator: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[], Stack]]:
    """Factory: a bootstrapped, isolated stack; the test starts the processes it needs."""
    stacks: list[Stack] = []

    def make() -> Stack:
        stack = Stack(endpoint=emulator, log_dir=tmp_path)
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
def make_module_stack(emulator: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack with an API and no workers, shared by a module's read-only tests."""
    stack = Stack(endpoint=emulator, log_dir=tmp_path_factory.mktemp("stack"))
    stack.bootstrap()
    stack.start_api()
    yield stack
    stack.stop()


@pytest.fixture
def fault_proxy(emulator: str) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's emulator, stopped after the test. Route a
    stack's processes through it with ``stack.via(fault_proxy.url)`` before starting
    them; the test's own boto3 clients keep talking to the emulator directly."""
    with FaultProxy(upstream=emulator) as proxy:
        yield proxy
