"""The C allocator's settings for the service processes."""

from __future__ import annotations

import os

M_ARENA_MAX = -8  # mallopt() parameter, from glibc's <malloc.h>
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``arenas``, as ``MALLOC_ARENA_MAX`` would.

    glibc gives threads their own malloc arenas (up to eight per core), and an arena
    keeps what was freed into it. A service process has few threads and they do little:
    the event loop's resolver threads (getaddrinfo), asyncio's default executor where
    aiobotocore builds its TLS contexts (and the worker runs synchronous workflow
    stages). Yet the arena one of them took held about 1.7 MiB of resident memory in
    every API and worker process. Python allocates under the GIL, mostly from its own
    pools, so sharing arenas costs no measurable contention.

    Set here, by the process itself, rather than as MALLOC_ARENA_MAX in an image: it
    then holds however a service is started (image, ``make run``, tests, benchmark).
    Call it first thing in a service's ``main()``: arenas already handed out stay. An
    explicit MALLOC_ARENA_MAX (or the glibc.malloc.arena_max tunable) wins. Returns
    whether the cap was set (never off glibc).
    """
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    import ctypes  # here: a process that never calls this does not pay for ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt: not glibc
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))
