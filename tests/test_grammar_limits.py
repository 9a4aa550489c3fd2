"""Client JSON schemas are bounded before they become grammars: every refusal is an
`Unsupported` (a 400) that names the field, and takes no time."""

from __future__ import annotations

import time
from typing import Any

import pytest

from appliance.api import grammar
from appliance.api.protocol import Tool, Unsupported

HUGE = 20_000_000
RF = "response_format.json_schema.schema"


@pytest.mark.parametrize(("schema", "param"), [
    ({"type": "string", "maxLength": HUGE}, f"{RF}.maxLength"),
    ({"type": "object", "properties": {"name": {"type": "string", "minLength": HUGE}}},
     f"{RF}.properties.name.minLength"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 10**9}, f"{RF}.minItems"),
    ({"type": "array", "items": {"type": "array", "maxItems": HUGE}},
     f"{RF}.items.maxItems"),
    ({"type": "object", "maxProperties": HUGE}, f"{RF}.maxProperties"),
    ({"type": "string", "pattern": "^a{20000000}$"}, f"{RF}.pattern"),
    ({"type": "string", "pattern": "^((a{30}){30}){30}$"}, f"{RF}.pattern"),  # 27,000 nested
    ({"type": "string", "pattern": "^" + "a" * 5000 + "$"}, f"{RF}.pattern"),
    ({"type": "string", "maxLength": -1}, f"{RF}.maxLength"),
    ({"$ref": "https://example.com/schema.json"}, f"{RF}.$ref"),
    ({"type": "object", "patternProperties": {"a{99999999999}": {}}},
     f"{RF}.patternProperties"),
    ({"type": "string", "pattern": "^" + "(" * 500 + "a" + ")" * 500 + "$"}, f"{RF}.pattern"),
    ({"type": "string", "pattern": r"^(((a{512}[\])][\])][\])]){512}){512}){512}$"},
     f"{RF}.pattern"),  # an escaped ] inside a class does not end it
])
def test_unbounded_schemas_are_refused_naming_the_field(schema: dict[str, Any],
                                                        param: str) -> None:
    start = time.monotonic()
    with pytest.raises(Unsupported) as info:
        grammar.json_schema(schema)
    assert info.value.param == param
    assert param in str(info.value)
    assert time.monotonic() - start < 0.5


def test_deep_and_wide_schemas_are_refused() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(200):
        deep = {"type": "array", "items": deep}
    with pytest.raises(Unsupported, match="nests deeper"):
        grammar.json_schema(deep)
    deep = {"type": "string"}
    for _ in range(50_000):  # deeper than Python's recursion limit: still one clean error
        deep = {"anyOf": [deep]}
    with pytest.raises(Unsupported, match="nests deeper"):
        grammar.json_schema(deep)
    wide = {"type": "object", "properties": {f"p{i}": {"type": "object"} for i in range(5000)}}
    with pytest.raises(Unsupported, match="more than 4096"):
        grammar.json_schema(wide)


@pytest.mark.parametrize(("schema", "param"), [
    ({"type": "nonsense"}, f"{RF}.type"),
    ({"type": "object", "required": "a"}, f"{RF}.required"),
    ({"properties": 5}, f"{RF}.properties"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}},
     f"{RF}.properties.a.minimum"),
    ({"enum": 5}, f"{RF}.enum"),
    ({"$ref": "#/definitions/missing"}, RF),  # valid shape, nothing to point at
    ({"type": "string", "pattern": "no anchors"}, RF),
])
def test_invalid_schemas_are_400s_naming_the_field(schema: dict[str, Any], param: str) -> None:
    with pytest.raises(Unsupported) as info:
        grammar.json_schema(schema)
    assert info.value.param == param, info.value


def test_tool_parameters_are_named_by_tool_index() -> None:
    tools = [Tool.model_validate({"type": "function", "function": {
        "name": "ok", "parameters": {"type": "object"}}}),
             Tool.model_validate({"type": "function", "function": {
                 "name": "bad", "parameters": {"type": "object", "properties": {
                     "xs": {"type": "array", "maxItems": 10**9}}}}})]
    with pytest.raises(Unsupported) as info:
        grammar.tool_call(tools)
    assert info.value.param == "tools.1.function.parameters.properties.xs.maxItems"


def test_the_largest_allowed_bounds_still_convert() -> None:
    top = grammar.MAX_REPEAT
    schema = {"type": "object", "properties": {
        "s": {"type": "string", "maxLength": top},
        "xs": {"type": "array", "items": {"type": "integer"}, "maxItems": top},
        "p": {"type": "string", "pattern": f"^[a-z]{{{top}}}$"}}}
    start = time.monotonic()
    text = grammar.json_schema(schema)
    took = time.monotonic() - start
    assert len(text) < grammar.MAX_GRAMMAR_CHARS
    print(f"largest allowed grammar: {len(text)} characters, converted in {took * 1000:.0f} ms")


def test_pattern_repeats() -> None:
    assert grammar.pattern_repeats("^[a-z]{5}\\d{3}$") == 5
    assert grammar.pattern_repeats("^(a{10}){20}$") == 200
    assert grammar.pattern_repeats("^((a{2}){3}b{7}){5}$") == 35
    assert grammar.pattern_repeats("^a{2,}$") == 3
    assert grammar.pattern_repeats("^\\{100\\}[{]{3}$") == 3
