"""Workflows (buildq.workflows): the registry, the demo workflow and StageContext."""

from __future__ import annotations

import asyncio
import inspect
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from buildq.errors import UnknownWorkflowError
from buildq.models import Project
from buildq.transitions import new_project
from buildq.workflows.base import (
    CancelledByRequestError,
    JsonObject,
    PermanentError,
    RetryableError,
    Stage,
    StageContext,
    StageFn,
    Workflow,
)
from buildq.workflows.demo import DEMO, DEMO_STAGES, DemoParameters
from buildq.workflows.registry import WorkflowRegistry, load_registry

DEMO_DEFAULTS: JsonObject = {
    "stage_seconds": 1.0,
    "fail_at_stage": None,
    "fail_times": None,
    "fail_mode": "transient",
}


class _NullLog:
    def bind(self, **_: Any) -> _NullLog:
        return self

    def info(self, *_: Any, **__: Any) -> None:
        pass


async def _noop(ctx: StageContext) -> JsonObject:
    return {}


def _workflow(name: str, *stages: str) -> Workflow:
    return Workflow(name=name, stages=tuple(Stage(stage, _noop) for stage in stages or ("only",)))


def demo_project(parameters: JsonObject) -> Project:
    return new_project(
        tenant_id="tenant-a",
        project_id="01HZXDEMO",
        name="demo run",
        workflow="demo",
        stage_names=DEMO_STAGES,
        parameters=DEMO.validate_parameters(parameters),
        now="2024-05-01T12:00:00.000Z",
    )


async def _run_stage(
    fn: StageFn,
    project: Project,
    stage: str,
    attempt: int,
    *,
    cancelled: bool = False,
) -> JsonObject | None:
    ctx = StageContext(
        project=project,
        stage=stage,
        attempt=attempt,
        idempotency_key=f"{project.project_id}:{stage}",
        log=_NullLog(),
    )
    if cancelled:
        ctx.cancel_event.set()
    result = fn(ctx)
    if inspect.isawaitable(result):
        return await result
    return result


def run_demo_stage(
    parameters: JsonObject, stage: str, attempt: int = 1, *, cancelled: bool = False
) -> JsonObject | None:
    project = demo_project(parameters)
    return asyncio.run(
        _run_stage(DEMO.stage(stage).fn, project, stage, attempt, cancelled=cancelled)
    )


def write_module(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(body), encoding="utf-8")


MODULE_HEADER = """
from buildq.workflows.base import Stage, Workflow


async def step(ctx):
    return {"ok": True}

"""


# -- registry ---------------------------------------------------------------------


def test_load_registry_has_demo_with_its_stages() -> None:
    registry = load_registry()
    assert registry.names() == ["demo"]
    demo = registry.get("demo")
    assert demo is DEMO
    assert demo.stage_names == ["plan", "generate", "build", "package"]
    assert demo.parameters is DemoParameters


def test_get_unknown_names_the_known_workflows() -> None:
    registry = WorkflowRegistry([DEMO, _workflow("alpha")])
    with pytest.raises(UnknownWorkflowError) as caught:
        registry.get("nope")
    assert str(caught.value) == "unknown workflow 'nope' (known: alpha, demo)"


def test_get_unknown_from_load_registry() -> None:
    with pytest.raises(UnknownWorkflowError, match=r"unknown workflow 'nope' \(known: demo\)"):
        load_registry().get("nope")


def test_get_unknown_from_an_empty_registry() -> None:
    with pytest.raises(UnknownWorkflowError, match=r"\(known: none\)"):
        WorkflowRegistry().get("demo")


def test_registering_twice_raises() -> None:
    registry = WorkflowRegistry([DEMO])
    with pytest.raises(ValueError, match="workflow 'demo' is registered twice"):
        registry.register(_workflow("demo"))
    assert registry.get("demo") is DEMO


def test_duplicate_names_in_the_constructor_raise() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        WorkflowRegistry([_workflow("a"), _workflow("a")])


def test_names_are_sorted() -> None:
    registry = WorkflowRegistry([_workflow("zeta"), _workflow("alpha"), DEMO])
    assert registry.names() == ["alpha", "demo", "zeta"]


