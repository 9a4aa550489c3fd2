"""Reading tool calls out of generated text as it streams (appliance/api/toolcalls.py): pure
Python, fed in small pieces as a model would write them."""

from __future__ import annotations

import json

import pytest

from appliance.api.toolcalls import CallArgs, CallEnd, CallStart, Parser, Text, ToolEvent

NAMES = ("get_weather", "get_time")
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TIME = '{"name": "get_time", "arguments": {"tz": "UTC"}}'


def feed(text: str, step: int = 3, **kw: bool) -> tuple[Parser, list[ToolEvent]]:
    parser = Parser(NAMES, **kw)
    events: list[ToolEvent] = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i:i + step])
    return parser, events + parser.close()


def content(events: list[ToolEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, Text))


def streamed_args(events: list[ToolEvent], index: int) -> str:
    return "".join(e.delta for e in events if isinstance(e, CallArgs) and e.index == index)


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_one_call_streams_name_first_then_argument_fragments(step: int) -> None:
    parser, events = feed(WEATHER, step)
    assert isinstance(events[0], CallStart) and events[0].name == "get_weather"
    assert events[0].id.startswith("call_") and events[0].index == 0
    assert isinstance(events[-1], CallEnd) and events[-1].complete
    args = streamed_args(events, 0)
    assert json.loads(args) == {"city": "Paris"} and events[-1].arguments == args
    if step == 1:  # the arguments really come in pieces, as they are written
        assert len([e for e in events if isinstance(e, CallArgs)]) > 5
    assert content(events) == "" and [c.name for c in parser.calls] == ["get_weather"]


@pytest.mark.parametrize("text", [
    f"{WEATHER}\n{TIME}",
    f"[{WEATHER}, {TIME}]",
    f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>",
    f"  {WEATHER}{TIME}  ",
])
def test_several_calls_per_answer(text: str) -> None:
    parser, events = feed(text)
    starts = [e for e in events if isinstance(e, CallStart)]
    assert [(s.index, s.name) for s in starts] == [(0, "get_weather"), (1, "get_time")]
    assert json.loads(streamed_args(events, 1)) == {"tz": "UTC"}
    assert len({s.id for s in starts}) == 2
    assert content(events) == ""
    assert all(c.complete for c in parser.calls)


def test_parallel_false_keeps_only_the_first_call() -> None:
    parser, events = feed(f"{WEATHER}\n{TIME}\nand some words", parallel=False)
    assert [c.name for c in parser.calls] == ["get_weather"]
    assert content(events) == ""


@pytest.mark.parametrize("text", [
    "Paris is the capital.",
    'Answer: {"name": "get_weather", "arguments": {}}',  # calls only start an answer
    '{"capital": "Paris"}',  # JSON, but not a call
    '{"name": "unknown_tool", "arguments": {}}',
    "<b>bold</b> text",
    "[1, 2, 3]",
    "\n\n",  # only white space: still the answer
    "<tool_c",  # the start of a tag, then nothing
])
def test_text_that_is_no_call_is_content_unchanged(text: str) -> None:
    parser, events = feed(text)
    assert content(events) == text and parser.calls == []


def test_text_after_calls_is_content() -> None:
    parser, events = feed(f"{WEATHER}\nI will check the weather.")
    assert [c.name for c in parser.calls] == ["get_weather"]
    assert content(events).strip() == "I will check the weather."


def test_call_cut_off_is_still_a_call_with_its_partial_arguments() -> None:
    cut = WEATHER[:WEATHER.index("Par") + 3]
    for forced in (False, True):
        parser, events = feed(cut, forced=forced)
        assert isinstance(events[-1], CallEnd) and not events[-1].complete
        assert events[-1].arguments == '{"city": "Par' == streamed_args(events, 0)
        assert content(events) == "" and not parser.calls[0].complete


def test_forced_call_cut_inside_its_name() -> None:
    parser, events = feed('{"name": "get_w', forced=True)  # only one tool fits the prefix
    assert [(c.name, c.arguments, c.complete) for c in parser.calls] == [
        ("get_weather", "", False)]
    parser, _ = feed('{"name": "get_', forced=True)  # two fit: the name as written
    assert parser.calls[0].name == "get_"
    parser, _ = feed("", forced=True)  # not even begun: nothing to report
    assert parser.calls == []
    parser, events = feed('{"name": "get_w')  # not forced: it may have been any text
    assert parser.calls == [] and content(events) == '{"name": "get_w'


def test_argument_variants() -> None:
    parser, events = feed('{"arguments": {"city": "Oslo"}, "name": "get_weather"}')
    assert parser.calls[0].name == "get_weather"  # name after the arguments
    assert json.loads(streamed_args(events, 0)) == {"city": "Oslo"}
    parser, events = feed('{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}')
    assert json.loads(parser.calls[0].arguments) == {"city": "Rome"}  # a JSON string
    assert streamed_args(events, 0) == parser.calls[0].arguments
    parser, _ = feed('{"name": "get_time", "parameters": {"tz": "CET"}}')
    assert json.loads(parser.calls[0].arguments) == {"tz": "CET"}
    parser, _ = feed('{"name": "get_time"}')
    assert parser.calls[0].arguments == "{}"
    parser, _ = feed('{"name": "get_weather", "arguments": {"q": "a \\"}\\" b", "n": [1, {}]}}')
    assert json.loads(parser.calls[0].arguments) == {"q": 'a "}" b', "n": [1, {}]}
