"""Load generators and floors, run with the workspace's own ``.venv`` python.

This file is a separate process on purpose: it imports buildq, aiobotocore and
aiohttp from ``.venv`` (exactly the versions ``uv.lock`` pins), while the driver
(``bench/run.py``) runs from ``.tools/bench`` with matplotlib, psutil and Celery.
Each mode prints one JSON document on stdout.

Modes:

- ``api``: POST /v1/projects at each concurrency for a fixed time.
- ``floor-api``: the same DynamoDB PutItem + SQS SendMessage the API makes, with
  aiobotocore, at each concurrency for the same time (the API create floor); ``api
  --with-floor`` runs it right after the API's levels, saving a process start.
- ``floor-worker``: receive, claim, four stage writes, the final write and the delete
  for every message on the queue, at a given concurrency (the worker floor).
- ``floor-pickup``: an SQS send while a long-poll receive waits, N times.

Every AWS call goes to ``AWS_ENDPOINT_URL`` (the benchmark's own emulator on
127.0.0.1); every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import uvloop
from aiobotocore.session import get_session

from buildq.aws import client_config
from buildq.clock import epoch_ms, now_iso
from buildq.items import project_key, project_to_item
from buildq.messages import BuildReason, build_message
from buildq.settings import ApiSettings, WorkerSettings
from buildq.transitions import new_project
from buildq.workflows.demo import DEMO_STAGES

TENANT = "demo"
Op = Callable[[], Awaitable[bool]]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(op: Op, *, concurrency: int, seconds: float, max_requests: int) -> dict[str, Any]:
    """Run ``op`` from ``concurrency`` tasks until ``seconds`` pass or ``max_requests``
    have started; latency of each call in ms, and how many failed."""
    latencies: list[float] = []
    errors = 0
    started = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors, started
        while time.perf_counter() < deadline and started < max_requests:
            started += 1
            t0 = time.perf_counter()
            try:
                ok = await op()
            except Exception:
                ok = False
            latencies.append((time.perf_counter() - t0) * 1000)
            if not ok:
                errors += 1

    cpu0, wall0, t_start = _cpu_seconds(), time.perf_counter(), time.time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - wall0
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": wall,
        "t_start": t_start,
        "t_end": time.time(),
        "throughput": len(latencies) / wall if wall else 0.0,
        "latencies_ms": latencies,
        "loadgen_cpu": (_cpu_seconds() - cpu0) / wall if wall else 0.0,
    }


class Aws:
    """aiobotocore DynamoDB and SQS clients configured exactly as buildq's own."""

    def __init__(self, worker: bool = False) -> None:
        self.settings = WorkerSettings() if worker else ApiSettings()
        self._stack: Any = None

    async def __aenter__(self) -> Aws:
        from contextlib import AsyncExitStack

        self._stack = AsyncExitStack()
        session = get_session()
        config = client_config(self.settings)
        region = self.settings.aws_region
        self.dynamodb = await self._stack.enter_async_context(
            session.create_client("dynamodb", region_name=region, config=config)
        )
        self.sqs = await self._stack.enter_async_context(
            session.create_client("sqs", region_name=region, config=config)
        )
        self.queue_url: str = (await self.sqs.get_queue_url(QueueName=self.settings.queue_name))[
            "QueueUrl"
        ]
        self.table = self.settings.table_name
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def purge(self) -> None:
        await self.sqs.purge_queue(QueueUrl=self.queue_url)

    async def depth(self) -> dict[str, int]:
        attributes = (
            await self.sqs.get_queue_attributes(
                QueueUrl=self.queue_url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                ],
            )
        )["Attributes"]
        return {
            "visible": int(attributes.get("ApproximateNumberOfMessages", 0)),
            "in_flight": int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0)),
        }


