"""LocalStack as the tests' second SQS implementation (``BUILDQ_TEST_SQS=localstack``).

moto is lenient where real SQS is not; LocalStack's SQS provider is written against
AWS's own snapshots. With ``BUILDQ_TEST_SQS=localstack`` the session starts LocalStack
(SERVICES=sqs) from its own virtualenv, .tools/localstack (Python 3.13, hashed
tests/localstack/requirements.txt; ``make test-localstack`` builds it), on a free
loopback port, with every file it writes under one temporary directory and no
persistence; it is stopped by its pid at the end. Only SQS goes there, through
botocore's service-specific ``AWS_ENDPOINT_URL_SQS``: DynamoDB stays on moto.

Queue URLs are AWS-shaped (``SQS_ENDPOINT_STRATEGY=off``:
``http://127.0.0.1:<port>/000000000000/<name>``) and name LocalStack's own address
(``LOCALSTACK_HOST``) whichever address a request came through, a fault proxy's too.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
from localstack_client.config import get_service_endpoint

from tests.harness import free_port, start_process, wait_until

REPO = Path(__file__).resolve().parents[2]
SQS_BACKENDS = ("moto", "localstack")
# The venv make test-localstack builds; BUILDQ_LOCALSTACK_PYTHON names another interpreter.
DEFAULT_PYTHON = REPO / ".tools" / "localstack" / "bin" / "python"
START_SECONDS = 60.0


def sqs_backend() -> str:
    """Which SQS the tests use: ``BUILDQ_TEST_SQS`` (``moto``, the default, or ``localstack``)."""
    backend = os.environ.get("BUILDQ_TEST_SQS", "").strip().lower() or "moto"
    if backend not in SQS_BACKENDS:
        raise ValueError(f"BUILDQ_TEST_SQS={backend!r}: one of {', '.join(SQS_BACKENDS)}")
    return backend


def localstack_python() -> Path:
    python = Path(os.environ.get("BUILDQ_LOCALSTACK_PYTHON") or DEFAULT_PYTHON)
    if not python.exists():
        raise RuntimeError(
            f"BUILDQ_TEST_SQS=localstack needs LocalStack's venv ({python} is missing): "
            "make test-localstack builds it"
        )
    return python


def sqs_endpoint_of(host_and_port: str) -> str:
    """LocalStack's SQS endpoint at ``host_and_port``, as localstack-client spells it. The
    client answers $AWS_ENDPOINT_URL instead whenever that is set (the emulator's, in a
    test session), so it is asked without it."""
    with mock.patch.dict(os.environ):
        for name in ("AWS_ENDPOINT_URL", "USE_SSL"):
            os.environ.pop(name, None)
        endpoint = get_service_endpoint("sqs", localstack_host=host_and_port)
    if not isinstance(endpoint, str):
        raise RuntimeError("localstack-client knows no SQS endpoint")
    return endpoint


def localstack_env(root: Path, host_and_port: str) -> dict[str, str]:
    """LocalStack's environment: only SQS, nothing kept, nothing written outside ``root``,
    nothing asked of the network (no DNS server, certificate download or analytics)."""
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "LOCALSTACK_", "BUILDQ_"))
        and key not in ("PYTHONPATH", "VIRTUAL_ENV", "LD_PRELOAD")
    }
    dirs = {name: root / name for name in ("tmp", "filesystem", "config", "cache", "home")}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return {
        **inherited,
        "PYTHONUNBUFFERED": "1",
        "HOME": str(dirs["home"]),
        "TMPDIR": str(dirs["tmp"]),
        "XDG_CACHE_HOME": str(dirs["cache"]),
        "FILESYSTEM_ROOT": str(dirs["filesystem"]),
        "CONFIG_DIR": str(dirs["config"]),
        "SERVICES": "sqs",
        "EAGER_SERVICE_LOADING": "1",
        "PERSISTENCE": "0",
        "GATEWAY_LISTEN": host_and_port,
        "LOCALSTACK_HOST": host_and_port,
        "SQS_ENDPOINT_STRATEGY": "off",
        "DNS_ADDRESS": "0",
        "DISABLE_EVENTS": "1",
        "SKIP_SSL_CERT_DOWNLOAD": "1",
        "OVERRIDE_IN_DOCKER": "0",
    }


def _sqs_ready(endpoint: str) -> bool:
    health: dict[str, Any] = httpx.get(f"{endpoint}/_localstack/health", timeout=2).json()
    return health.get("services", {}).get("sqs") in ("available", "running")


@contextmanager
def running_localstack(root: Path) -> Iterator[str]:
    """LocalStack's SQS on a free loopback port until the block ends; yields its endpoint.
    Its log is ``root/localstack.log``."""
    python = localstack_python()
    host_and_port = f"127.0.0.1:{free_port()}"
    endpoint = sqs_endpoint_of(host_and_port)
    proc = start_process(
        "localstack",
        [str(python), "-m", "localstack.runtime.main"],
        localstack_env(root, host_and_port),
        root,
    )
    started = time.monotonic()
    try:
        try:
            wait_until(
                lambda: "exited" if not proc.alive() else _sqs_ready(endpoint),
                timeout=START_SECONDS,
                interval=0.2,
                what="LocalStack's SQS to be available",
            )
            if not proc.alive():
                raise RuntimeError("LocalStack exited at its start")
        except BaseException:
            print(f"LocalStack's log ({proc.log_path}):\n{proc.log()[-4000:]}")
            raise
        print(f"\nLocalStack SQS at {endpoint} (up in {time.monotonic() - started:.1f} s)")
        yield endpoint
    finally:
        proc.stop()
