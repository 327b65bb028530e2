"""The worker shares the API's retry layer, whose budget is a hard deadline: its long
polls must still wait their full WaitTimeSeconds, however short the budget."""

from __future__ import annotations

import time

import pytest

from tests.faults.proxy import FaultProxy
from tests.harness import Stack, create_demo

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_a_long_poll_longer_than_the_budget_is_not_cut(
    fault_proxy: FaultProxy,
    stack: Stack,  # the proxy outlives the stack's processes
) -> None:
    stack.start_api()  # straight to the emulator: only the worker goes through the proxy
    stack.via(fault_proxy.url)
    worker = stack.start_worker(receive_wait_seconds=4, aws_retry_seconds=1)
    polls_before = fault_proxy.requests["ReceiveMessage"]
    time.sleep(6)  # an idle queue: long polls of 4 s each, not receives cut at 1 s
    polls = fault_proxy.requests["ReceiveMessage"] - polls_before
    assert 1 <= polls <= 3, polls
    assert not worker.events("queue.receive_failed"), worker.log()
    # And the polls deliver: a project is built.
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=0.05)
        stack.wait_for_status(http, project_id, {"SUCCEEDED"}, timeout=30)
    assert not worker.events("queue.receive_failed"), worker.log()