def _levels(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


# -- API create and its floor ------------------------------------------------------------


async def run_levels(
    make_op: Callable[[], Op], aws: Aws, args: argparse.Namespace
) -> list[dict[str, Any]]:
    results = []
    op = make_op()
    for concurrency in _levels(args.levels):
        await measure(op, concurrency=concurrency, seconds=30, max_requests=args.warmup)
        if args.purge:
            await aws.purge()  # every level starts on an empty queue
            await asyncio.sleep(0.2)
        depth_before = await aws.depth()
        result = await measure(
            op, concurrency=concurrency, seconds=args.seconds, max_requests=args.max_requests
        )
        result["depth_before"] = depth_before
        result["depth_after"] = await aws.depth()
        results.append(result)
        if args.purge:
            await aws.purge()
    return results


async def api_mode(args: argparse.Namespace) -> Any:
    body = json.dumps(
        {"name": "bench", "workflow": "demo", "parameters": {"stage_seconds": 0}}
    ).encode()
    headers = {"authorization": f"Bearer {args.key}", "content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http, Aws() as aws:
        url = f"{args.url}/v1/projects"

        def make_op() -> Op:
            async def op() -> bool:
                async with http.post(url, data=body, headers=headers) as response:
                    await response.read()
                    return response.status == 202

            return op

        results = await run_levels(make_op, aws, args)
    if not args.with_floor:
        return results
    return {"api": results, "floor": await floor_api_mode(args)}


async def floor_api_mode(args: argparse.Namespace) -> Any:
    async with Aws() as aws:

        def make_op() -> Op:
            async def op() -> bool:
                # The API's create, minus the API: the same item, the same message.
                project_id = _ulid()
                project = new_project(
                    tenant_id=TENANT,
                    project_id=project_id,
                    name="bench",
                    workflow="demo",
                    stage_names=DEMO_STAGES,
                    parameters={"stage_seconds": 0.0},
                    now=now_iso(),
                )
                await aws.dynamodb.put_item(
                    TableName=aws.table,
                    Item=project_to_item(project, sweep_at=epoch_ms()),
                    ConditionExpression="attribute_not_exists(pk)",
                )
                await aws.sqs.send_message(
                    QueueUrl=aws.queue_url,
                    MessageBody=build_message(TENANT, project_id, BuildReason.CREATE).encode(),
                    DelaySeconds=0,
                )
                return True

            return op

        return await run_levels(make_op, aws, args)


def _ulid() -> str:
    from ulid import ULID

    return str(ULID())


# -- the worker's floor -----------------------------------------------------------------


async def floor_worker_mode(args: argparse.Namespace) -> Any:
    """Exactly the AWS calls one buildq project needs, with no buildq around them.

    Per message: ReceiveMessage (one per message), the claim (UpdateItem, ALL_NEW: the
    run needs the project), one UpdateItem per stage start (carrying the previous stage's
    end, nothing returned), the final UpdateItem, DeleteMessage; ``concurrency`` such
    loops at once.
    """
    worker = f"floor-{os.getpid()}"
    done = 0
    t_first: float | None = None
    t_last = 0.0
    calls = 0
    duplicates = 0
    deadline = time.monotonic() + args.timeout
    async with Aws(worker=True) as aws:

        async def update(
            key: dict[str, Any],
            expression: str,
            condition: str,
            names: dict[str, str],
            values: dict[str, Any],
            new: bool,
        ) -> None:
            nonlocal calls
            calls += 1
            await aws.dynamodb.update_item(
                TableName=aws.table,
                Key=key,
                UpdateExpression=expression,
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW" if new else "NONE",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )

        async def claim(key: dict[str, Any], now: str, lease: int) -> None:
            await update(
                key,
                "SET #s = :b, #o = :w, lease_expires_at = :l, attempt = attempt + :one, "
                "updated_at = :now, started_at = :now, sweep_at = :l",
                "attribute_exists(pk) AND #s = :q",
                {"#s": "status", "#o": "lease_owner"},
                {
                    ":b": {"S": "BUILDING"},
                    ":q": {"S": "QUEUED"},
                    ":w": {"S": worker},
                    ":l": {"N": str(lease)},
                    ":one": {"N": "1"},
                    ":now": {"S": now},
                },
                new=True,
            )

        async def one(message: dict[str, Any]) -> None:
            nonlocal done, t_first, t_last, calls, duplicates
            body = json.loads(message["Body"])
            key = project_key(body["tenant_id"], body["project_id"])
            now = now_iso()
            t_first = t_first or time.time()
            lease = epoch_ms() + 45_000
            try:
                await claim(key, now, lease)
            except aws.dynamodb.exceptions.ConditionalCheckFailedException:
                # moto can hand one message to two concurrent receives; buildq's worker
                # drops such a duplicate when its claim is refused, and so does the floor.
                duplicates += 1
                return
            previous: str | None = None
            for stage in DEMO_STAGES:
                values: dict[str, Any] = {
                    ":w": {"S": worker},
                    ":run": {"M": {"status": {"S": "RUNNING"}, "started_at": {"S": now_iso()}}},
                    ":now": {"S": now_iso()},
                }
                names = {"#st": "stages", "#o": "lease_owner", "#this": stage}
                expression = "SET #st.#this = :run, updated_at = :now"
                if previous is not None:
                    values[":done"] = {
                        "M": {"status": {"S": "SUCCEEDED"}, "finished_at": {"S": now_iso()}}
                    }
                    names["#prev"] = previous
                    expression += ", #st.#prev = :done"
                await update(key, expression, "#o = :w", names, values, new=False)
                previous = stage
            await update(
                key,
                "SET #st.#prev = :done, #s = :ok, finished_at = :now, updated_at = :now "
                "REMOVE #o, lease_expires_at, sweep_at",
                "#o = :w",
                {"#st": "stages", "#prev": str(previous), "#s": "status", "#o": "lease_owner"},
                {
                    ":w": {"S": worker},
                    ":done": {"M": {"status": {"S": "SUCCEEDED"}}},
                    ":ok": {"S": "SUCCEEDED"},
                    ":now": {"S": now_iso()},
                },
                new=False,
            )
            await aws.sqs.delete_message(
                QueueUrl=aws.queue_url, ReceiptHandle=message["ReceiptHandle"]
            )
            calls += 1
            done += 1
            t_last = time.time()

        async def loop() -> None:
            nonlocal calls
            while done < args.count and time.monotonic() < deadline:
                calls += 1
                response = await aws.sqs.receive_message(
                    QueueUrl=aws.queue_url,
                    MaxNumberOfMessages=1,
                    WaitTimeSeconds=1,
                    VisibilityTimeout=60,
                    MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
                    MessageAttributeNames=["All"],
                )
                for message in response.get("Messages", []):
                    await one(message)

        cpu0 = _cpu_seconds()
        await asyncio.gather(*(loop() for _ in range(args.concurrency)))
        cpu = _cpu_seconds() - cpu0
    seconds = t_last - (t_first or t_last)
    return {
        "projects": done,
        "calls": calls,
        "duplicates": duplicates,
        "t_first": t_first,
        "t_last": t_last,
        "seconds": seconds,
        "throughput": done / seconds if seconds else 0.0,
        "loadgen_cpu_seconds": cpu,
    }


# -- pickup floor ---------------------------------------------------------------------


async def floor_pickup_mode(args: argparse.Namespace) -> Any:
    """One SQS send while a long-poll receive waits: send → receive round trip, ms."""
    samples: list[float] = []
    async with Aws(worker=True) as aws:
        for _ in range(args.samples):
            receive = asyncio.create_task(
                aws.sqs.receive_message(
                    QueueUrl=aws.queue_url,
                    MaxNumberOfMessages=1,
                    WaitTimeSeconds=20,
                    VisibilityTimeout=60,
                    MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
                    MessageAttributeNames=["All"],
                )
            )
            await asyncio.sleep(0.3)  # the long poll is waiting in the emulator
            t0 = time.perf_counter()
            await aws.sqs.send_message(
                QueueUrl=aws.queue_url,
                MessageBody=build_message(TENANT, uuid.uuid4().hex, BuildReason.CREATE).encode(),
            )
            response = await receive
            samples.append((time.perf_counter() - t0) * 1000)
            for message in response.get("Messages", []):
                await aws.sqs.delete_message(
                    QueueUrl=aws.queue_url, ReceiptHandle=message["ReceiptHandle"]
                )
    return {"latencies_ms": samples}


# -- entry point ------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("api", "floor-api"):
        mode = sub.add_parser(name)
        mode.add_argument("--url", default="")
        mode.add_argument("--key", default="")
        mode.add_argument("--levels", default="1,16,64,256")
        mode.add_argument("--seconds", type=float, default=5.0)
        mode.add_argument("--warmup", type=int, default=50)
        mode.add_argument("--max-requests", type=int, default=3000)
        mode.add_argument(
            "--no-purge", dest="purge", action="store_false", help="keep the queue's backlog"
        )
        mode.add_argument(
            "--with-floor", action="store_true", help="then floor-api, in the same process"
        )
    floor_worker = sub.add_parser("floor-worker")
    floor_worker.add_argument("--count", type=int, required=True)
    floor_worker.add_argument("--concurrency", type=int, default=5)
    floor_worker.add_argument("--timeout", type=float, default=300.0)
    pickup = sub.add_parser("floor-pickup")
    pickup.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    modes: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, Any]]] = {
        "api": api_mode,
        "floor-api": floor_api_mode,
        "floor-worker": floor_worker_mode,
        "floor-pickup": floor_pickup_mode,
    }
    result: Any = uvloop.run(modes[args.mode](args))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
