"""``buildq-api``: serve the API under uvicorn, configured from the environment."""

from __future__ import annotations

import uvicorn

from buildq.logging import configure_logging
from buildq.memory import limit_malloc_arenas
from buildq.settings import ApiSettings
from buildq_api.app import create_app


def main() -> None:
    limit_malloc_arenas()
    settings = ApiSettings()
    configure_logging(level=settings.log_level, fmt=settings.log_format, service="api")
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # our structlog set-up, not uvicorn's
        access_log=False,  # RequestContextMiddleware logs one line per request
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
