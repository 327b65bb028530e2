"""buildq.limits: item sizes counted as DynamoDB counts them, the write checks, error
truncation, and the bounds that keep the worst-case project item under 400 KB."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from botocore.exceptions import ClientError

from buildq import limits
from buildq.aws import RetryPolicy, translate_errors
from buildq.errors import WriteTooLargeError
from buildq.items import project_to_item, stage_to_plain, to_attr
from buildq.models import ErrorInfo, Project, ProjectStatus, StageSnapshot, StageStatus
from buildq.store.base import Update
from buildq.workflows.base import Stage, Workflow
from buildq.workflows.registry import WorkflowRegistry

TS = "2026-11-23T10:00:01.000Z"

# -- item_size: sizes worked out by hand from the rules in limits' docstring ----------


@pytest.mark.parametrize(
    ("item", "size"),
    [
        ({"pk": {"S": "TENANT#t1"}}, 2 + 9),
        ({"é": {"S": "日本"}}, 2 + 6),  # UTF-8 bytes, name and value
        ({"n": {"N": "12345"}}, 1 + (1 + 3)),  # 5 digits: ceil(5/2) + 1
        ({"n": {"N": "-0.00120"}}, 1 + (1 + 1 + 1)),  # digits "12", +1 negative
        ({"n": {"N": "1000"}}, 1 + (1 + 1)),  # trailing zeros trimmed
        ({"n": {"N": "0"}}, 1 + 1),
        ({"ok": {"BOOL": True}, "no": {"NULL": True}}, (2 + 1) + (2 + 1)),
        ({"b": {"B": b"\x00\x01\x02"}}, 1 + 3),  # raw bytes, not base64
        ({"m": {"M": {}}}, 1 + 3),
        # 3 for the map, each element: key + value + 1
        ({"m": {"M": {"a": {"S": "xy"}, "bb": {"N": "7"}}}}, 1 + 3 + (1 + 2 + 1) + (2 + 2 + 1)),
        ({"l": {"L": [{"S": "abc"}, {"BOOL": False}]}}, 1 + 3 + (3 + 1) + (1 + 1)),
        ({"s": {"SS": ["a", "bcd"]}}, 1 + 3 + (1 + 1) + (3 + 1)),
        (
            {
                "pk": {"S": "TENANT#t1"},
                "attempt": {"N": "3"},
                "stages": {"M": {"plan": {"M": {"status": {"S": "PENDING"}}}}},
            },
            # 11 + (7 + 2) + (6 + 3 + (4 + (3 + (6 + 7 + 1)) + 1))
            11 + 9 + 31,
        ),
    ],
)
def test_item_size_counts_as_dynamodb_does(item: dict[str, Any], size: int) -> None:
    assert limits.item_size(item) == size


def test_item_size_of_a_project_item_adds_up_its_attributes() -> None:
    project = _project(stages=(StageSnapshot(name="plan"),))
    item = project_to_item(project, sweep_at=None)
    by_attribute = sum(
        len(name.encode()) + limits.attribute_size(value) for name, value in item.items()
    )
    assert limits.item_size(item) == by_attribute
    # "stage_order": a list of one string, "plan": 11 + 3 + (4 + 1)
    assert len("stage_order") + limits.attribute_size(item["stage_order"]) == 11 + 3 + 5


def test_an_unknown_attribute_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown DynamoDB attribute type"):
        limits.item_size({"x": {"Q": "?"}})


# -- error text ----------------------------------------------------------------------


def test_short_text_is_left_alone() -> None:
    assert limits.truncated("compiler said no") == "compiler said no"
    exact = "x" * limits.MAX_ERROR_MESSAGE_BYTES
    assert limits.truncated(exact) == exact


def test_long_text_keeps_head_and_tail_and_says_how_much_was_cut() -> None:
    text = "error: first thing\n" + "noise " * 100_000 + "\nfatal: the last line"
    cut = limits.truncated(text)
    size = len(cut.encode())
    assert size <= limits.MAX_ERROR_MESSAGE_BYTES
    assert cut.startswith("error: first thing\n")
    assert cut.endswith("fatal: the last line")
    match = re.search(r" … \[truncated ([\d,]+) bytes\] … ", cut)
    assert match is not None
    head, tail = cut[: match.start()], cut[match.end() :]
    assert int(match.group(1).replace(",", "")) == len(text) - len(head) - len(tail)
    assert text.startswith(head)
    assert text.endswith(tail)
    assert limits.truncated(cut) == cut  # bounded once, unchanged after


def test_truncation_never_splits_a_character() -> None:
    text = "日本語のエラー" * 50_000
    cut = limits.truncated(text, 1000)
    assert len(cut.encode()) <= 1000
    head, _, tail = cut.partition(" … [")
    assert set(head) <= set(text)
    assert set(tail.rpartition("] … ")[2]) <= set(text)


def test_error_info_cannot_hold_more_than_the_bound() -> None:
    huge = "x" * 600_000
    error = ErrorInfo(type="T" * 1000, message=huge)
    assert len(error.message.encode()) <= limits.MAX_ERROR_MESSAGE_BYTES
    assert "[truncated 59" in error.message
    assert len(error.type.encode()) <= limits.MAX_ERROR_TYPE_BYTES
    # every way in is bounded: as read back from an item, and from an exception
    assert ErrorInfo.model_validate({"type": "E", "message": huge}) == ErrorInfo(
        type="E", message=huge
    )
    from_exc = ErrorInfo.of(RuntimeError(huge))
    assert from_exc.type == "RuntimeError"
    assert len(from_exc.message.encode()) <= limits.MAX_ERROR_MESSAGE_BYTES
    assert ErrorInfo.of(ValueError()).message == "ValueError()"


# -- the worst case ------------------------------------------------------------------


def _project(**fields: Any) -> Project:
    base: dict[str, Any] = {
        "tenant_id": "t1",
        "project_id": "01HZXPROJECT0000000000000A",
        "name": "p",
        "workflow": "demo",
        "created_at": TS,
        "updated_at": TS,
    }
    return Project(**{**base, **fields})


def _names(count: int = limits.MAX_STAGES) -> list[str]:
    """Stage names of the longest allowed length, all different."""
    return [f"{i:02d}".ljust(limits.MAX_STAGE_NAME_BYTES, "s") for i in range(count)]


def worst_created() -> Project:
    """The largest project the API accepts: 16 KiB of parameters, a 200-character name of
    4-byte characters, the longest workflow name, MAX_STAGES stages of the longest names."""
    return _project(
        tenant_id="t" * 64,
        name="\U0001f680" * 200,  # 4 bytes each in UTF-8
        workflow="w" * 100,
        parameters={"p": "x" * (limits.MAX_PARAMETERS_BYTES - 8)},
        stages=tuple(StageSnapshot(name=name) for name in _names()),
    )


def worst_error() -> ErrorInfo:
    return ErrorInfo(type="E" * 1000, message="誤" * 100_000)


def worst_stage(name: str) -> StageSnapshot:
    """A stage at every bound at once: the longest output, error and worker id."""
    output = {"o": "x" * (limits.MAX_STAGE_OUTPUT_BYTES - 8)}
    assert limits.output_bytes(output) == limits.MAX_STAGE_OUTPUT_BYTES
    return StageSnapshot(
        name=name,
        status=StageStatus.FAILED,
        attempt=10**19,
        worker_id="w" * limits.MAX_WORKER_ID_BYTES,
        started_at=TS,
        finished_at=TS,
        output=output,
        error=worst_error(),
    )


def test_the_bounds_leave_a_margin_under_dynamodbs_item_limit() -> None:
    assert limits.DYNAMODB_ITEM_MAX_BYTES == 409_600
    assert limits.WORST_CASE_ITEM_BYTES == 334_016
    assert limits.WORST_CASE_ITEM_BYTES + limits.ITEM_MARGIN_BYTES <= limits.DYNAMODB_ITEM_MAX_BYTES


def test_each_value_a_run_writes_is_within_its_bound() -> None:
    stage = limits.attribute_size(to_attr(stage_to_plain(worst_stage(_names()[0]))))
    assert stage <= limits.MAX_STAGE_VALUE_BYTES
    assert limits.attribute_size(to_attr(worst_error().model_dump())) <= (
        limits.MAX_ERROR_VALUE_BYTES
    )


def test_the_largest_project_the_api_accepts_passes_the_create_check() -> None:
    item = project_to_item(worst_created(), sweep_at=1_700_000_000_000)
    limits.check_new_project(item, _names(), what="create")
    assert limits.item_size(item) <= limits.MAX_CREATE_ITEM_BYTES


def test_the_worst_case_item_fits_with_margin() -> None:
    """Every bound at once: the largest create, every stage at its largest, the largest
    last_error, every run attribute set with the longest worker id."""
    worker = "w" * limits.MAX_WORKER_ID_BYTES
    worst = worst_created().model_copy(
        update={
            "status": ProjectStatus.FAILED,
            "attempt": 10**19,
            "releases": 10**19,
            "attempt_base": 10**19,
            "started_at": TS,
            "finished_at": TS,
            "last_error": worst_error(),
            "worker_id": worker,
            "lease_owner": worker,
            "lease_expires_at": 10**15,
            "cancel_requested": True,
            "stages": tuple(worst_stage(name) for name in _names()),
        }
    )
    item = project_to_item(worst, sweep_at=10**15)
    item["claim_token"] = {"S": "c" * 32}
    item["cancel_seen"] = {"BOOL": True}
    size = limits.item_size(item)
    assert size <= limits.WORST_CASE_ITEM_BYTES
    assert size + limits.ITEM_MARGIN_BYTES <= limits.DYNAMODB_ITEM_MAX_BYTES


def test_the_largest_final_write_passes_the_update_check() -> None:
    """A final write carrying every stage at its largest, as finish() builds it."""
    update = (
        Update()
        .set_stages([worst_stage(name) for name in _names()])
        .set("status", "FAILED")
        .set("finished_at", TS)
        .set("updated_at", TS)
        .set("last_error", worst_error().model_dump())
        .remove("lease_owner", "lease_expires_at", "sweep_shard", "sweep_at")
    )
    condition = f"{update.name('lease_owner')} = {update.value('w')}"
    expression = update.expression()
    assert len(expression) < limits.DYNAMODB_EXPRESSION_MAX_BYTES // 2
    limits.check_update(expression, condition, update.names, update.values, what="finish")
    assert limits.update_size(update.names, update.values) <= limits.MAX_UPDATE_BYTES


# -- the write checks ----------------------------------------------------------------


def test_an_expression_over_4_kb_is_refused() -> None:
    update = Update()
    for i in range(400):
        update.set(f"a{i}", i)
    with pytest.raises(
        WriteTooLargeError, match="UpdateExpression is 5,782 bytes; DynamoDB takes at most 4,096"
    ) as refused:
        limits.check_update(update.expression(), None, update.names, update.values, what="w")
    assert refused.value.limit == 4096
    long_condition = " AND ".join(["attribute_exists(pk)"] * 200)
    with pytest.raises(WriteTooLargeError, match="ConditionExpression"):
        limits.check_update(
            "SET #n0 = :v0", long_condition, {"#n0": "a"}, {":v0": {"N": "1"}}, what="w"
        )


def test_one_value_over_a_stage_maps_bound_is_refused_with_its_path() -> None:
    big = StageSnapshot(name="plan", output={"o": "x" * 20_000})
    update = Update().set_stages([big])
    with pytest.raises(WriteTooLargeError, match=r"\(stages\.plan\) is 20,"):
        limits.check_update(update.expression(), None, update.names, update.values, what="w")


def test_a_write_carrying_more_than_the_update_budget_is_refused() -> None:
    update = Update()
    for i in range(40):  # each under the per-value bound, together over the budget
        update.set(f"a{i}", "x" * 10_000)
    with pytest.raises(WriteTooLargeError, match="the write carries 400,"):
        limits.check_update(update.expression(), None, update.names, update.values, what="w")


def test_the_create_check_refuses_too_many_stages_and_too_large_items() -> None:
    too_many = _names(limits.MAX_STAGES + 1)
    with pytest.raises(WriteTooLargeError, match="25 stages; at most 24"):
        limits.check_new_project({}, too_many, what="create")
    item = project_to_item(_project(parameters={"p": "x" * 40_000}), sweep_at=None)
    with pytest.raises(WriteTooLargeError, match="at most 32,768") as refused:
        limits.check_new_project(item, [], what="create")
    assert refused.value.size == limits.item_size(item)


# -- workflows -----------------------------------------------------------------------


def _step(_: Any) -> None:
    return None


def test_a_workflow_has_at_most_max_stages() -> None:
    fine = Workflow(name="fine", stages=tuple(Stage(name, _step) for name in _names()))
    WorkflowRegistry([fine])
    with pytest.raises(ValueError, match="workflow 'big': 25 stages; at most 24"):
        Workflow(name="big", stages=tuple(Stage(f"s{i}", _step) for i in range(25)))


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        (["a", "a"], "stage 'a' appears twice"),
        (["x" * 65], "is over 64 bytes"),
        ([""], "a stage name is empty"),
    ],
)
def test_a_workflows_stage_names_are_bounded(names: list[str], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        Workflow(name="w", stages=tuple(Stage(name, _step) for name in names))


# -- stage outputs -------------------------------------------------------------------


def test_total_output_budget() -> None:
    eight = {"o": "x" * (limits.MAX_STAGE_OUTPUT_BYTES - 8)}
    full = [StageSnapshot(name=f"s{i}", output=eight) for i in range(16)]  # 128 KiB exactly
    assert limits.total_output_bytes(full) == limits.MAX_TOTAL_OUTPUT_BYTES
    assert limits.outputs_within_budget(full)
    assert not limits.outputs_within_budget([*full, StageSnapshot(name="more", output={})])
    assert limits.outputs_within_budget([StageSnapshot(name="none")])
    slim = limits.without_outputs(full)
    assert [stage.name for stage in slim] == [stage.name for stage in full]
    assert all(stage.output is None for stage in slim)


# -- DynamoDB's own refusals ---------------------------------------------------------


def _client_error(code: str, message: str) -> ClientError:
    response: dict[str, Any] = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": 400},
    }
    return ClientError(response, "UpdateItem")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "message",
    [
        "Item size has exceeded the maximum allowed size",
        "Item size to update has exceeded the maximum allowed size",
        "Invalid UpdateExpression: Expression size has exceeded the maximum allowed size; "
        "expression size: 4187",
    ],
)
def test_a_too_large_validation_exception_becomes_write_too_large(message: str) -> None:
    with pytest.raises(WriteTooLargeError, match=re.escape(message[:30])), translate_errors("op"):
        raise _client_error("ValidationException", message)


def test_other_validation_exceptions_stay_as_they_are() -> None:
    with pytest.raises(ClientError), translate_errors("op"):
        raise _client_error("ValidationException", "One or more parameter values were invalid")


def test_a_too_large_write_is_never_retried() -> None:
    calls = 0

    async def update_item(**_: Any) -> None:
        nonlocal calls
        calls += 1
        raise _client_error(
            "ValidationException", "Item size has exceeded the maximum allowed size"
        )

    with pytest.raises(WriteTooLargeError):
        asyncio.run(RetryPolicy(attempts=5).call("UpdateItem(test)", update_item))
    assert calls == 1
