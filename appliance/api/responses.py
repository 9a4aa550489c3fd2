"""The OpenAI response shapes this server sends, each built in one place."""

from __future__ import annotations

import secrets
import time
from typing import Any

from appliance.engines.events import Finish
from appliance.serve.runtime import Served


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(f: Finish) -> dict[str, int]:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens}


def tool_call(name: str, arguments: str, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": f"call_{secrets.token_hex(12)}", "type": "function",
                           "function": {"name": name, "arguments": arguments}}
    if index is not None:
        out["index"] = index
    return out


class Envelope:
    """The fields every object of one response shares (chunks of a stream included)."""

    def __init__(self, served: Served[Any], ident: str, kind: str) -> None:
        self.base = {"id": ident, "object": kind, "created": int(time.time()),
                     "model": served.id, "system_fingerprint": served.fingerprint}

    def chat(self, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        return {**self.base, "choices": choices, "usage": usage}

    def chat_chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None,
                   with_usage: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {**self.base, "choices": [
            {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if with_usage:
            body["usage"] = None
        return body

    def completion_chunk(self, text: str, finish: str | None = None,
                         with_usage: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {**self.base, "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if with_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, f: Finish) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": usage(f)}
