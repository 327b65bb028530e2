"""How long a message waited: from its producer's clock to this worker's."""

from __future__ import annotations

import time
from datetime import UTC

from buildq.clock import parse_iso
from buildq.messages import BuildMessage
from buildq.queue import ReceivedMessage


def queue_lag(build: BuildMessage, message: ReceivedMessage) -> float:
    """Seconds from the message's ``enqueued_at`` (its producer's clock) to now; from
    SQS's SentTimestamp if ``enqueued_at`` is not a timestamp."""
    try:
        enqueued = parse_iso(build.enqueued_at)
        if enqueued.tzinfo is None:
            enqueued = enqueued.replace(tzinfo=UTC)
        sent = enqueued.timestamp()
    except ValueError:
        sent = message.sent_at_ms / 1000
    return max(0.0, time.time() - sent)
