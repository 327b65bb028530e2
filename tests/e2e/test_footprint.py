"""What the service processes load: the API and a worker, started for real, serve a
project from creation to SUCCEEDED without importing the libraries they do not use
but that the development environment has installed (see buildq.lean_imports)."""

from __future__ import annotations

import pytest

from tests.harness import Stack, create_demo

pytestmark = pytest.mark.e2e

# Imported by structlog (rich, and pygments through it) and aiobotocore (httpx, httpx2)
# when installed; never needed by the API or a worker.
UNUSED = {"rich", "pygments", "httpx", "httpx2"}


def imported(log: str) -> set[str]:
    """Every module a process loaded, from its verbose (``PYTHONVERBOSE``) lines:
    ``import 'name' # <loader>``; an import that failed prints none."""
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("import '")}


def test_the_services_do_not_import_the_optional_libraries_they_do_not_use(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONVERBOSE", "1")  # the processes' environment
    stack.start_api()
    stack.start_worker()
    with stack.http() as http:
        project_id = create_demo(http, stage_seconds=0)
        stack.wait_for_status(http, project_id, {"SUCCEEDED"})
    for proc in stack.procs:
        modules = imported(proc.log())
        assert {"structlog", "aiobotocore"} <= modules, proc.name  # the check sees imports
        assert not {name for name in modules if name.split(".")[0] in UNUSED}, proc.name
