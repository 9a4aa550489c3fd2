"""Anthropic Messages API request types (POST /v1/messages and /v1/messages/count_tokens), and
their translation into a chat completion request, which the chat path serves.

Text, tools and JSON output only: images, documents, thinking, server tools and MCP servers
are refused with a 400 that names the field, as is a final assistant message (prefill), which
the chat templates cannot continue. `cache_control` is accepted: the prefix cache keeps long
prompts without being asked. Import-light, like protocol.py.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from appliance.api.protocol import (
    MAX_MESSAGES,
    MAX_STOP,
    MAX_STOP_CHARS,
    ChatCompletionRequest,
    FunctionCall,
    FunctionDef,
    Message,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    Strict,
    Tool,
    ToolCall,
)
from appliance.errors import Unsupported

# Chat fields named in errors, as this API calls them (regex on the chat name, replacement).
RENAMES = [(r"max_completion_tokens", "max_tokens"), (r"stop", "stop_sequences"),
           (r"response_format\.json_schema\.schema", "output_config.format.schema"),
           (r"response_format", "output_config.format"),
           (r"tools\.(\d+)\.function\.parameters", r"tools.\1.input_schema")]


class CacheControl(Strict):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: None = None


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(
            b.text for b in self.content or [])
        return f"Error: {text}" if self.is_error else text


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]


class InputMessage(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class CustomTool(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None
    strict: bool | None = None


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("tool_choice takes a name with type tool, and only then")
        return self


class Thinking(Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class OutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: Annotated[dict[str, Any], Field(alias="schema")]


class OutputConfig(Strict):
    format: OutputFormat | None = None
    effort: str | None = None


class Metadata(Strict):
    user_id: str | None = None


class CountTokensRequest(Strict):
    """What both routes take: the conversation and its tools."""

    messages: Annotated[list[InputMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    model: str
    cache_control: CacheControl | None = None
    output_config: OutputConfig | None = None
    system: str | list[TextBlock] | None = None
    thinking: Thinking | None = None
    tool_choice: ToolChoice | None = None
    tools: list[CustomTool] | None = None

    def check(self) -> None:
        if self.thinking is not None and self.thinking.type != "disabled":
            raise Unsupported("thinking", "extended thinking is not supported by this server")
        if self.output_config is not None and self.output_config.effort is not None:
            raise Unsupported("output_config.effort", "effort is not supported by this server")
        last = len(self.messages) - 1
        if self.messages[last].role == "assistant":
            raise Unsupported(f"messages.{last}", "a final assistant message (prefill) is not "
                                                  "supported; end with a user message")

    def chat_messages(self) -> list[Message]:
        """The conversation as chat messages: tool_use blocks become the assistant message's
        tool calls, tool_result blocks tool messages (in the order they came)."""
        out: list[Message] = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "\n".join(
                b.text for b in self.system)
            out.append(Message(role="system", content=system))
        for m in self.messages:
            blocks = [TextBlock(type="text", text=m.content)] if isinstance(
                m.content, str) else m.content
            text, calls = "", []
            for b in blocks:
                if isinstance(b, TextBlock):
                    text += b.text
                elif isinstance(b, ToolUseBlock):
                    calls.append(ToolCall(id=b.id, function=FunctionCall(
                        name=b.name, arguments=json.dumps(b.input, ensure_ascii=False))))
                else:  # a result goes before the text that follows it
                    if text:
                        out.append(Message(role=m.role, content=text))
                        text = ""
                    out.append(Message(role="tool", tool_call_id=b.tool_use_id,
                                       content=b.text()))
            if text or calls or not any(isinstance(b, ToolResultBlock) for b in blocks):
                out.append(Message(role=m.role, content=text or None, tool_calls=calls or None))
        return out

    def chat_tool_choice(self) -> Literal["none", "auto", "required"] | NamedToolChoice | None:
        tc = self.tool_choice
        if tc is None or tc.type == "auto":
            return None if tc is None else "auto"
        if tc.type == "tool":
            return NamedToolChoice(type="function", function=NamedFunction(name=tc.name or ""))
        return "required" if tc.type == "any" else "none"

    def to_chat(self, **sampled: Any) -> ChatCompletionRequest:
        tc = self.tool_choice
        fmt = self.output_config.format if self.output_config else None
        return ChatCompletionRequest(
            model=self.model, messages=self.chat_messages(),
            tool_choice=self.chat_tool_choice(),
            parallel_tool_calls=False if tc and tc.disable_parallel_tool_use else None,
            response_format=None if fmt is None else ResponseFormat.model_validate(
                {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.schema_}}),
            tools=[Tool(type="function", function=FunctionDef(
                name=t.name, description=t.description, parameters=t.input_schema,
                strict=t.strict)) for t in self.tools] if self.tools else None,
            **sampled)


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[int, Field(ge=1)]
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    stop_sequences: Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]],
                              Field(max_length=MAX_STOP)] | None = None
    stream: bool | None = False
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None

    def to_chat(self, **sampled: Any) -> ChatCompletionRequest:
        return super().to_chat(
            max_completion_tokens=self.max_tokens, stop=self.stop_sequences,
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            user=self.metadata.user_id if self.metadata else None, **sampled)