def test_load_registry_imports_one_workflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(
        tmp_path,
        "buildq_unit_wf_single",
        MODULE_HEADER + 'WORKFLOW = Workflow(name="custom", stages=(Stage("only", step),))\n',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = load_registry(["buildq_unit_wf_single:WORKFLOW"])
    assert registry.names() == ["custom", "demo"]
    custom = registry.get("custom")
    assert isinstance(custom, Workflow)
    assert custom.stage_names == ["only"]


def test_load_registry_imports_a_list_of_workflows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(
        tmp_path,
        "buildq_unit_wf_list",
        MODULE_HEADER
        + """
WORKFLOWS = [
    Workflow(name="first", stages=(Stage("a", step),)),
    Workflow(name="second", stages=(Stage("b", step), Stage("c", step))),
]
""",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = load_registry(["buildq_unit_wf_list:WORKFLOWS"])
    assert registry.names() == ["demo", "first", "second"]
    assert registry.get("second").stage_names == ["b", "c"]


def test_load_registry_from_several_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(
        tmp_path,
        "buildq_unit_wf_many",
        MODULE_HEADER
        + """
ONE = Workflow(name="one", stages=(Stage("a", step),))
TWO = (Workflow(name="two", stages=(Stage("a", step),)),)
""",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = load_registry(["buildq_unit_wf_many:ONE", "buildq_unit_wf_many:TWO"])
    assert registry.names() == ["demo", "one", "two"]


def test_load_registry_refuses_a_second_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(
        tmp_path,
        "buildq_unit_wf_dup",
        MODULE_HEADER + 'DEMO = Workflow(name="demo", stages=(Stage("x", step),))\n',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="workflow 'demo' is registered twice"):
        load_registry(["buildq_unit_wf_dup:DEMO"])


@pytest.mark.parametrize("path", ["buildq.workflows.demo", "buildq.workflows.demo:", ""])
def test_load_registry_path_without_attribute_raises_value_error(path: str) -> None:
    with pytest.raises(ValueError, match=r"must look like 'package\.module:attribute'"):
        load_registry([path])


def test_load_registry_path_without_module_raises_value_error() -> None:
    with pytest.raises(ValueError, match="Empty module name"):  # importlib's own ValueError
        load_registry([":DEMO"])


def test_load_registry_attribute_not_a_workflow_raises_type_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(
        tmp_path,
        "buildq_unit_wf_bad",
        MODULE_HEADER
        + """
NOT_A_WORKFLOW = "demo"
MIXED = [Workflow(name="fine", stages=(Stage("a", step),)), 42]
NUMBER = 42
""",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="'buildq_unit_wf_bad:NOT_A_WORKFLOW' holds str, not a"):
        load_registry(["buildq_unit_wf_bad:NOT_A_WORKFLOW"])
    with pytest.raises(TypeError, match="'buildq_unit_wf_bad:MIXED' holds int, not a Workflow"):
        load_registry(["buildq_unit_wf_bad:MIXED"])
    with pytest.raises(TypeError):
        load_registry(["buildq_unit_wf_bad:NUMBER"])


def test_load_registry_missing_module_or_attribute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(tmp_path, "buildq_unit_wf_empty", MODULE_HEADER)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        load_registry(["buildq_unit_no_such_module:WORKFLOW"])
    with pytest.raises(AttributeError):
        load_registry(["buildq_unit_wf_empty:WORKFLOW"])


# -- Workflow ------------------------------------------------------------------------


def test_workflow_stage_lookup() -> None:
    assert DEMO.stage("build").name == "build"
    with pytest.raises(KeyError):
        DEMO.stage("deploy")


def test_workflow_without_parameter_model_passes_parameters_through() -> None:
    parameters: JsonObject = {"anything": [1, 2]}
    assert _workflow("free").validate_parameters(parameters) is parameters


# -- demo parameters -------------------------------------------------------------------


def test_demo_parameters_defaults_are_filled() -> None:
    assert DEMO.validate_parameters({}) == DEMO_DEFAULTS


def test_demo_parameters_keep_given_values() -> None:
    given: JsonObject = {
        "stage_seconds": 0.5,
        "fail_at_stage": "build",
        "fail_times": 2,
        "fail_mode": "permanent",
    }
    assert DEMO.validate_parameters(given) == given


def test_demo_parameters_coerce_an_int_duration() -> None:
    assert DEMO.validate_parameters({"stage_seconds": 2})["stage_seconds"] == 2.0


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"unexpected": 1}, "unexpected"),
        ({"stage_seconds": -1}, "stage_seconds"),
        ({"stage_seconds": -0.001}, "stage_seconds"),
        ({"stage_seconds": 24 * 3600 + 1}, "stage_seconds"),
        ({"fail_at_stage": "deploy"}, "fail_at_stage"),
        ({"fail_times": -1}, "fail_times"),
        ({"fail_mode": "sometimes"}, "fail_mode"),
    ],
)
def test_demo_parameters_are_validated(parameters: JsonObject, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        DEMO.validate_parameters(parameters)
    assert [error["loc"] for error in caught.value.errors()] == [(field,)]


def test_demo_extra_key_is_rejected_as_extra() -> None:
    with pytest.raises(ValidationError) as caught:
        DEMO.validate_parameters({"stage_seconds": 0, "colour": "red"})
    assert caught.value.errors()[0]["type"] == "extra_forbidden"


# -- demo stages -------------------------------------------------------------------------


@pytest.mark.parametrize("stage", DEMO_STAGES)
def test_demo_stage_returns_its_output(stage: str) -> None:
    assert run_demo_stage({"stage_seconds": 0}, stage, attempt=4) == {
        "stage": stage,
        "attempt": 4,
        "seconds": 0.0,
    }


def test_demo_stage_sleeps_for_stage_seconds() -> None:
    start = time.monotonic()
    output = run_demo_stage({"stage_seconds": 0.05}, "plan")
    assert time.monotonic() - start >= 0.04
    assert output == {"stage": "plan", "attempt": 1, "seconds": 0.05}


def test_demo_transient_failure_fails_twice_then_succeeds() -> None:
    parameters: JsonObject = {"stage_seconds": 0, "fail_at_stage": "build", "fail_times": 2}
    for attempt in (1, 2):
        with pytest.raises(
            RetryableError,
            match=f"injected transient failure in 'build' on attempt {attempt}",
        ) as caught:
            run_demo_stage(parameters, "build", attempt)
        assert caught.value.delay is None
    assert run_demo_stage(parameters, "build", 3) == {"stage": "build", "attempt": 3, "seconds": 0}


def test_demo_failure_only_hits_its_stage() -> None:
    parameters: JsonObject = {"stage_seconds": 0, "fail_at_stage": "build", "fail_times": 2}
    for stage in ("plan", "generate", "package"):
        assert run_demo_stage(parameters, stage, 1) == {"stage": stage, "attempt": 1, "seconds": 0}


def test_demo_failure_without_fail_times_fails_every_attempt() -> None:
    parameters: JsonObject = {"stage_seconds": 0, "fail_at_stage": "plan"}
    for attempt in (1, 2, 10):
        with pytest.raises(RetryableError):
            run_demo_stage(parameters, "plan", attempt)


def test_demo_fail_times_zero_never_fails() -> None:
    parameters: JsonObject = {"stage_seconds": 0, "fail_at_stage": "plan", "fail_times": 0}
    assert run_demo_stage(parameters, "plan", 1) == {"stage": "plan", "attempt": 1, "seconds": 0}


def test_demo_permanent_failure() -> None:
    parameters: JsonObject = {
        "stage_seconds": 0,
        "fail_at_stage": "package",
        "fail_mode": "permanent",
    }
    with pytest.raises(PermanentError, match="injected permanent failure in 'package'"):
        run_demo_stage(parameters, "package", 1)


def test_demo_stage_raises_when_cancelled() -> None:
    start = time.monotonic()
    with pytest.raises(CancelledByRequestError, match="project 01HZXDEMO was cancelled"):
        run_demo_stage({"stage_seconds": 30}, "plan", cancelled=True)
    assert time.monotonic() - start < 1.0


# -- StageContext ----------------------------------------------------------------------


def make_context(parameters: JsonObject | None = None) -> StageContext:
    return StageContext(
        project=demo_project(parameters or {}),
        stage="plan",
        attempt=1,
        idempotency_key="01HZXDEMO:plan",
        log=_NullLog(),
    )


def test_stage_context_exposes_the_project_parameters() -> None:
    ctx = make_context({"stage_seconds": 0})
    assert ctx.parameters == {**DEMO_DEFAULTS, "stage_seconds": 0.0}
    assert ctx.cancelled is False
    ctx.raise_if_cancelled()  # does not raise


def test_stage_context_raise_if_cancelled() -> None:
    ctx = make_context()
    ctx.cancel_event.set()
    assert ctx.cancelled is True
    with pytest.raises(CancelledByRequestError, match="project 01HZXDEMO was cancelled"):
        ctx.raise_if_cancelled()


def test_sleep_returns_after_its_duration_when_not_cancelled() -> None:
    async def scenario() -> float:
        ctx = make_context()
        start = time.monotonic()
        await ctx.sleep(0.02)
        return time.monotonic() - start

    assert asyncio.run(scenario()) >= 0.015


def test_sleep_raises_at_once_if_already_cancelled() -> None:
    async def scenario() -> None:
        ctx = make_context()
        ctx.cancel_event.set()
        await ctx.sleep(60)

    start = time.monotonic()
    with pytest.raises(CancelledByRequestError):
        asyncio.run(scenario())
    assert time.monotonic() - start < 1.0


def test_sleep_wakes_up_when_cancelled_during_the_sleep() -> None:
    async def scenario() -> None:
        ctx = make_context()
        asyncio.get_running_loop().call_later(0.02, ctx.cancel_event.set)
        await ctx.sleep(60)

    start = time.monotonic()
    with pytest.raises(CancelledByRequestError):
        asyncio.run(scenario())
    assert time.monotonic() - start < 1.0


def test_sleep_zero_still_raises_if_cancelled() -> None:
    async def scenario() -> None:
        ctx = make_context()
        ctx.cancel_event.set()
        await ctx.sleep(0)

    with pytest.raises(CancelledByRequestError):
        asyncio.run(scenario())


def test_demo_stage_with_zero_seconds_raises_when_cancelled() -> None:
    with pytest.raises(CancelledByRequestError):
        run_demo_stage({"stage_seconds": 0}, "plan", cancelled=True)
