"""buildq's own errors. Adapters translate botocore errors into these, so nothing
above the adapters imports botocore."""

from __future__ import annotations

from typing import Any


class BuildqError(Exception):
    """Base of every buildq error."""


class NotFoundError(BuildqError):
    """The record does not exist (or belongs to another tenant)."""


class ConflictError(BuildqError):
    """A conditional write lost: the record is not in the state the write needs.

    ``item`` is the record as it was (``ReturnValuesOnConditionCheckFailure``),
    so the loser learns who won without another read; ``None`` if it is missing.
    """

    def __init__(self, message: str, item: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.item = item


class LeaseLostError(ConflictError):
    """This run no longer owns the project: another worker took it over."""


class UnavailableError(BuildqError):
    """AWS could not be reached, or kept throttling, after bounded retries."""


class ResourceMissingError(UnavailableError):
    """The table or queue does not exist (not bootstrapped yet, or misconfigured)."""


class InvalidTransitionError(BuildqError):
    """A state change that the project state machine does not allow."""


class UnknownWorkflowError(BuildqError):
    """No workflow is registered under that name."""


class MessageError(BuildqError):
    """A queue message that cannot be understood (poison)."""


class WriteTooLargeError(BuildqError):
    """A write that would break one of DynamoDB's size limits (item 400 KB, expression
    4 KB; see ``buildq.limits``): refused before it is sent, or refused by DynamoDB
    with a ValidationException saying so. Never retried: the same write fails again.

    ``size`` and ``limit`` are in bytes when known.
    """

    def __init__(self, message: str, *, size: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit
