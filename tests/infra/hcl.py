"""Read infra/terraform with python-hcl2: blocks as plain dicts, strings unquoted,
expressions as ``"${...}"`` strings."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import hcl2
from hcl2.utils import SerializationOptions

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "infra" / "terraform"
MODULES = TERRAFORM / "modules"

OPTIONS = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)


def tf_files() -> list[Path]:
    return sorted(TERRAFORM.rglob("*.tf"))


@cache
def parse(path: Path) -> dict[str, Any]:
    with path.open() as file:
        parsed: dict[str, Any] = hcl2.load(file, serialization_options=OPTIONS)
    return parsed


class Module:
    """One Terraform module (a directory): its blocks, merged over its files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files = [parse(path) for path in sorted(directory.glob("*.tf"))]

    def _blocks(self, kind: str) -> list[dict[str, Any]]:
        return [block for parsed in self.files for block in parsed.get(kind, [])]

    def _labelled(self, kind: str) -> dict[tuple[str, str], dict[str, Any]]:
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for block in self._blocks(kind):
            for type_, named in block.items():
                for name, body in named.items():
                    assert (type_, name) not in found, f"{kind} {type_}.{name} declared twice"
                    found[(type_, name)] = body
        return found

    def resource(self, type_: str, name: str) -> dict[str, Any]:
        return self._labelled("resource")[(type_, name)]

    def resources(self, type_: str) -> dict[str, dict[str, Any]]:
        return {
            name: body for (kind, name), body in self._labelled("resource").items() if kind == type_
        }

    def data(self, type_: str, name: str) -> dict[str, Any]:
        return self._labelled("data")[(type_, name)]

    def datas(self, type_: str) -> dict[str, dict[str, Any]]:
        return {
            name: body for (kind, name), body in self._labelled("data").items() if kind == type_
        }

    @property
    def locals(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for block in self._blocks("locals"):
            for key, value in block.items():
                assert key not in merged, f"local {key} declared twice"
                merged[key] = value
        return merged

    @property
    def variables(self) -> dict[str, dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for block in self._blocks("variable"):
            merged.update(block)
        return merged

    def module(self, name: str) -> dict[str, Any]:
        for block in self._blocks("module"):
            if name in block:
                body: dict[str, Any] = block[name]
                return body
        raise KeyError(name)

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for block in self._blocks("output"):
            merged.update(block)
        return merged


def root() -> Module:
    return Module(TERRAFORM)


def module(name: str) -> Module:
    return Module(MODULES / name)


def expr(value: object) -> str:
    """The expression inside ``"${...}"`` (or the literal, as a string)."""
    text = str(value)
    match = re.fullmatch(r"\$\{(.*)\}", text, flags=re.DOTALL)
    return match.group(1).strip() if match else text


def ref(value: object) -> str:
    """A plain reference such as ``var.max_attempts``: fails on anything else."""
    text = expr(value)
    assert re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_\[\]\"]*)+", text), text
    return text
