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

from appliance.errors import FormatError

E = TypeVar("E", bound=StrEnum)
MAX_STRING = 4096


def load_toml(data: bytes, origin: str, max_bytes: int) -> Fields:
    if len(data) > max_bytes:
        raise FormatError(f"{origin} is larger than {max_bytes} bytes")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FormatError(f"{origin} is not UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise FormatError(f"{origin} is not valid TOML: {exc}") from exc
    return Fields(doc, origin)


class Fields:
    """A TOML table being read; call `done()` after the last field to reject unknown keys."""

    def __init__(self, table: dict[str, Any], origin: str, prefix: str = "") -> None:
        self._table = table
        self._origin = origin
        self._prefix = prefix
        self._seen: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self._origin}: {self._prefix}{key}"

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
        return Fields(value, self._origin, f"{self._prefix}{key}.")

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

    def done(self) -> None:
        unknown = sorted(set(self._table) - self._seen)
        if unknown:
            raise self.fail(unknown[0][:60], "is not a known key")
