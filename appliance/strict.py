"""Strict reading of declarative TOML (manifests, recipes, image targets).

Each table is read through a `Fields` view that checks types and ranges, names the file and the
dotted key in every error, and rejects keys nobody asked for (a typo must not pass silently).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from appliance.errors import ApplianceError, FormatError

E = TypeVar("E", bound=StrEnum)
MAX_STRING = 4096
# Deepest nesting of arrays, inline tables and (dotted) tables any of our files needs is about
# five; tomllib recurses per level, so bound it before parsing (a RecursionError is no error
# message) and again on the result (dotted keys nest without brackets).
MAX_DEPTH = 32


def parse_toml(text: str, origin: str, error: type[ApplianceError] = FormatError,
               max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """tomllib.loads with the nesting depth bounded; every failure is one `error` line."""
    if toml_depth(text) > max_depth:
        raise error(f"{origin} nests arrays or tables deeper than {max_depth} levels")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{origin} is not valid TOML: {exc}") from exc
    except RecursionError:  # the scan above should make this unreachable; keep one line anyway
        raise error(f"{origin} nests arrays or tables too deeply") from None
    if value_depth(doc) > max_depth:
        raise error(f"{origin} nests tables deeper than {max_depth} levels")
    return doc


def toml_depth(text: str) -> int:
    """The deepest bracket nesting of TOML text, strings and comments skipped. Linear, no
    recursion. Brackets of table headers count too, which only makes the bound stricter."""
    depth = deepest = i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(depth - 1, 0)
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c in "\"'":
            i = _skip_string(text, i)
            continue
        i += 1
    return deepest


def _skip_string(text: str, i: int) -> int:
    """Index just past the TOML string starting at text[i] (or the end of text)."""
    quote = text[i]
    if text.startswith(quote * 3, i):
        end = text.find(quote * 3, i + 3)
        while quote == '"' and end > 0 and _escaped(text, end):
            end = text.find(quote * 3, end + 1)
        if end < 0:
            return len(text)
        extra = 0  # up to two quotes of the content may touch the closing delimiter
        while extra < 2 and text.startswith(quote, end + 3 + extra):
            extra += 1
        return end + 3 + extra
    j = i + 1
    while j < len(text) and text[j] != "\n":
        if text[j] == quote and (quote == "'" or not _escaped(text, j)):
            return j + 1
        j += 1
    return j


def _escaped(text: str, j: int) -> bool:
    """Whether text[j] is preceded by an odd number of backslashes."""
    k = j
    while k > 0 and text[k - 1] == "\\":
        k -= 1
    return (j - k) % 2 == 1


def value_depth(value: Any) -> int:
    """Nesting depth of parsed data (dicts and lists), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return deepest


def load_toml(data: bytes, origin: str, max_bytes: int) -> Fields:
    if len(data) > max_bytes:
        raise FormatError(f"{origin} is larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{origin} is not UTF-8") from exc
    return Fields(parse_toml(text, origin), origin)


