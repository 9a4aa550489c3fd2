"""The OpenAI response shapes this server sends, each built in one place."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from typing import Any

from appliance.api.toolcalls import Call, CallArgs, CallStart, ToolEvent
from appliance.engines.events import Finish
from appliance.serve.runtime import Served


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(finishes: Iterable[Finish]) -> dict[str, Any]:
    """Tokens used by the choices of one or more prompts: a prompt counts once however many
    choices it had (as OpenAI counts), with the part of it the prefix cache supplied."""
    done = list(finishes)
    prompt = sum(f.prompt_tokens for f in done if f.index == 0)
    completion = sum(f.completion_tokens for f in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(
                f.cached_tokens for f in done if f.index == 0)}}


def tool_call(call: Call) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def tool_call_delta(ev: ToolEvent) -> dict[str, Any] | None:
    """A streamed call event as a chat chunk's `tool_calls` entry (None: nothing to send)."""
    if isinstance(ev, CallStart):
        return {"index": ev.index, "id": ev.id, "type": "function",
                "function": {"name": ev.name, "arguments": ""}}
    if isinstance(ev, CallArgs):
        return {"index": ev.index, "function": {"arguments": ev.delta}}
    return None


class Envelope:
    """The fields every object of one response shares (chunks of a stream included)."""

    def __init__(self, served: Served[Any], ident: str, kind: str) -> None:
        self.base = {"id": ident, "object": kind, "created": int(time.time()),
                     "model": served.id, "system_fingerprint": served.fingerprint}

    def chat(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        return {**self.base, "choices": choices, "usage": usage}

    def chat_chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None,
                   with_usage: bool = False, index: int = 0) -> dict[str, Any]:
        body: dict[str, Any] = {**self.base, "choices": [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if with_usage:
            body["usage"] = None
        return body

    def completion_chunk(self, text: str, finish: str | None = None, with_usage: bool = False,
                         index: int = 0, logprobs: Any = None) -> dict[str, Any]:
        body: dict[str, Any] = {**self.base, "choices": [
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
        if with_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, finishes: Iterable[Finish]) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": usage(finishes)}
