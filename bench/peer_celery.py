"""The Celery peer: buildq's no-op ``demo`` project as one Celery task on kombu's SQS
transport, writing the same per-stage status to the same DynamoDB table.

Run by the driver as ``celery -A bench.peer_celery worker --pool threads
--concurrency 5 --prefetch-multiplier 1`` (from ``.tools/bench``), with
``AWS_ENDPOINT_URL`` (the benchmark's emulator), ``BUILDQ_TABLE_NAME`` and
``BENCH_CELERY_QUEUE`` in the environment. ``task_acks_late``: the message is deleted
only after the task returns, as buildq deletes its message only after the final write.

What the task writes, per project (the item the API created, QUEUED): the start
(``BUILDING``, ``started_at``, ``attempt`` + 1), one write per stage start carrying the
previous stage's end, and the final write (``SUCCEEDED``): the same six UpdateItems a
buildq worker makes. It has no lease, no fencing and no heartbeat: Celery offers none.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import boto3
from celery import Celery

STAGES = ("plan", "generate", "build", "package")
_endpoint = urlsplit(os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"))

app = Celery("bench_peer")
app.conf.update(
    # kombu takes the SQS endpoint from the URL's host and port (plain HTTP: is_secure).
    broker_url=f"sqs://test:test@{_endpoint.hostname}:{_endpoint.port}",
    broker_transport_options={
        "region": "us-east-1",
        "is_secure": False,
        "visibility_timeout": int(os.environ.get("BENCH_CELERY_VISIBILITY", "60")),
        "wait_time_seconds": 20,
        "polling_interval": 0,
    },
    task_default_queue=os.environ.get("BENCH_CELERY_QUEUE", "bench-celery"),
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)

_local = threading.local()


def configure(endpoint: str, queue: str) -> None:
    """Point the app at another emulator and queue (the driver, which only sends)."""
    url = urlsplit(endpoint)
    app.conf.broker_url = f"sqs://test:test@{url.hostname}:{url.port}"
    app.conf.task_default_queue = queue


def _dynamodb() -> Any:
    """One boto3 client per worker thread."""
    client = getattr(_local, "dynamodb", None)
    if client is None:
        client = _local.dynamodb = boto3.client(
            "dynamodb",
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
    return client


def _now() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _update(key: dict[str, Any], expression: str, names: dict[str, str], values: Any) -> None:
    _dynamodb().update_item(
        TableName=os.environ["BUILDQ_TABLE_NAME"],
        Key=key,
        UpdateExpression=expression,
        ExpressionAttributeNames=names,
        ExpressionAttributeValues=values,
    )


@app.task(name="bench.build_project")  # type: ignore[untyped-decorator]
def build_project(tenant_id: str, project_id: str) -> None:
    """The ``demo`` workflow with ``stage_seconds: 0``: status writes only."""
    key = {"pk": {"S": f"TENANT#{tenant_id}"}, "sk": {"S": f"PROJECT#{project_id}"}}
    worker = f"celery-{os.getpid()}"
    _update(
        key,
        "SET #s = :b, worker_id = :w, attempt = attempt + :one, started_at = :now, "
        "updated_at = :now",
        {"#s": "status"},
        {
            ":b": {"S": "BUILDING"},
            ":w": {"S": worker},
            ":one": {"N": "1"},
            ":now": {"S": _now()},
        },
    )
    previous: str | None = None
    for stage in STAGES:
        names = {"#st": "stages", "#this": stage}
        values: dict[str, Any] = {
            ":run": {"M": {"status": {"S": "RUNNING"}, "started_at": {"S": _now()}}},
            ":now": {"S": _now()},
        }
        expression = "SET #st.#this = :run, updated_at = :now"
        if previous is not None:
            names["#prev"] = previous
            values[":done"] = {"M": {"status": {"S": "SUCCEEDED"}, "finished_at": {"S": _now()}}}
            expression += ", #st.#prev = :done"
        _update(key, expression, names, values)
        previous = stage
    _update(
        key,
        "SET #st.#prev = :done, #s = :ok, finished_at = :now, updated_at = :now",
        {"#st": "stages", "#prev": str(previous), "#s": "status"},
        {
            ":done": {"M": {"status": {"S": "SUCCEEDED"}, "finished_at": {"S": _now()}}},
            ":ok": {"S": "SUCCEEDED"},
            ":now": {"S": _now()},
        },
    )


@app.task(name="bench.long_project")  # type: ignore[untyped-decorator]
def long_project(tenant_id: str, project_id: str, stage_seconds: float) -> None:
    """The ``demo`` workflow with real stage time, for the crash and long-task runs:
    counts its executions (``executions``) and each stage's starts (``starts_<stage>``)."""
    key = {"pk": {"S": f"TENANT#{tenant_id}"}, "sk": {"S": f"PROJECT#{project_id}"}}
    _update(
        key,
        "SET #s = :b, updated_at = :now ADD executions :one",
        {"#s": "status"},
        {":b": {"S": "BUILDING"}, ":one": {"N": "1"}, ":now": {"S": _now()}},
    )
    for stage in STAGES:
        _update(
            key,
            "SET #st.#this = :run, updated_at = :now ADD #starts :one",
            {"#st": "stages", "#this": stage, "#starts": f"starts_{stage}"},
            {
                ":run": {"M": {"status": {"S": "RUNNING"}, "started_at": {"S": _now()}}},
                ":now": {"S": _now()},
                ":one": {"N": "1"},
            },
        )
        time.sleep(stage_seconds)
        _update(
            key,
            "SET #st.#this.#s = :done, #st.#this.finished_at = :now, updated_at = :now",
            {"#st": "stages", "#this": stage, "#s": "status"},
            {":done": {"S": "SUCCEEDED"}, ":now": {"S": _now()}},
        )
    _update(
        key,
        "SET #s = :ok, finished_at = :now, updated_at = :now",
        {"#s": "status"},
        {":ok": {"S": "SUCCEEDED"}, ":now": {"S": _now()}},
    )
