"""Import the libraries the services run on without the extras they only pick up
because those happen to be installed.

structlog imports ``rich`` (and with it pygments) when it can, for pretty tracebacks
on a terminal; aiobotocore imports ``httpx`` (or its fork ``httpx2``) when it can,
for a second HTTP backend buildq never selects, and httpx in turn imports its
command line (click, rich, pygments). Neither is a dependency of the API or the
worker: their images do not have them. The workspace's development environment
does (the ops CLI needs typer and rich, the client httpx, the fuzz tests
schemathesis), and there they cost every API and worker process about 6 MiB of
resident memory for nothing, and made a process behave differently from the same
process in its image (structlog's JSON tracebacks render locals with rich when it
is there).

The service packages (``buildq_api``, ``buildq_worker``) import this module from
their ``__init__``, so it runs before anything of theirs imports structlog or
aiobotocore. While it imports them, the optional modules are marked as absent
(``sys.modules[name] = None``, the documented way to make an import fail), then
restored: anything imported afterwards that really wants rich or httpx gets it.
A module already imported is left alone.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

# Optional imports of structlog (rich) and aiobotocore (httpx2, httpx).
UNUSED_OPTIONAL = ("rich", "httpx", "httpx2")


@contextmanager
def absent(*names: str) -> Iterator[None]:
    """Within the block, ``import name`` fails for each of ``names`` not yet imported."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]


with absent(*UNUSED_OPTIONAL):
    import aiobotocore.session  # noqa: F401
    import structlog  # noqa: F401
