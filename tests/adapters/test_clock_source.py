"""The process clock learns AWS's time from every response of the real clients."""

from __future__ import annotations

import asyncio

import pytest
from botocore.exceptions import ClientError

from buildq import aws
from buildq.aws import aws_clients
from buildq.clock import ServerClock
from buildq.settings import Settings


def test_every_aws_response_error_or_not_is_a_sample_of_the_server_s_clock(
    emulator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    est = ServerClock(spacing=0)
    monkeypatch.setattr(aws, "CLOCK", est)

    async def main() -> None:
        async with aws_clients(Settings()) as clients:
            await clients.dynamodb.list_tables()
            assert len(est._samples) == 1
            with pytest.raises(ClientError):  # an error response has a Date too
                await clients.sqs.get_queue_url(QueueName="no-such-queue")
            assert len(est._samples) == 2
            for _ in range(12):
                await clients.dynamodb.list_tables()
                await asyncio.sleep(0.09)

    asyncio.run(main())
    assert est.error is not None
    assert est.error < 0.5  # samples at different points of a second narrow it
    assert abs(est.offset) <= est.error + 0.05  # the emulator runs on this machine's clock
