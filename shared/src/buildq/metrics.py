"""Prometheus metrics both services record: defined once, in the default registry.

Each service adds its own (``buildq_api.metrics``, ``buildq_worker.metrics``) and
serves the default registry at ``/metrics``. Labels take only values from small,
fixed sets (operation names, outcomes, route templates), never ids.
"""

from __future__ import annotations

import re

from prometheus_client import Gauge, Histogram, disable_created_metrics

from buildq.clock import CLOCK

# ``*_created`` series double the output and nothing here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

AWS_CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)

AWS_CALL_SECONDS = Histogram(
    "buildq_aws_call_duration_seconds",
    "Duration of one attempt of an AWS call, by API operation and outcome "
    "(ok, conflict, missing, unavailable, error, cancelled)",
    ["operation", "outcome"],
    buckets=AWS_CALL_BUCKETS,
)

CLOCK_OFFSET_SECONDS = Gauge(
    "buildq_clock_offset_seconds",
    "AWS's clock minus this machine's, as this process estimates it from the Date "
    "headers of AWS responses (0 before the first); every buildq time is on AWS's clock",
)
CLOCK_OFFSET_SECONDS.set_function(lambda: CLOCK.offset)

_API_NAME = re.compile(r"[A-Za-z]+")


def aws_operation(name: str) -> str:
    """The AWS API name of a call (``UpdateItem(claim)`` → ``UpdateItem``): callers may
    decorate the name they pass, the label stays one of AWS's own operation names."""
    match = _API_NAME.match(name)
    return match.group(0) if match else "other"
