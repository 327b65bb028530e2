"""The worker's Prometheus metrics (the AWS call histogram is in ``buildq.metrics``).

Each counter is incremented next to the log line of the same event, so the
metrics and the logs never disagree.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from buildq.transitions import ClaimRefusal

ACTIVE_WORKFLOWS = Gauge(
    "buildq_worker_active_workflows", "Claimed projects whose workflow this worker is running"
)
FREE_SLOTS = Gauge(
    "buildq_worker_free_slots", "Slots free for another message (max_workflow_workers - in use)"
)
MESSAGES_RECEIVED = Counter("buildq_worker_messages_received", "Build messages received")
MESSAGES_DELETED = Counter(
    "buildq_worker_messages_deleted",
    "Build messages deleted from the build queue (done, dropped, dead-lettered, released)",
)
MESSAGES_RELEASED = Counter(
    "buildq_worker_messages_released",
    "Runs handed back unfinished by a draining worker (project.released)",
)
MESSAGES_DEAD_LETTERED = Counter(
    "buildq_worker_messages_dead_lettered",
    "Messages moved to the dead-letter queue (message.dead_lettered), by reason: poison "
    "(unreadable), missing (no such project), failed (the project FAILED)",
    ["reason"],
)
RETRIES_SCHEDULED = Counter(
    "buildq_worker_retries_scheduled", "Failed attempts scheduled for a retry after a backoff"
)
CLAIM_REFUSALS = Counter(
    "buildq_worker_claim_refusals",
    "Messages whose project could not be claimed, by reason",
    ["reason"],
)
HEARTBEAT_FAILURES = Counter(
    "buildq_worker_heartbeat_failures",
    "Heartbeat writes that failed, by kind: visibility (per message) or lease (per run)",
    ["kind"],
)
LEASE_LOSSES = Counter(
    "buildq_worker_lease_losses", "Runs stopped because another worker took the project"
)
BACKGROUND_JOB_FAILURES = Counter(
    "buildq_worker_background_job_failures",
    "Background jobs (heartbeat, presence, sweeper) that raised",
    ["job"],
)
STAGE_SECONDS = Histogram(
    "buildq_worker_stage_duration_seconds",
    "Duration of one run of a workflow stage, by workflow, stage and outcome "
    "(succeeded, failed, timed_out, cancelled)",
    ["workflow", "stage", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)
QUEUE_LAG_SECONDS = Histogram(
    "buildq_worker_queue_lag_seconds",
    "From a message's enqueued_at to the claim of its project; delivery=redelivery "
    "includes the earlier attempts and backoff of the same message",
    ["delivery"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
EVENT_LOOP_LAG_SECONDS = Histogram(
    "buildq_worker_event_loop_lag_seconds",
    "How late a 250 ms timer on the worker's event loop fired",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Known label values start at 0, so rate() and alerts work before the first event.
for _refusal in ClaimRefusal:
    CLAIM_REFUSALS.labels(reason=_refusal.value)
for _reason in ("poison", "missing", "failed"):
    MESSAGES_DEAD_LETTERED.labels(reason=_reason)
for _kind in ("visibility", "lease"):
    HEARTBEAT_FAILURES.labels(kind=_kind)


def track_slots(active_workflows: Callable[[], float], free_slots: Callable[[], float]) -> None:
    """Read the slot gauges from the worker at each scrape."""
    ACTIVE_WORKFLOWS.set_function(active_workflows)
    FREE_SLOTS.set_function(free_slots)
