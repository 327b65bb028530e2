"""``buildq``: the operator CLI. Exit codes: 0 ok, 1 error, 2 bad usage."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from buildq.aws import aws_clients
from buildq.errors import BuildqError, UnavailableError
from buildq.logging import configure_logging
from buildq.resources import BootstrapResult, bootstrap
from buildq.settings import Settings, hash_api_key
from buildq.store import DynamoProjectStore
from buildq_ops import oncall
from buildq_ops.emulator import running_emulator, wait_for_signal

T = TypeVar("T")

app = typer.Typer(
    help="Operate buildq: resources, API keys, the dead-letter queue, the queue, projects "
    "and workers; and the local AWS emulator.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


async def _bootstrap(settings: Settings, wait: float) -> BootstrapResult:
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(UnavailableError),
        stop=stop_after_delay(wait),
        wait=wait_exponential(multiplier=0.2, max=2),
        reraise=True,
    ):
        with attempt:
            async with aws_clients(settings) as clients:
                return await bootstrap(clients, settings)
    raise AssertionError("unreachable")  # pragma: no cover


def _print_bootstrap(result: BootstrapResult) -> None:
    verb = "created" if result.table_created else "exists "
    typer.echo(f"table  {verb} {result.table_name}")
    typer.echo(f"queue          {result.queue_url}")
    typer.echo(f"dlq            {result.dlq_url}")


@app.command("bootstrap")
def bootstrap_command(
    wait: Annotated[
        float, typer.Option(help="Seconds to keep retrying while AWS is unreachable")
    ] = 30.0,
) -> None:
    """Create the DynamoDB table, the build queue and its dead-letter queue (idempotent)."""
    settings = Settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format, service="ops")
    try:
        result = asyncio.run(_bootstrap(settings, wait))
    except BuildqError as exc:
        typer.echo(f"error: bootstrap failed: {exc}", err=True)
        raise typer.Exit(1) from None
    _print_bootstrap(result)


api_key_app = typer.Typer(
    help="Manage API keys (stored hashed in the table).", no_args_is_help=True
)
app.add_typer(api_key_app, name="api-key")
app.add_typer(oncall.dlq_app, name="dlq")
app.add_typer(oncall.queue_app, name="queue")
app.add_typer(oncall.projects_app, name="projects")
app.command("workers")(oncall.workers_command)


def _with_store(settings: Settings, fn: Callable[[DynamoProjectStore], Awaitable[T]]) -> T:
    async def main() -> T:
        async with aws_clients(settings) as clients:
            return await fn(DynamoProjectStore.from_settings(clients.dynamodb, settings))

    try:
        return asyncio.run(main())
    except BuildqError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@api_key_app.command("create")
def api_key_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for")],
    label: Annotated[str, typer.Option(help="A note on who holds the key")] = "",
) -> None:
    """Make a new API key for a tenant. The key is printed once; only its hash is kept."""
    if not tenant.strip():
        raise typer.BadParameter("must not be empty", param_hint="--tenant")
    key = f"bq_{secrets.token_urlsafe(32)}"
    settings = Settings()
    _with_store(settings, lambda store: store.put_api_key(hash_api_key(key), tenant, label=label))
    typer.echo(f"API key for tenant {tenant!r} (shown once, store it now):", err=True)
    typer.echo(key)


@api_key_app.command("revoke")
def api_key_revoke(key: Annotated[str, typer.Argument(help="The key to revoke")]) -> None:
    """Revoke an API key (APIs stop accepting it within their key cache time)."""
    if not _with_store(Settings(), lambda store: store.delete_api_key(hash_api_key(key))):
        typer.echo("error: no such API key", err=True)
        raise typer.Exit(1)
    typer.echo("revoked")


@app.command("emulator")
def emulator_command(
    host: Annotated[str, typer.Option(help="Address to bind (keep it on loopback)")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port to listen on", envvar="BUILDQ_EMULATOR_PORT")
    ] = 4566,
    with_bootstrap: Annotated[
        bool, typer.Option("--bootstrap/--no-bootstrap", help="Create buildq's resources in it")
    ] = False,
) -> None:
    """Run the embedded AWS emulator (moto server) in the foreground until Ctrl-C."""
    try:
        emulator = running_emulator(host, port)
        endpoint = emulator.__enter__()
    except (OSError, RuntimeError) as exc:
        typer.echo(f"error: cannot start the emulator on {host}:{port}: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        typer.echo(f"AWS emulator (moto) listening on {endpoint}", err=True)
        if with_bootstrap:
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            settings = Settings()
            _print_bootstrap(asyncio.run(_bootstrap(settings, 10)))
        wait_for_signal()
    finally:
        emulator.__exit__(None, None, None)
