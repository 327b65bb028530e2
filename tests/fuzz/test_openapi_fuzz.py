"""Fuzz the live API from its own OpenAPI document (schemathesis): whatever the
input, no 5xx, and every answer matches the documented status, content type,
headers and schema. Bounded: a fixed number of examples per operation.

One check is left out: "a schema-valid request is accepted". The API rightly
refuses some schema-valid values with a documented 422: an opaque cursor it did
not sign, or parameters the chosen workflow does not take.
"""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import positive_data_acceptance

from tests.harness import API_KEY, Stack

pytestmark = pytest.mark.e2e

EXAMPLES_PER_OPERATION = 100


@pytest.fixture(scope="module")
def api_schema(make_module_stack: Stack) -> Any:
    return schemathesis.openapi.from_url(f"{make_module_stack.api_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hypothesis.settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,  # the same examples on every run: a red CI is reproducible
)
def test_the_api_honours_its_own_schema(case: Any) -> None:
    case.call_and_validate(
        headers={"Authorization": f"Bearer {API_KEY}"},
        excluded_checks=[positive_data_acceptance],
    )
