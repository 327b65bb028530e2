"""The embedded AWS emulator: moto in server mode, reached over plain HTTP.

Only for local runs and tests; production code never knows it exists (it
talks to whatever AWS_ENDPOINT_URL points at).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def running_emulator(host: str, port: int) -> Iterator[str]:
    """Run moto's server in a background thread; yields its endpoint URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # the emulator is an optional extra of buildq-ops
        raise RuntimeError("the emulator needs moto: install buildq-ops[emulator]") from exc
    # One access-log line per AWS call drowns everything else out.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    bound_host, bound_port = server.get_host_and_port()
    try:
        yield f"http://{bound_host}:{bound_port}"
    finally:
        server.stop()


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
