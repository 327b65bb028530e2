"""`make run` and the README's "Try it" lines, as a newcomer would use them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from buildq.settings import ApiSettings, WorkerSettings
from tests.harness import free_port, wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _try_it_script() -> str:
    section = README.split("### Try it", 1)[1]
    return section.split("```bash", 1)[1].split("```", 1)[0]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_make_run_serves_the_readme_lines_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    api_port, aws_port = free_port(), free_port()
    env_file = tmp_path / "test.env"
    dev_env = (REPO / "dev.env").read_text()
    env_file.write_text(
        dev_env.replace("4566", str(aws_port)).replace("8000", str(api_port))
        + "BUILDQ_LOG_FORMAT=json\n"
    )
    log = tmp_path / "make-run.log"
    with log.open("wb") as out:
        make = subprocess.Popen(
            ["make", "-s", "run", f"ENV_FILE={env_file}"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, like a terminal's job
        )
    pgid = make.pid
    try:
        api = f"http://127.0.0.1:{api_port}"
        wait_until(
            lambda: httpx.get(f"{api}/readyz", timeout=2).status_code == 200,
            timeout=90,
            what="make run to come up",
        )
        wait_until(lambda: log.read_text().count('"worker.started"') == 2, timeout=30)
        script = _try_it_script().replace("localhost:8000", f"127.0.0.1:{api_port}")
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "HTTP/1.1 202 Accepted" in result.stdout
        assert '"status": "SUCCEEDED"' in result.stdout  # the json.tool-printed project
        assert "urn:buildq:problem:unknown-workflow" in result.stdout
        ids = re.findall(r'"id":"([0-9A-Z]{26})"', result.stdout)
        assert ids, result.stdout
    finally:
        os.killpg(pgid, signal.SIGINT)  # Ctrl-C
        try:
            make.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            tail = log.read_text()[-3000:]
            raise AssertionError(f"make run did not stop on Ctrl-C:\n{tail}") from None
    deadline = time.monotonic() + 10
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(pgid), "processes outlived make run"
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_readme_documents_every_setting() -> None:
    fields = set(ApiSettings.model_fields) | set(WorkerSettings.model_fields)
    missing = [name for name in fields if f"`BUILDQ_{name.upper()}`" not in README]
    assert missing == []
