"""The embedded AWS emulator: moto in server mode, reached over plain HTTP.

Only for local runs and tests; production code never knows it exists (it
talks to whatever AWS_ENDPOINT_URL points at).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class SerializedDynamoDB:
    """WSGI wrapper: one DynamoDB request at a time.

    moto checks a condition expression and then writes, without a lock, so two
    concurrent conditional writes to one item can both succeed; DynamoDB never
    lets that happen, and buildq's claim relies on it. DynamoDB calls in moto
    are quick, so serialising them costs little; SQS calls (whose long polls
    block for seconds) stay concurrent.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if not environ.get("HTTP_X_AMZ_TARGET", "").startswith("DynamoDB_"):
            result: Iterable[bytes] = self.app(environ, start_response)
            return result
        with self.lock:
            return list(self.app(environ, start_response))


@contextmanager
def running_emulator(host: str, port: int) -> Iterator[str]:
    """Run moto's server in a background thread; yields its endpoint URL."""
    try:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server
    except ImportError as exc:  # the emulator is an optional extra of buildq-ops
        raise RuntimeError("the emulator needs moto: install buildq-ops[emulator]") from exc
    # One access-log line per AWS call drowns everything else out.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = SerializedDynamoDB(DomainDispatcherApplication(create_backend_app))
    server = make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, name="emulator", daemon=True)
    thread.start()
    bound_port = server.server_address[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.shutdown()
        thread.join()


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
