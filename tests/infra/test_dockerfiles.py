"""The Dockerfiles and .dockerignore, checked without a Docker engine: the structure
the images rely on, the build commands against the lock, and the HEALTHCHECK
commands run for real against a local HTTP server."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from buildq.settings import ApiSettings, Settings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
UV_VERSION = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]


@dataclass(frozen=True)
class Image:
    dockerfile: str
    package: str
    source: str  # the one directory besides shared/ whose source it copies
    settings: type[Settings]
    health_port_env: str | None
    health_port: int | None


IMAGES = [
    Image(
        "services/api/Dockerfile",
        "buildq-api",
        "services/api/",
        ApiSettings,
        "BUILDQ_API_PORT",
        8000,
    ),
    Image(
        "services/worker/Dockerfile",
        "buildq-worker",
        "services/worker/",
        WorkerSettings,
        "BUILDQ_METRICS_PORT",
        9102,
    ),
    Image("ops/Dockerfile", "buildq-ops", "ops/", Settings, None, None),
]
IDS = [image.package for image in IMAGES]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages: (instruction, arguments) with line
    continuations joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            for key, value in args.items():
                base = base.replace(f"${{{key}}}", value)
            stages.append(Stage(base=base.strip(), name=name.strip()))
        elif not stages and keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append((keyword, " ".join(rest.split())))
    return args, stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for pair in args.split():
            key, _, value = pair.partition("=")
            env[key] = value
    return env


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_multi_stage_on_slim_python_3_11(image: Image) -> None:
    _, stages = parse(ROOT / image.dockerfile)
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base), stage.base
    final = stages[-1]
    assert final.all("COPY") == [f"--from={stages[0].name} /opt/venv /opt/venv"]


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_the_build_stage_installs_one_package_from_the_lock_with_the_pinned_uv(
    image: Image,
) -> None:
    _, stages = parse(ROOT / image.dockerfile)
    build = stages[0]
    assert UV_VERSION
    runs = " && ".join(build.all("RUN"))
    assert (
        f"pip install --no-cache-dir --disable-pip-version-check uv=={UV_VERSION.group(1)}" in runs
    )
    syncs = [run for run in build.all("RUN") if run.startswith("uv sync")]
    assert syncs == [
        f"uv sync --frozen --no-dev --no-install-workspace --package {image.package}",
        f"uv sync --frozen --no-dev --no-editable --package {image.package}",
    ]
    copied = [args.split()[0] for args in build.all("COPY")]
    sources = [path for path in copied if path.endswith("/")]
    assert sources == ["shared/", image.source]
    # Every workspace member's pyproject.toml (uv reads the whole workspace), the lock.
    members = re.search(r"members = \[(.*?)\]", (ROOT / "pyproject.toml").read_text())
    assert members
    for member in re.findall(r'"([^"]+)"', members.group(1)):
        assert f"{member}/pyproject.toml" in copied
    assert "pyproject.toml" in copied
    assert env_of(build)["UV_PROJECT_ENVIRONMENT"] == "/opt/venv"


@pytest.mark.parametrize("image", IMAGES, ids=IDS)
def test_the_final_stage_runs_unprivileged_without_build_tools(image: Image) -> None:
    _, stages = parse(ROOT / image.dockerfile)
    final = stages[-1]
    [user] = final.all("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert final.all("STOPSIGNAL") == ["SIGTERM"]
    runs = " ".join(final.all("RUN"))
    assert "pip uninstall --yes --quiet pip setuptools wheel" in runs
    assert not re.search(r"\b(pip|uv) (install|sync)\b|apt-get install", runs)
    env = env_of(final)
    assert env["PATH"].startswith("/opt/venv/bin:")
    fields = {f"BUILDQ_{name.upper()}" for name in image.settings.model_fields}
    assert {key for key in env if key.startswith("BUILDQ_")} <= fields


def test_the_services_listen_on_all_interfaces_in_a_container() -> None:
    api = env_of(parse(ROOT / "services/api/Dockerfile")[1][-1])
    worker = env_of(parse(ROOT / "services/worker/Dockerfile")[1][-1])
    assert (api["BUILDQ_API_HOST"], api["BUILDQ_API_PORT"]) == ("0.0.0.0", "8000")
    assert (worker["BUILDQ_METRICS_HOST"], worker["BUILDQ_METRICS_PORT"]) == ("0.0.0.0", "9102")


def healthcheck_command(image: Image) -> list[str]:
    _, stages = parse(ROOT / image.dockerfile)
    [healthcheck] = stages[-1].all("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert re.search(r"--interval=\d+s", options)
    assert re.search(r"--timeout=\d+s", options)
    parsed: list[str] = json.loads(command)
    return parsed


@contextmanager
def http_server(status: int) -> Iterator[tuple[int, list[str]]]:
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            self.send_response(status)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], paths
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("image", [i for i in IMAGES if i.health_port], ids=IDS[:2])
def test_the_healthcheck_asks_healthz_and_fails_on_an_error(image: Image) -> None:
    command = healthcheck_command(image)
    assert command[:2] == ["python", "-c"]
    assert image.health_port_env
    assert f"'{image.health_port}'" in command[2]  # the default port
    for status, ok in ((200, True), (503, False)):
        with http_server(status) as (port, paths):
            result = subprocess.run(
                [sys.executable, "-c", command[2]],
                env={image.health_port_env: str(port)},
                capture_output=True,
                timeout=30,
                check=False,
            )
        assert (result.returncode == 0) is ok, result.stderr
        assert paths == ["/healthz"]


def test_the_ops_image_is_a_command_without_healthcheck() -> None:
    _, stages = parse(ROOT / "ops/Dockerfile")
    assert stages[-1].all("HEALTHCHECK") == ["NONE"]
    assert stages[-1].all("ENTRYPOINT") == ['["buildq"]']


# -- .dockerignore -----------------------------------------------------------------


def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _matches(pattern: str, path: str) -> bool:
    pattern = pattern.rstrip("/")
    if pattern.startswith("**/"):
        tail = pattern[3:]
        parts = path.split("/")
        return any(fnmatch.fnmatchcase("/".join(parts[i:]), tail) for i in range(len(parts)))
    return fnmatch.fnmatchcase(path, pattern)


def in_context(path: str) -> bool:
    """Whether the build context holds ``path``: the last matching pattern wins, and a
    pattern matching a parent directory matches everything below it (as Docker)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for pattern in ignore_patterns():
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        if any(_matches(body, prefix) for prefix in prefixes):
            included = negated
    return included


def test_the_context_holds_what_the_builds_copy_and_nothing_else() -> None:
    for image in IMAGES:
        _, stages = parse(ROOT / image.dockerfile)
        for args in stages[0].all("COPY"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
                sample = (
                    source
                    if not source.endswith("/")
                    else next(
                        str(path.relative_to(ROOT))
                        for path in sorted((ROOT / source).rglob("*.py"))
                        if "__pycache__" not in path.parts
                    )
                )
                assert in_context(sample), (image.dockerfile, sample)
    for excluded in (
        ".git/config",
        ".venv/bin/python",
        "tests/conftest.py",
        "infra/terraform/main.tf",
        "shared/src/buildq/__pycache__/x.pyc",
        ".tools/bin/uv",
        "client/src/buildq_client/__init__.py",
    ):
        assert not in_context(excluded), excluded
