"""The AWS limits buildq runs into, buildq's own bounds derived from them, and the
checks every DynamoDB write goes through before it is sent.

The emulators enforce these limits loosely or not at all (moto checks an item's size
only when a top-level attribute is set, so a nested ``stages.<name>`` write of any
size lands, and it applies an UpdateExpression's SET actions one by one, so a write
it refuses half-lands; it never checks an expression's length). So the code checks
them itself, against AWS's numbers, and a project item always fits by construction.

How DynamoDB counts an item's size (its docs, "Item sizes and formats"), and how
``item_size`` counts it, erring on the generous side where the docs are vague:

- An item is the sum of its attributes; an attribute is the UTF-8 bytes of its name
  plus the size of its value. Key attributes count like any other.
- String (S): its UTF-8 bytes. Binary (B): its raw bytes (not the base64 on the wire).
- Number (N): about 1 byte per two significant digits, plus 1 (leading and trailing
  zeros trimmed): counted as ``1 + ceil(digits / 2)``, plus 1 more if negative (the
  docs say nothing of the sign: generous). ``0`` is 1 byte.
- Boolean (BOOL) and null (NULL): 1 byte.
- List (L) and map (M): 3 bytes of overhead whatever their contents, plus 1 byte per
  element, plus the elements (a map element: its key's UTF-8 bytes and its value).
- Sets (SS, NS, BS): counted like a list of their elements (3 + 1 per element: the
  docs give no overhead for sets; generous).

Why a project item always fits in 400 KB (409,600 bytes), though ``_update`` never
sees the item it changes: an item is what its create wrote plus what updates wrote
since, and an update *replaces* the values at the paths it names (the one
increment, ``releases``, is a number). So::

    item <= create item + (the largest value ever written at each path a write names)

- The create item is checked whole: at most ``MAX_CREATE_ITEM_BYTES``, at most
  ``MAX_STAGES`` stages, each name at most ``MAX_STAGE_NAME_BYTES`` (the API's own
  bounds keep a request far inside it: parameters at most ``MAX_PARAMETERS_BYTES``,
  a name of 200 characters; the largest such item is about 22 KB).
- Updates write at most three kinds of paths. ``stages.<name>``: the names are the
  project's own ``stage_order``, fixed at create (the runner runs only those, and a
  claim's stage write is conditional on the stage existing), so at most
  ``MAX_STAGES`` of them; each value is one stage map, which ``_update`` refuses above
  ``MAX_STAGE_VALUE_BYTES`` (output at most ``MAX_STAGE_OUTPUT_BYTES``, error bounded
  by ``ErrorInfo``'s validators). ``last_error``: an ``ErrorInfo``, at most
  ``MAX_ERROR_VALUE_BYTES`` by its validators. The run's scalars (status, lease,
  attempt, timestamps, ids; fifteen or so): at most ``RUN_ATTRIBUTES_BYTES`` together
  (the worker id at most ``MAX_WORKER_ID_BYTES``).
- Their sum is ``MAX_UPDATE_BYTES``, which is also the most one update may carry, so
  ``WORST_CASE_ITEM_BYTES = MAX_CREATE_ITEM_BYTES + MAX_UPDATE_BYTES``; it counts
  every overwritten value twice, and is still ``ITEM_MARGIN_BYTES`` (64 KiB) or more
  below the limit (asserted below, and by a test that builds that item).

With 24 stages of 12 KiB at most, that is 334,016 bytes: 81.5 % of the limit. Runs
stay far smaller in practice: the runner also keeps all stage outputs of a project
within ``MAX_TOTAL_OUTPUT_BYTES`` together (``outputs_within_budget``).

One write's expressions stay within 4 KB by construction too: the largest (a final
write carrying every stage) is about 30 bytes of UpdateExpression per stage, and
``check_update`` refuses any that is not.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from buildq.errors import WriteTooLargeError

if TYPE_CHECKING:
    from buildq.models import StageSnapshot

KiB = 1024

# -- AWS's own limits -------------------------------------------------------------

DYNAMODB_ITEM_MAX_BYTES = 400 * KiB  # 409,600, counted as item_size counts
DYNAMODB_EXPRESSION_MAX_BYTES = 4 * KiB  # each of Update-, Condition-, Projection-, Filter-
DYNAMODB_PLACEHOLDER_MAX_BYTES = 255  # one "#name" or ":value" placeholder
DYNAMODB_UPDATE_MAX_OPERATORS = 300  # operators and functions in one UpdateExpression
DYNAMODB_PARTITION_KEY_MAX_BYTES = 2048
DYNAMODB_SORT_KEY_MAX_BYTES = 1024
DYNAMODB_NESTING_MAX_DEPTH = 32
DYNAMODB_TRANSACTION_MAX_ITEMS = 100
DYNAMODB_TRANSACTION_MAX_BYTES = 4 * 1000 * 1000  # 4 MB, all items of a transaction
SQS_MESSAGE_MAX_BYTES = 256 * KiB  # body and message attributes together
SQS_BATCH_MAX = 10  # ReceiveMessage and every *Batch call
SQS_VISIBILITY_MAX_SECONDS = 12 * 3600
SQS_DELAY_MAX_SECONDS = 900
SQS_WAIT_MAX_SECONDS = 20  # long poll

# -- buildq's bounds, chosen so that a project item always fits -------------------

MAX_STAGES = 24  # stages of one workflow (checked when the Workflow is built)
MAX_STAGE_NAME_BYTES = 64
MAX_STAGE_OUTPUT_BYTES = 8 * KiB  # one stage's output, as compact JSON
MAX_TOTAL_OUTPUT_BYTES = 128 * KiB  # all stage outputs of a project together
MAX_ERROR_MESSAGE_BYTES = 2 * KiB  # ErrorInfo.message, the truncation marker included
MAX_ERROR_TYPE_BYTES = 128  # ErrorInfo.type
MAX_PARAMETERS_BYTES = 16 * KiB  # a project's parameters, as compact JSON (the API's bound)
MAX_WORKER_ID_BYTES = 256

# What a write may carry (see the module docstring for why these add up).
MAX_CREATE_ITEM_BYTES = 32 * KiB  # a new project item, whole
# A stage map: output 8 KiB + error 2 KiB + 128 + worker id 256 + keys, timestamps and
# overheads of about 160 bytes = 10,788 at most; rounded up.
MAX_STAGE_VALUE_BYTES = 12 * KiB
# An ErrorInfo map: 3 + ("type" 4 + 128 + 1) + ("message" 7 + 2,048 + 1) = 2,192.
MAX_ERROR_VALUE_BYTES = 2560
RUN_ATTRIBUTES_BYTES = 2 * KiB  # a run's scalars (about 870 bytes with two worker ids)
# One stage entry of an update: "stages" (6) and the stage's name, and its map.
_STAGE_ENTRY_BYTES = 6 + MAX_STAGE_NAME_BYTES + 1 + MAX_STAGE_VALUE_BYTES + 1
MAX_UPDATE_BYTES = MAX_STAGES * _STAGE_ENTRY_BYTES + MAX_ERROR_VALUE_BYTES + RUN_ATTRIBUTES_BYTES
WORST_CASE_ITEM_BYTES = MAX_CREATE_ITEM_BYTES + MAX_UPDATE_BYTES
ITEM_MARGIN_BYTES = 64 * KiB

assert WORST_CASE_ITEM_BYTES + ITEM_MARGIN_BYTES <= DYNAMODB_ITEM_MAX_BYTES, (
    f"buildq's bounds allow a {WORST_CASE_ITEM_BYTES}-byte project item"
)
assert MAX_STAGE_OUTPUT_BYTES * MAX_STAGES <= MAX_UPDATE_BYTES

# -- sizes --------------------------------------------------------------------------


def utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def item_size(item: Mapping[str, Any]) -> int:
    """The size DynamoDB counts for ``item`` (attribute name -> typed value, as in
    ``buildq.items``), by the rules in this module's docstring."""
    return sum(utf8_bytes(name) + attribute_size(value) for name, value in item.items())


