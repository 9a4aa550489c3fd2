"""Text that JSON can carry but UTF-8 cannot: lone UTF-16 surrogates.

`"\\ud800"` is valid JSON and becomes a Python str that no tokenizer, template or file can encode,
so it would fail deep inside an engine. The raw body is scanned for surrogate escapes first (a
regex over bytes: nothing is decoded for the common case); only a body that has some is parsed,
to name the first field whose text holds an unpaired one.
"""

from __future__ import annotations

import json
import re
from typing import Any

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE = re.compile("[\ud800-\udfff]")


def lone_surrogate(body: bytes | bytearray) -> str | None:
    """The dotted path (as in validation errors: `messages.0.content`) of the first string or
    key holding a lone surrogate, or None. Bodies that are not JSON are left to the parser."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _LONE.search(value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                where = f"{path}.{key}" if path else str(key)
                if _LONE.search(key):
                    return where.encode("utf-8", "backslashreplace").decode()
                stack.append((item, where))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}" if path else str(i))
                         for i, item in reversed(list(enumerate(value))))
    return None
