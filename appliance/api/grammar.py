"""Output constraints as llama.cpp grammars: JSON mode, JSON schemas, forced tool calls.

A client's schema is untrusted input with a cost far beyond its size: llama.cpp's converter
writes every repetition bound out in full (`maxLength: 20000000` becomes twenty million rule
references, nested twenty million parentheses deep), and llama.cpp then parses that recursively.
So a schema is walked first, without recursion, and refused with a 400 naming the field when it
is deeper, larger or more repetitive than the limits below; the grammar text that comes out is
bounded again; and the conversion runs off the event loop (see `build`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from appliance.api.protocol import Tool
from appliance.errors import Unsupported

MAX_SCHEMA_DEPTH = 32  # nested objects, arrays and combinators
MAX_SCHEMA_NODES = 4096  # objects and arrays in one schema
MAX_REPEAT = 512  # any length, item or property bound; nested regex quantifiers multiplied
# (llama.cpp itself refuses a grammar nested about a thousand deep, which is what a bound becomes)
MAX_PATTERN = 1024  # characters of one `pattern`
MAX_GROUPS = 32  # nested groups in one pattern
MAX_GRAMMAR_CHARS = 512 * 1024  # the converted grammar
_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
           "minContains", "maxContains")
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def check_schema(schema: Any, param: str) -> None:
    """Refuse a schema whose grammar would be too large to build or to run; `param` is where
    the schema sits in the request, and the error names the field inside it."""
    nodes = 0
    stack: list[tuple[Any, str, int]] = [(schema, param, 0)]
    while stack:
        node, where, depth = stack.pop()
        if not isinstance(node, dict | list):
            continue
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise Unsupported(param, f"{param} has more than {MAX_SCHEMA_NODES} objects and "
                                     "arrays; simplify it")
        if depth > MAX_SCHEMA_DEPTH:
            raise Unsupported(where, f"{where} nests deeper than {MAX_SCHEMA_DEPTH} levels")
        items = enumerate(node) if isinstance(node, list) else node.items()
        if isinstance(node, dict):
            _check_bounds(node, where)
        for key, value in items:
            stack.append((value, f"{where}.{key}", depth + 1))
    # A schema the converter does not understand can fail anywhere inside it; the meta-schema
    # names the field instead. Bounded above, so its recursion is too.
    from jsonschema import Draft202012Validator, SchemaError
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = ".".join([param, *(str(p) for p in exc.absolute_path)])
        raise Unsupported(where, f"{where} is not a valid JSON schema: "
                                 f"{' '.join(exc.message.split())[:200]}") from None
    except Exception as exc:  # its regex checks raise too (OverflowError, RecursionError)
        raise Unsupported(param, f"{param} is not a JSON schema this server can check: "
                                 f"{type(exc).__name__}") from None


def _check_bounds(node: dict[str, Any], where: str) -> None:
    for key in _BOUNDS:
        value = node.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise Unsupported(f"{where}.{key}", f"{where}.{key} must be a non-negative integer")
        if value > MAX_REPEAT:
            raise Unsupported(f"{where}.{key}", f"{where}.{key} is {value}; a grammar can "
                                                f"enforce at most {MAX_REPEAT}")
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
        raise Unsupported(f"{where}.$ref", f"{where}.$ref must point inside the schema (#/...)")
    patterns = [(f"{where}.pattern", node.get("pattern"))]
    if isinstance(node.get("patternProperties"), dict):  # its keys are regexes too
        patterns += [(f"{where}.patternProperties", key) for key in node["patternProperties"]]
    for at, pattern in patterns:
        if pattern is None:
            continue
        if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN:
            raise Unsupported(at, f"{at} must be a string of at most {MAX_PATTERN} characters")
        if (reps := pattern_repeats(pattern)) > MAX_REPEAT:
            raise Unsupported(at, f"{at} repeats up to {reps} times (or nests groups deeper "
                                  f"than {MAX_GROUPS}); a grammar can enforce at most "
                                  f"{MAX_REPEAT}")


def pattern_repeats(pattern: str) -> int:
    """The largest product of nested `{n,m}` bounds in a regex: the converter writes each one
    out in full, so nested ones multiply. One pass over the pattern with a stack of groups;
    escapes and character classes are skipped."""
    inner = [1]  # per open group: the largest product found inside it so far
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            i = _class_end(pattern, i)
            continue
        if c == "(":
            if len(inner) > MAX_GROUPS:
                return MAX_REPEAT + 1  # deeper than any schema needs
            inner.append(1)
            i += 1
            continue
        value = 1
        if c == ")" and len(inner) > 1:
            value = inner.pop()
            i += 1
        elif c != "{":
            i += 1
        if (m := _QUANTIFIER.match(pattern, i)) is not None:
            value *= _upper(m)
            i = m.end()
        inner[-1] = max(inner[-1], value)
    return max(inner)


def _class_end(pattern: str, i: int) -> int:
    """Index just past the character class that opens at pattern[i] (escapes skipped)."""
    j = i + 1
    if j < len(pattern) and pattern[j] == "^":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1  # a leading ] is a literal
    while j < len(pattern):
        if pattern[j] == "\\":
            j += 2
            continue
        if pattern[j] == "]":
            return j + 1
        j += 1
    return len(pattern)


def _upper(m: re.Match[str]) -> int:
    low, high = m.group(1), m.group(2)
    if high is None:  # {n}
        return int(low)
    return max(int(low), int(high)) if high else int(low) + 1  # {n,m} or {n,}


def _gbnf(schema: dict[str, Any], param: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf
    check_schema(schema, param)
    try:
        text = str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises anything at all on a bad schema
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise Unsupported(param, f"{param} is not a JSON schema this server can enforce: "
                                 f"{reason}") from None
    if len(text) > MAX_GRAMMAR_CHARS:
        raise Unsupported(param, f"{param} makes a grammar of {len(text)} characters; at most "
                                 f"{MAX_GRAMMAR_CHARS} are allowed: lower its bounds or size")
    return text


def json_object() -> str:
    """Any JSON object. Whitespace is bounded, so a small model cannot loop on blank lines."""
    return _gbnf({"type": "object"}, "response_format")


def json_schema(schema: dict[str, Any]) -> str:
    return _gbnf(schema, "response_format.json_schema.schema")


MAX_CALLS = 8  # calls in one forced answer, when parallel calls are allowed


def tool_call(tools: list[Tool], only: str | None = None, parallel: bool = False) -> str:
    """A JSON object {"name": ..., "arguments": {...}} for one of `tools` (or just `only`);
    with `parallel`, up to MAX_CALLS of them, one per line (what toolcalls.Parser reads)."""
    options = []
    for i, tool in enumerate(tools):
        fn = tool.function
        if only is not None and fn.name != only:
            continue
        params = fn.parameters or {"type": "object"}
        check_schema(params, f"tools.{i}.function.parameters")
        options.append({
            "type": "object",
            "properties": {"name": {"const": fn.name}, "arguments": params},
            "required": ["name", "arguments"],
        })
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    one = _gbnf(schema, "tools")
    if not parallel:
        return one
    # one call's grammar under a name no converted schema uses, then the calls, one per line
    renamed = re.sub(r"^root ::=", "one-tool-call ::=", one, count=1, flags=re.MULTILINE)
    return f'{renamed}\nroot ::= one-tool-call ("\\n" one-tool-call){{0,{MAX_CALLS - 1}}}\n'