def attribute_size(value: Mapping[str, Any]) -> int:
    """The size of one typed value (``{"S": "x"}``, ``{"M": {...}}``, ...), without
    its attribute name."""
    if len(value) != 1:
        raise ValueError(f"not a DynamoDB attribute value: {value!r}")
    ((kind, data),) = value.items()
    if kind == "S":
        return utf8_bytes(data)
    if kind == "N":
        return number_size(data)
    if kind == "B":
        return _binary_size(data)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "M":
        return 3 + sum(utf8_bytes(key) + attribute_size(nested) + 1 for key, nested in data.items())
    if kind == "L":
        return 3 + sum(attribute_size(nested) + 1 for nested in data)
    if kind == "SS":
        return 3 + sum(utf8_bytes(element) + 1 for element in data)
    if kind == "NS":
        return 3 + sum(number_size(element) + 1 for element in data)
    if kind == "BS":
        return 3 + sum(_binary_size(element) + 1 for element in data)
    raise ValueError(f"unknown DynamoDB attribute type {kind!r}")


def number_size(number: str) -> int:
    """1 byte, plus 1 per two significant digits, plus 1 if negative."""
    text = str(number).strip()
    negative = text.startswith("-")
    mantissa = text.lstrip("+-").lower().partition("e")[0]
    digits = mantissa.replace(".", "").strip("0")
    return 1 + math.ceil(len(digits) / 2) + (1 if negative else 0)


