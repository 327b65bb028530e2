"""The projects table: every DynamoDB call buildq makes, with its conditions.

Cut by what each part owns: ``projects`` (create, read, list, cancel, replay),
``runs`` (the claim and a run's fenced writes: invariant 3), ``keys`` (API keys),
``fleet`` (worker presence, named locks) and ``sweep`` (the sweeper index), over the
builder and the one conditional UpdateItem in ``base``. ``DynamoProjectStore`` is
all of them on one table, as ``ProjectStore`` is all of their contracts.
"""

from __future__ import annotations

from typing import Protocol

from buildq.store.fleet import DynamoFleet, Fleet
from buildq.store.keys import ApiKeys, DynamoApiKeys
from buildq.store.projects import (
    Created,
    DynamoProjects,
    Idempotency,
    IdempotencyMismatchError,
    Projects,
)
from buildq.store.runs import ClaimRefusedError, DynamoRuns, Runs, RunToken
from buildq.store.sweep import DynamoSweepIndex, SweepCandidate, SweepIndex

__all__ = [
    "ClaimRefusedError",
    "Created",
    "DynamoProjectStore",
    "Idempotency",
    "IdempotencyMismatchError",
    "ProjectStore",
    "RunToken",
    "SweepCandidate",
]


class ProjectStore(Projects, Runs, ApiKeys, Fleet, SweepIndex, Protocol):
    async def ping(self) -> None: ...


class DynamoProjectStore(DynamoProjects, DynamoRuns, DynamoApiKeys, DynamoFleet, DynamoSweepIndex):
    """``ProjectStore`` on one DynamoDB table (async, aiobotocore)."""

    async def ping(self) -> None:
        await self._retry.call("DescribeTable", self._client.describe_table, TableName=self._table)
