"""buildq worker."""

# First, before anything here imports structlog or aiobotocore: see its docstring.
import buildq.lean_imports  # noqa: F401
