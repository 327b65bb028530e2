"""The API's Prometheus metrics (the AWS call histogram is in ``buildq.metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# Long polls (``?wait=20``) answer after up to 20 s.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)

HTTP_REQUESTS = Counter(
    "buildq_http_requests",
    "HTTP requests answered, by route template, method and status",
    ["route", "method", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "buildq_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template, method and status",
    ["route", "method", "status"],
    buckets=REQUEST_BUCKETS,
)
PROJECTS_CREATED = Counter(
    "buildq_projects_created",
    "Projects created (not counting idempotent replays), by workflow",
    ["workflow"],
)
