"""Workflows by name. The built-in ``demo`` is always there; a deployment adds its
own with ``BUILDQ_WORKFLOWS=package.module:attribute`` (a Workflow or a list)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from buildq.errors import UnknownWorkflowError
from buildq.workflows.base import Workflow


class WorkflowRegistry:
    def __init__(self, workflows: Iterable[Workflow] = ()) -> None:
        self._workflows: dict[str, Workflow] = {}
        for workflow in workflows:
            self.register(workflow)

    def register(self, workflow: Workflow) -> None:
        if workflow.name in self._workflows:
            raise ValueError(f"workflow {workflow.name!r} is registered twice")
        self._workflows[workflow.name] = workflow

    def get(self, name: str) -> Workflow:
        try:
            return self._workflows[name]
        except KeyError:
            known = ", ".join(sorted(self._workflows)) or "none"
            raise UnknownWorkflowError(f"unknown workflow {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._workflows)


def _import(path: str) -> list[Workflow]:
    module_name, _, attribute = path.partition(":")
    if not attribute:
        raise ValueError(f"workflow path {path!r} must look like 'package.module:attribute'")
    found = getattr(importlib.import_module(module_name), attribute)
    if isinstance(found, Workflow):
        workflows = [found]
    elif isinstance(found, list | tuple):
        workflows = list(found)
    else:
        raise TypeError(f"{path!r} holds {type(found).__name__}, not a Workflow or a list")
    for workflow in workflows:
        if not isinstance(workflow, Workflow):
            raise TypeError(f"{path!r} holds {type(workflow).__name__}, not a Workflow")
    return workflows


def load_registry(paths: Iterable[str] = ()) -> WorkflowRegistry:
    from buildq.workflows.demo import DEMO

    registry = WorkflowRegistry([DEMO])
    for path in paths:
        for workflow in _import(path):
            registry.register(workflow)
    return registry
