"""docker-compose.yml, checked without a Docker engine: valid against the Compose
specification's JSON schema, and wired the way the README says.

compose_spec.json is compose/config/compose_spec.json from the docker-compose 1.29.2
wheel on PyPI (Apache-2.0, compose_spec.LICENSE beside it), sha256
0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import SecretStr

from buildq.settings import ApiSettings, Settings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).with_name("compose_spec.json")
SCHEMA_SHA256 = "0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac"

SETTINGS_OF: dict[str, type[Settings]] = {
    "bootstrap": Settings,
    "api": ApiSettings,
    "worker": WorkerSettings,
}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def validator() -> jsonschema.Draft201909Validator:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def errors(document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, error.path))}: {error.message}"
        for error in validator().iter_errors(document)
    ]


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def environment(service: str) -> dict[str, str]:
    env = services()[service].get("environment", {})
    assert isinstance(env, dict), "environment as a mapping"
    return {key: str(value) for key, value in env.items()}


def test_the_file_is_valid_compose() -> None:
    assert errors(compose()) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda doc: doc["services"]["api"].update(restart_policy="always"),
        lambda doc: doc["services"]["worker"]["depends_on"]["bootstrap"].update(
            condition="service_finished"
        ),
        lambda doc: doc["services"]["localstack"]["healthcheck"].update(retries="many"),
    ],
)
def test_the_schema_rejects_what_compose_would(breakage: Any) -> None:
    broken = copy.deepcopy(compose())
    breakage(broken)
    assert errors(broken)


def test_localstack_serves_sqs_and_dynamodb_and_says_when_it_is_healthy() -> None:
    localstack = services()["localstack"]
    assert localstack["image"].startswith("${LOCALSTACK_IMAGE:-localstack/localstack:")
    assert set(str(localstack["environment"]["SERVICES"]).split(",")) == {"sqs", "dynamodb"}
    test = localstack["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert "_localstack/health" in " ".join(test)


def test_bootstrap_runs_once_after_localstack_and_the_others_wait_for_it() -> None:
    bootstrap = services()["bootstrap"]
    assert bootstrap["command"][0] == "bootstrap"
    assert bootstrap["depends_on"] == {"localstack": {"condition": "service_healthy"}}
    assert bootstrap.get("restart", "no") == "no"
    dockerfile = (ROOT / bootstrap["build"]["dockerfile"]).read_text()
    assert 'ENTRYPOINT ["buildq"]' in dockerfile
    for name in ("api", "worker"):
        assert services()[name]["depends_on"] == {
            "bootstrap": {"condition": "service_completed_successfully"}
        }


@pytest.mark.parametrize("name", ["bootstrap", "api", "worker"])
def test_every_service_talks_to_localstack_with_dummy_credentials(name: str) -> None:
    env = environment(name)
    assert env["AWS_ENDPOINT_URL"] == "http://localstack:4566"
    assert env["AWS_ACCESS_KEY_ID"] == env["AWS_SECRET_ACCESS_KEY"] == "test"
    assert env["AWS_REGION"]
    build = services()[name]["build"]
    assert build["context"] == "."
    assert (ROOT / build["dockerfile"]).is_file()


@pytest.mark.parametrize("name", ["bootstrap", "api", "worker"])
def test_every_buildq_variable_is_a_setting_of_that_service(name: str) -> None:
    fields = {f"BUILDQ_{field.upper()}" for field in SETTINGS_OF[name].model_fields}
    used = {key for key in environment(name) if key.startswith("BUILDQ_")}
    assert used - fields == set()


def test_the_api_is_published_on_8000_with_the_dev_keys() -> None:
    api = services()["api"]
    env = environment("api")
    assert env["BUILDQ_API_HOST"] == "0.0.0.0"
    assert env["BUILDQ_API_KEYS"] == "dev=demo,dev2=other"
    assert "8000:8000" in api["ports"]
    keys = ApiSettings(api_keys=SecretStr(env["BUILDQ_API_KEYS"])).static_api_keys()
    assert sorted(keys.values()) == ["demo", "other"]


def test_the_worker_scales_with_scale_worker_n() -> None:
    worker = services()["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    env = environment("worker")
    assert env["BUILDQ_METRICS_HOST"] == "0.0.0.0"
    grace = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert grace
    assert int(grace.group(1)) > float(env["BUILDQ_DRAIN_SECONDS"])
