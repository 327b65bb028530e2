"""``buildq-worker``: run one worker process, configured from the environment."""

from __future__ import annotations

import asyncio
import signal

import structlog
import uvloop

from buildq.aws import aws_clients
from buildq.logging import configure_logging
from buildq.memory import limit_malloc_arenas
from buildq.queue import SqsBuildQueue
from buildq.settings import WorkerSettings
from buildq.store import DynamoProjectStore
from buildq.workflows.registry import load_registry
from buildq_worker.server import serving
from buildq_worker.worker import Worker


async def serve(settings: WorkerSettings) -> None:
    registry = load_registry(settings.workflows)
    async with aws_clients(settings) as clients:
        worker = Worker(
            settings,
            DynamoProjectStore.from_settings(clients.dynamodb, settings),
            SqsBuildQueue.from_settings(clients.sqs, settings),
            registry,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_shutdown)
        async with serving(worker, settings.metrics_host, settings.metrics_port):
            await worker.run()


def main() -> None:
    limit_malloc_arenas()
    settings = WorkerSettings()
    configure_logging(level=settings.log_level, fmt=settings.log_format, service="worker")
    structlog.contextvars.bind_contextvars(worker_id=settings.worker_id)
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
