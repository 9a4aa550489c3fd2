"""Chat templates from the GGUF metadata (or the bundle), rendered in a sandbox.

Templates are Jinja, as Hugging Face defines them. They come from a signed bundle, but they are
still code, so they run in Jinja's immutable sandbox: no attribute access to internals, no
mutation of the messages we pass in.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.errors import RequestError

TOOL_INSTRUCTIONS = (
    "You can call these functions. To call one, answer with only a JSON object "
    '{{"name": <function name>, "arguments": <arguments object>}}.{several}\nFunctions:\n{tools}'
)
SEVERAL_CALLS = " To call several at once, write one such object per line."


class TemplateFailure(RequestError):
    """The template raised or could not be compiled; the message is safe to show a client."""


def _raise(message: str) -> None:
    raise TemplateFailure(message)


def _tojson(value: Any, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now(UTC).strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise TemplateFailure(f"the model's chat template does not compile: {exc}") from None


def mentions_tools(source: str) -> bool:
    return "tools" in source


def render(source: str, messages: list[dict[str, Any]], *, bos: str, eos: str,
           tools: list[dict[str, Any]] | None = None, parallel: bool = True) -> str:
    """The prompt text for `messages`, ending where the assistant's answer begins. `parallel`:
    the model may answer several tool calls at once."""
    if tools and not mentions_tools(source):
        # The template has no notion of tools: describe them in a system message instead.
        described = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        note = TOOL_INSTRUCTIONS.format(tools=described, several=SEVERAL_CALLS if parallel else "")
        if messages and messages[0]["role"] == "system":
            messages = [{**messages[0], "content": f"{messages[0]['content']}\n\n{note}"},
                        *messages[1:]]
        else:
            messages = [{"role": "system", "content": note}, *messages]
        tools = None
    try:
        return str(_compile(source).render(
            messages=messages, tools=tools, add_generation_prompt=True,
            parallel_tool_calls=parallel,
            bos_token=bos, eos_token=eos))
    except TemplateFailure:
        raise
    except (TemplateError, TypeError, ValueError, KeyError) as exc:
        raise TemplateFailure(f"the chat template failed on these messages: {exc}") from None
