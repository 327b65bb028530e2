"""What every operator command shares: settings, the AWS adapters, output, errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import typer

from buildq.aws import aws_clients
from buildq.errors import BuildqError
from buildq.logging import configure_logging
from buildq.queue import SqsBuildQueue
from buildq.settings import Settings
from buildq.store import DynamoProjectStore

T = TypeVar("T")


@dataclass(frozen=True)
class Ops:
    settings: Settings
    store: DynamoProjectStore
    queue: SqsBuildQueue


def run(fn: Callable[[Ops], Awaitable[T]]) -> T:
    """Run ``fn`` with the adapters; a buildq error is a message and exit code 1."""
    settings = Settings()
    # Audit lines (dlq.replayed, ...) go to stderr as JSON; results go to stdout.
    configure_logging(level=settings.log_level, fmt="json", service="ops")

    async def main() -> T:
        async with aws_clients(settings) as clients:
            return await fn(
                Ops(
                    settings,
                    DynamoProjectStore.from_settings(clients.dynamodb, settings),
                    SqsBuildQueue.from_settings(clients.sqs, settings),
                )
            )

    try:
        return asyncio.run(main())
    except BuildqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def emit(data: Any, *, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        human()


def table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain aligned table (greppable, no colour codes)."""
    if not rows:
        typer.echo("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    typer.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        typer.echo("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns).rstrip())
