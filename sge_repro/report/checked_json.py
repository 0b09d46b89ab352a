"""Values read from a metrics file the report trusts only once checked: the file as UTF-8 text, a
JSON object, and typed fields (number, percentage, count, string, object). Every problem is a
UserError naming the file (relative to the results root) and the key."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sge_repro.errors import UserError, not_utf8

LONG_INTEGER = 10**30  # shown in messages by its number of digits


def display(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def shown(value: Any, limit: int = 60) -> str:
    """`value` for a one-line message: a huge JSON integer by its length, a long repr cut short."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= LONG_INTEGER:
        try:
            digits = len(str(abs(value)))
        except ValueError:  # beyond Python's int-to-str digit limit
            return "an integer of thousands of digits"
        return f"a {digits}-digit integer"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(path: Path, root: Path, kind: str) -> str:
    """`path` as UTF-8 text; UserError naming the file when it cannot be read, holds NUL bytes or is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(
            f"{display(path, root)}: cannot be read ({error.strerror or error}); expected {kind}"
        ) from error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise not_utf8(display(path, root), error, kind) from error
    nul = text.find("\0")
    if nul >= 0:
        raise UserError(f"{display(path, root)}: binary data (a NUL character at offset {nul}); expected {kind}")
    return text


def read_json_object(path: Path, root: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None when the file is absent or empty; UserError when malformed."""
    if not path.is_file():
        return None
    text = read_text(path, root, "a JSON file")
    if not text.strip():
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(
            f"{display(path, root)}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from error
    except (ValueError, RecursionError) as error:  # an integer beyond Python's digit limit; nesting too deep
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error).partition(";")[0]
        raise UserError(f"{display(path, root)}: not valid JSON ({reason})") from error
    if not isinstance(data, dict):
        raise UserError(f"{display(path, root)}: expected a JSON object, got {json_type(data)}")
    return data


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages: null, boolean, number, string, list, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def got(value: Any) -> str:
    """A parsed JSON value for "..., got <this>": its type and (short) value."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return f"{json_type(value)} {shown(value)}"


def number(value: Any, key: str, path: Path, root: Path, allow_none: bool = False) -> float | None:
    """A finite float (NaN -> None, as COCO gives for empty area ranges); UserError on a wrong type."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{display(path, root)}: key '{key}' should be a number, got {got(value)}")
    try:
        number = float(value)
    except OverflowError:  # a JSON integer beyond a float's range
        number = math.inf
    if math.isnan(number) and allow_none:
        return None
    if not math.isfinite(number):
        raise UserError(f"{display(path, root)}: key '{key}' should be a finite number, got {shown(value)}")
    return number


def percent(value: Any, key: str, path: Path, root: Path, allow_none: bool = False) -> float | None:
    parsed = number(value, key, path, root, allow_none)
    if parsed is not None and allow_none and parsed < 0:
        return None  # COCO's -1 (no objects in that size range), possibly scaled to -100
    if parsed is not None and not 0.0 <= parsed <= 100.0:
        raise UserError(f"{display(path, root)}: key '{key}' should be a percentage in [0, 100], got {parsed}")
    return parsed


def count(value: Any, key: str, path: Path, root: Path) -> int:
    """A non-negative whole number (10 or 10.0); UserError otherwise."""
    parsed = number(value, key, path, root)
    if parsed < 0 or not parsed.is_integer():
        raise UserError(f"{display(path, root)}: key '{key}' should be a non-negative integer, got {shown(value)}")
    return int(value)


def string(data: dict, key: str, path: Path, root: Path, required: bool = False) -> str | None:
    """data[key] when a string, None when absent or null (unless required); UserError on another type."""
    value = data.get(key)
    if (value is not None or required) and not isinstance(value, str):
        raise UserError(f"{display(path, root)}: key '{key}' should be a string, got {got(value)}")
    return value


def object_at(data: dict, key: str, path: Path, root: Path, what: str, parent: str = "") -> dict | None:
    """data[key] when a JSON object, None when absent or null; UserError on another type (the key
    named after `parent`, the key path of `data` in the file)."""
    value = data.get(key)
    if value is not None and not isinstance(value, dict):
        raise UserError(
            f"{display(path, root)}: key '{parent}{key}' should be an object of {what}, got {got(value)}"
        )
    return value
