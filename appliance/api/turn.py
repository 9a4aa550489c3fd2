"""One assistant turn as the translated APIs (Responses, Messages) read it: the tool-call
reader's events (api/toolcalls.py: text, and each call opened, its arguments in deltas,
closed), then how the turn ended, or that it failed. The translated APIs ask for one choice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from appliance.api.chat import Started, finish_reason, tool_parser
from appliance.api.generation import events
from appliance.api.toolcalls import Call, CallArgs, CallEnd, CallStart, Text, ToolEvent
from appliance.engines.events import Finish, PromptScores
from appliance.errors import ApplianceError

__all__ = ["CallArgs", "CallEnd", "CallStart", "End", "Failed", "Text", "Turn", "TurnEvent",
           "read", "whole"]


@dataclass(frozen=True)
class End:
    reason: str  # as chat's finish_reason: stop, length (a call may be cut), tool_calls
    finish: Finish  # token counts, and the stop string that ended the text


@dataclass(frozen=True)
class Failed:
    message: str


TurnEvent = Text | CallStart | CallArgs | CallEnd | End | Failed


async def read(started: Started, request: Request) -> AsyncIterator[TurnEvent]:
    """The turn's events; nothing more once the client has gone (no End then)."""
    parser = tool_parser(started.req)

    def said(text: str, last: bool = False) -> list[ToolEvent]:
        if parser is None:
            return [Text(text)] if text else []
        return parser.feed(text) + (parser.close() if last else [])

    async for ev in events(started.stream, request, started.n):
        if isinstance(ev, PromptScores):
            continue
        if isinstance(ev, Finish):
            if ev.reason == "error":
                yield Failed(ev.error or "generation failed")
            elif ev.reason != "cancelled":
                for out in said(ev.text, last=True):
                    yield out
                yield End(finish_reason(ev.reason, parser), ev)
            return
        for out in said(ev.text):
            yield out


@dataclass
class Turn:
    text: str = ""
    calls: list[Call] = field(default_factory=list)
    reason: str = "stop"
    finish: Finish | None = None


async def whole(started: Started, request: Request) -> Turn | None:
    """The whole turn of a request that is not streamed; None if the client left."""
    turn = Turn()
    async for ev in read(started, request):
        if isinstance(ev, Text):
            turn.text += ev.text
        elif isinstance(ev, CallStart):
            turn.calls.append(Call(ev.index, ev.id, ev.name))
        elif isinstance(ev, CallEnd):
            turn.calls[ev.index].arguments = ev.arguments
            turn.calls[ev.index].complete = ev.complete
        elif isinstance(ev, End):
            turn.reason, turn.finish = ev.reason, ev.finish
            return turn
        elif isinstance(ev, Failed):
            raise ApplianceError(ev.message)
    return None