def _binary_size(data: bytes | bytearray | memoryview | str) -> int:
    if isinstance(data, str):
        return utf8_bytes(data)  # botocore sends a str blob as its UTF-8 bytes
    return len(data)


def update_size(names: Mapping[str, str], values: Mapping[str, Any]) -> int:
    """What one UpdateItem can add to an item at most: every value it carries and
    every attribute name it spells (each occurrence counted)."""
    return sum(utf8_bytes(name) for name in names.values()) + sum(
        attribute_size(value) for value in values.values()
    )


# -- checks -------------------------------------------------------------------------


def check_expression(label: str, expression: str | None, *, what: str) -> None:
    """Refuse an expression longer than DynamoDB takes (4 KB)."""
    if expression is None:
        return
    size = utf8_bytes(expression)
    if size > DYNAMODB_EXPRESSION_MAX_BYTES:
        raise WriteTooLargeError(
            f"{what}: {label} is {size:,} bytes; DynamoDB takes at most "
            f"{DYNAMODB_EXPRESSION_MAX_BYTES:,}",
            size=size,
            limit=DYNAMODB_EXPRESSION_MAX_BYTES,
        )


def check_update(
    update_expression: str,
    condition_expression: str | None,
    names: Mapping[str, str],
    values: Mapping[str, Any],
    *,
    what: str,
) -> None:
    """Raise ``WriteTooLargeError`` for an UpdateItem that AWS would refuse, or that
    could take a project item past its budget: an expression over 4 KB, a placeholder
    over 255 bytes, one value over ``MAX_STAGE_VALUE_BYTES`` (the largest thing
    buildq writes at one path: a stage map) or, all together, over
    ``MAX_UPDATE_BYTES``."""
    check_expression("UpdateExpression", update_expression, what=what)
    check_expression("ConditionExpression", condition_expression, what=what)
    for placeholder in (*names, *values):
        if utf8_bytes(placeholder) > DYNAMODB_PLACEHOLDER_MAX_BYTES:
            raise WriteTooLargeError(
                f"{what}: placeholder {placeholder[:40]!r}... is over "
                f"{DYNAMODB_PLACEHOLDER_MAX_BYTES} bytes",
                size=utf8_bytes(placeholder),
                limit=DYNAMODB_PLACEHOLDER_MAX_BYTES,
            )
    total = sum(utf8_bytes(name) for name in names.values())
    for placeholder, value in values.items():
        size = attribute_size(value)
        if size > MAX_STAGE_VALUE_BYTES:
            raise WriteTooLargeError(
                f"{what}: value {placeholder} ({_spelled(names, update_expression, placeholder)})"
                f" is {size:,} bytes; one value may be at most {MAX_STAGE_VALUE_BYTES:,}",
                size=size,
                limit=MAX_STAGE_VALUE_BYTES,
            )
        total += size
    if total > MAX_UPDATE_BYTES:
        raise WriteTooLargeError(
            f"{what}: the write carries {total:,} bytes; at most {MAX_UPDATE_BYTES:,}",
            size=total,
            limit=MAX_UPDATE_BYTES,
        )


def _spelled(names: Mapping[str, str], expression: str, placeholder: str) -> str:
    """The path a value placeholder is assigned to, with names filled in (for errors)."""
    found = re.search(rf"([#\w.]+) = {re.escape(placeholder)}(?!\w)", expression)
    if found is None:
        return "in an expression"
    return ".".join(names.get(part, part) for part in found.group(1).split("."))


def check_item(item: Mapping[str, Any], *, limit: int, what: str) -> int:
    """Raise ``WriteTooLargeError`` if ``item`` is over ``limit`` bytes (at most the
    400 KB of DynamoDB); returns its size."""
    size = item_size(item)
    limit = min(limit, DYNAMODB_ITEM_MAX_BYTES)
    if size > limit:
        raise WriteTooLargeError(
            f"{what}: the item is {size:,} bytes; at most {limit:,}", size=size, limit=limit
        )
    return size


