"""buildq-client: a typed sync and async client of the buildq HTTP API.

```python
from buildq_client import BuildqClient

with BuildqClient("http://localhost:8000", api_key="...") as client:
    project = client.create_project("hello", "demo", {"stage_seconds": 0.5})
    project = client.wait(project.id, timeout=60)
    print(project.status)  # ProjectStatus.SUCCEEDED
```
"""

from __future__ import annotations

from buildq_client._async import AsyncBuildqClient
from buildq_client._core import __version__
from buildq_client._sync import BuildqClient
from buildq_client.errors import (
    BuildqError,
    Conflict,
    InvalidResponse,
    NotFound,
    ServerError,
    Unauthorized,
    Unavailable,
    ValidationFailed,
    WaitTimeout,
)
from buildq_client.models import (
    TERMINAL_STATUSES,
    ErrorInfo,
    Project,
    ProjectPage,
    ProjectStatus,
    Stage,
    StageStatus,
)

__all__ = [
    "TERMINAL_STATUSES",
    "AsyncBuildqClient",
    "BuildqClient",
    "BuildqError",
    "Conflict",
    "ErrorInfo",
    "InvalidResponse",
    "NotFound",
    "Project",
    "ProjectPage",
    "ProjectStatus",
    "ServerError",
    "Stage",
    "StageStatus",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
    "WaitTimeout",
    "__version__",
]
