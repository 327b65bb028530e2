"""Crash points for tests that must kill a process between two writes.

``BUILDQ_CRASH_AT=<name>`` makes the process exit at once (no cleanup, like a
SIGKILL) when it reaches ``crash_point(<name>)``. Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os


def crash_point(name: str) -> None:
    if os.environ.get("BUILDQ_CRASH_AT") == name:
        os._exit(137)