def check_new_project(item: Mapping[str, Any], stage_names: Sequence[str], *, what: str) -> None:
    """Raise ``WriteTooLargeError`` for a new project item that breaks the bounds the
    worst case rests on: over ``MAX_CREATE_ITEM_BYTES``, or with stages a workflow
    could not have (``stage_names_problem``)."""
    problem = stage_names_problem(stage_names)
    if problem is not None:
        raise WriteTooLargeError(f"{what}: {problem}")
    check_item(item, limit=MAX_CREATE_ITEM_BYTES, what=what)


def stage_names_problem(names: Sequence[str]) -> str | None:
    """What is wrong with a workflow's (or a project's) stage names for buildq's bounds:
    too many, empty, too long or repeated; None if nothing."""
    if len(names) > MAX_STAGES:
        return f"{len(names)} stages; at most {MAX_STAGES}"
    seen: set[str] = set()
    for name in names:
        if not name:
            return "a stage name is empty"
        if utf8_bytes(name) > MAX_STAGE_NAME_BYTES:
            return f"stage name {name[:20]!r}... is over {MAX_STAGE_NAME_BYTES} bytes"
        if name in seen:
            return f"stage {name!r} appears twice"
        seen.add(name)
    return None


# What DynamoDB says when a write is over its size limits (a ValidationException).
_TOO_LARGE_MESSAGES = (
    "item size has exceeded the maximum allowed size",  # PutItem, and the item of a write
    "item size to update has exceeded the maximum allowed size",  # UpdateItem
    "expression size has exceeded the maximum allowed size",  # any expression over 4 KB
)


def too_large_error(operation: str, code: str, message: str) -> WriteTooLargeError | None:
    """The ``WriteTooLargeError`` an AWS error means, if it is DynamoDB refusing a write
    as too large; None for every other error (other ValidationExceptions included)."""
    if code != "ValidationException":
        return None
    lowered = message.lower()
    if not any(phrase in lowered for phrase in _TOO_LARGE_MESSAGES):
        return None
    return WriteTooLargeError(f"{operation}: {truncated(message, 512)}")


# -- error text ---------------------------------------------------------------------


def truncated(text: str, max_bytes: int = MAX_ERROR_MESSAGE_BYTES) -> str:
    """``text`` if it fits in ``max_bytes`` of UTF-8, else its head and tail around a
    marker saying how much was cut (``… [truncated 598,123 bytes] …``), all within
    ``max_bytes``. The head (two thirds) says what failed; the tail keeps the last
    lines of a long stderr or traceback, where the cause often is. Cuts fall on
    character boundaries; a truncated text is returned unchanged."""
    if len(text) * 4 <= max_bytes:  # fast path: fits whatever the characters
        return text
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return text
    # The marker's size with the whole length in it: the cut is never longer.
    reserve = len(_marker(len(data)).encode())
    room = max(0, max_bytes - reserve)
    if room == 0:
        return _utf8_head(data, max_bytes)
    tail_room = room // 3
    head = _utf8_head(data, room - tail_room)
    tail = _utf8_tail(data, tail_room)
    kept = utf8_bytes(head) + utf8_bytes(tail)
    return f"{head}{_marker(len(data) - kept)}{tail}"


def _marker(cut: int) -> str:
    return f" … [truncated {cut:,} bytes] … "


def _utf8_head(data: bytes, size: int) -> str:
    return data[:size].decode("utf-8", "ignore")


def _utf8_tail(data: bytes, size: int) -> str:
    return data[len(data) - size :].decode("utf-8", "ignore") if size else ""


# -- stage outputs ------------------------------------------------------------------


def output_bytes(output: Mapping[str, Any] | None) -> int:
    """A stage output's size as stored: compact JSON (ASCII: one byte a character)."""
    return 0 if output is None else len(json.dumps(output, separators=(",", ":")))


def total_output_bytes(stages: Iterable[StageSnapshot]) -> int:
    return sum(output_bytes(stage.output) for stage in stages)


def outputs_within_budget(stages: Iterable[StageSnapshot]) -> bool:
    """Whether the outputs of a project's stages (one snapshot per stage: the latest)
    stay within ``MAX_TOTAL_OUTPUT_BYTES`` together."""
    return total_output_bytes(stages) <= MAX_TOTAL_OUTPUT_BYTES


def without_outputs(stages: Iterable[StageSnapshot]) -> list[StageSnapshot]:
    """The snapshots with their outputs dropped: what a run's last-resort final write
    carries when the full one was refused as too large (``WriteTooLargeError``)."""
    return [stage.model_copy(update={"output": None}) for stage in stages]