class Fields:
    """A TOML table being read; call `done()` after the last field to reject unknown keys."""

    def __init__(self, table: dict[str, Any], origin: str, prefix: str = "",
                 labels: dict[str, str] | None = None) -> None:
        self._table = table
        self._origin = origin
        self._prefix = prefix
        self._seen: set[str] = set()
        self._labels = labels or {}  # dotted key -> where its value came from, if elsewhere

    def where(self, key: str) -> str:
        full = f"{self._prefix}{key}"
        if full in self._labels:
            return f"{self._labels[full]} ({full})"
        return f"{self._origin}: {full}"

    def fail(self, key: str, problem: str) -> FormatError:
        return FormatError(f"{self.where(key)} {problem}")

    def _get(self, key: str, required: bool) -> Any:
        self._seen.add(key)
        if key not in self._table:
            if required:
                raise self.fail(key, "is missing")
            return None
        return self._table[key]

    def has(self, key: str) -> bool:
        return key in self._table

    def keys(self) -> list[str]:
        return list(self._table)

    def string(
        self,
        key: str,
        *,
        required: bool = True,
        pattern: re.Pattern[str] | None = None,
        max_len: int = MAX_STRING,
        default: str | None = None,
    ) -> str | None:
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {type(value).__name__}")
        if len(value) > max_len:
            raise self.fail(key, f"is longer than {max_len} characters")
        if "\x00" in value:
            raise self.fail(key, "contains a NUL character")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(key, f"{value[:80]!r} does not match {pattern.pattern}")
        return value

    def req_string(self, key: str, **kw: Any) -> str:
        value = self.string(key, required=True, **kw)
        assert value is not None
        return value

    def integer(
        self, key: str, *, required: bool = True, lo: int = 0, hi: int = 2**63 - 1,
        default: int | None = None,
    ) -> int | None:
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, f"must be an integer, not {type(value).__name__}")
        if not lo <= value <= hi:
            raise self.fail(key, f"must be between {lo} and {hi}")
        return value

    def req_integer(self, key: str, **kw: Any) -> int:
        value = self.integer(key, required=True, **kw)
        assert value is not None
        return value

    def number(self, key: str, *, lo: float, hi: float, default: float) -> float:
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.fail(key, f"must be a number, not {type(value).__name__}")
        if not lo <= value <= hi:
            raise self.fail(key, f"must be between {lo} and {hi}")
        return float(value)

    def numbers(self, key: str, *, max_items: int) -> list[float]:
        value = self._get(key, True)
        if not isinstance(value, list) or len(value) > max_items or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise self.fail(key, f"must be a list of at most {max_items} numbers")
        return [float(v) for v in value]

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value

    def timestamp(self, key: str, *, required: bool = True) -> datetime | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise self.fail(key, "must be a TOML date-time with a time zone")
        return value

    def choice(self, key: str, enum: type[E], *, default: E | None = None) -> E:
        raw = self.string(key, required=default is None)
        if raw is None:
            assert default is not None
            return default
        try:
            return enum(raw)
        except ValueError:
            allowed = ", ".join(e.value for e in enum)
            raise self.fail(key, f"is {raw[:40]!r}; expected one of: {allowed}") from None

    def strings(self, key: str, *, required: bool = True, max_items: int = 4096,
                pattern: re.Pattern[str] | None = None) -> list[str]:
        value = self._get(key, required)
        if value is None:
            return []
        if not isinstance(value, list) or len(value) > max_items:
            raise self.fail(key, f"must be a list of at most {max_items} strings")
        for i, item in enumerate(value):
            if not isinstance(item, str) or len(item) > MAX_STRING:
                raise self.fail(f"{key}[{i}]", "must be a string")
            if pattern is not None and not pattern.fullmatch(item):
                raise self.fail(f"{key}[{i}]", f"{item[:80]!r} does not match {pattern.pattern}")
        return list(value)

    def table(self, key: str, *, required: bool = True) -> Fields | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table")
        return Fields(value, self._origin, f"{self._prefix}{key}.", self._labels)

    def tables(self, key: str, *, required: bool = True, max_items: int = 4096) -> Iterator[Fields]:
        value = self._get(key, required)
        if value is None:
            return iter(())
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(key, "must be an array of tables ([[...]])")
        if len(value) > max_items:
            raise self.fail(key, f"has more than {max_items} entries")
        return (
            Fields(v, self._origin, f"{self._prefix}{key}[{i}].") for i, v in enumerate(value)
        )

    def raw(self) -> dict[str, Any]:
        """The whole table as it is, every key taken (its reader validates it elsewhere)."""
        self._seen.update(self._table)
        return dict(self._table)

    def done(self) -> None:
        unknown = sorted(set(self._table) - self._seen)
        if unknown:
            raise self.fail(unknown[0][:60], "is not a known key")
