"""What every part of the projects-table adapter shares: the client, the table and
its retry policy, the UpdateExpression builder, and the one conditional UpdateItem."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Self

from buildq.aws import RetryPolicy
from buildq.items import stage_to_plain, to_attr
from buildq.limits import check_update
from buildq.models import StageSnapshot, StageStatus
from buildq.settings import Settings

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


@dataclass
class Update:
    """Builds one UpdateExpression with generated placeholder names."""

    sets: list[str] = field(default_factory=list)
    removes: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    def name(self, attribute: str) -> str:
        placeholder = f"#n{len(self.names)}"
        self.names[placeholder] = attribute
        return placeholder

    def value(self, value: Any) -> str:
        placeholder = f":v{len(self.values)}"
        self.values[placeholder] = to_attr(value)
        return placeholder

    def set(self, attribute: str, value: Any) -> Update:
        self.sets.append(f"{self.name(attribute)} = {self.value(value)}")
        return self

    def increment(self, attribute: str) -> Update:
        name = self.name(attribute)
        self.sets.append(f"{name} = if_not_exists({name}, {self.value(0)}) + {self.value(1)}")
        return self

    def set_stages(self, stages: Sequence[StageSnapshot]) -> Update:
        for stage in stages:
            path = f"{self.name('stages')}.{self.name(stage.name)}"
            self.sets.append(f"{path} = {self.value(stage_to_plain(stage))}")
        return self

    def start_stage(self, stage: StageSnapshot) -> str:
        """Set ``stage`` (its RUNNING snapshot) as one map, which is what a stage write
        would store; returns the condition to AND in: the stage exists, not yet done."""
        path = f"{self.name('stages')}.{self.name(stage.name)}"
        self.sets.append(f"{path} = {self.value(stage_to_plain(stage))}")
        state = f"{path}.{self.name('status')}"
        allowed = (StageStatus.PENDING, StageStatus.RUNNING, StageStatus.FAILED)
        return f" AND {state} IN ({', '.join(self.value(status.value) for status in allowed)})"

    def remove(self, *attributes: str) -> Update:
        self.removes.extend(self.name(attribute) for attribute in attributes)
        return self

    def expression(self) -> str:
        parts = []
        if self.sets:
            parts.append("SET " + ", ".join(self.sets))
        if self.removes:
            parts.append("REMOVE " + ", ".join(self.removes))
        return " ".join(parts)


class DynamoTable:
    """The client, the table and the retry policy every part of the adapter uses."""

    def __init__(
        self, client: DynamoDBClient, table_name: str, *, retry: RetryPolicy | None = None
    ) -> None:
        self._client = client
        self._table = table_name
        self._retry = retry or RetryPolicy()

    @classmethod
    def from_settings(cls, client: DynamoDBClient, settings: Settings) -> Self:
        return cls(client, settings.table_name, retry=RetryPolicy.from_settings(settings))

    async def _update(
        self,
        key: dict[str, Any],
        update: Update,
        condition: str,
        *,
        what: str,
        returns: Literal["ALL_NEW", "UPDATED_NEW", "NONE"] = "ALL_NEW",
    ) -> dict[str, Any]:
        """The one conditional UpdateItem: returns what ``returns`` asks for (the new
        item, the attributes it set, or {}), or raises ``ConflictError`` carrying the
        item as it was.

        Raises ``WriteTooLargeError``, before anything is sent, for a write over
        DynamoDB's limits or buildq's write budget (``buildq.limits.check_update``:
        with the create's check and the stage and error bounds, that keeps every
        project item within 400 KB, though this never sees the item)."""
        expression = update.expression()
        check_update(expression, condition, update.names, update.values, what=f"UpdateItem({what})")
        response = await self._retry.call(
            f"UpdateItem({what})",
            self._client.update_item,
            TableName=self._table,
            Key=key,
            UpdateExpression=expression,
            ConditionExpression=condition,
            ExpressionAttributeNames=update.names,
            ExpressionAttributeValues=update.values,
            ReturnValues=returns,
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
        )
        return dict(response.get("Attributes", {}))
