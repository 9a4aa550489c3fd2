"""Output constraints as llama.cpp grammars: JSON mode, JSON schemas, forced tool calls."""

from __future__ import annotations

import json
from typing import Any

from appliance.protocol import Tool, Unsupported


def _gbnf(schema: dict[str, Any], param: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf
    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except (ValueError, KeyError, TypeError, NotImplementedError, RecursionError) as exc:
        raise Unsupported(param, f"this JSON schema cannot be enforced: {exc}") from None


def json_object() -> str:
    """Any JSON object. Whitespace is bounded, so a small model cannot loop on blank lines."""
    return _gbnf({"type": "object"}, "response_format")


def json_schema(schema: dict[str, Any]) -> str:
    return _gbnf(schema, "response_format")


def tool_call(tools: list[Tool], only: str | None = None) -> str:
    """A JSON object {"name": ..., "arguments": {...}} for one of `tools` (or just `only`)."""
    options = []
    for tool in tools:
        fn = tool.function
        if only is not None and fn.name != only:
            continue
        params = fn.parameters or {"type": "object"}
        options.append({
            "type": "object",
            "properties": {"name": {"const": fn.name}, "arguments": params},
            "required": ["name", "arguments"],
        })
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return _gbnf(schema, "tools")


def parse_tool_call(text: str, tools: list[Tool]) -> tuple[str, str] | None:
    """(name, arguments JSON) if `text` is a call of one of `tools`, else None."""
    body = text.strip()
    for tag in ("<tool_call>", "</tool_call>"):
        body = body.replace(tag, "")
    try:
        call = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    if call["name"] not in {t.function.name for t in tools}:
        return None
    args = call.get("arguments", call.get("parameters", {}))
    if not isinstance(args, dict):
        return None
    return call["name"], json.dumps(args, ensure_ascii=False)
