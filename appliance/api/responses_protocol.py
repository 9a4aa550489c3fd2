"""OpenAI Responses API request types (POST /v1/responses), fields in the order of the OpenAI
reference, and their translation into a chat completion request, which the chat path serves.

The appliance keeps no state, so everything that needs a stored response or conversation
(`previous_response_id`, `store`, `conversation`, `background`) is refused, as are hosted tools
and non-text input: a 400 names the field. Import-light, like protocol.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from appliance.api.protocol import (
    MAX_MESSAGES,
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

Status = Literal["in_progress", "completed", "incomplete"]
# Chat fields named in errors, as this API calls them (regex on the chat name, replacement).
RENAMES = [(r"messages", "input"), (r"max_completion_tokens", "max_output_tokens"),
           (r"response_format\.json_schema\.schema", "text.format.schema"),
           (r"response_format", "text.format"),
           (r"tools\.(\d+)\.function\.parameters", r"tools.\1.parameters")]


class InputText(Strict):
    type: Literal["input_text"]
    text: str


class OutputText(Strict):
    """Text of an earlier answer, sent back as input (annotations and logprobs are ours)."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class RefusalPart(Strict):
    type: Literal["refusal"]
    refusal: str


Part = Annotated[InputText | OutputText | RefusalPart, Field(discriminator="type")]


class MessageItem(Strict):
    """A message; `type` may be left out (EasyInputMessage)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    id: str | None = None
    status: Status | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.refusal if isinstance(p, RefusalPart) else p.text for p in self.content)


class FunctionCallItem(Strict):
    """A call the model made in an earlier turn."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: Status | None = None


class FunctionCallOutputItem(Strict):
    """The client's result of a call."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: Status | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(
            p.text for p in self.output)


def _item_type(value: Any) -> str | None:
    if isinstance(value, dict):
        kind = value.get("type", "message")
        return kind if isinstance(kind, str) else None
    return getattr(value, "type", None)


Item = Annotated[Annotated[MessageItem, Tag("message")]
                 | Annotated[FunctionCallItem, Tag("function_call")]
                 | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
                 Discriminator(_item_type, custom_error_type="input_item",
                               custom_error_message="input items are messages, function_call "
                               "and function_call_output here (no hosted tools, reasoning or "
                               "item references)")]


class FunctionTool(Strict):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and (self.schema_ is None or not self.name):
            raise ValueError("text.format json_schema needs a name and a schema")
        return self


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class StreamOptions(Strict):
    include_obfuscation: bool | None = None


class ResponsesRequest(Strict):
    background: bool | None = None
    conversation: Any | None = None
    include: list[str] | None = None
    input: str | Annotated[list[Item], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tool_calls: int | None = None
    metadata: dict[str, str] | None = None
    model: str
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    prompt: Any | None = None
    prompt_cache_key: str | None = None  # a routing hint; the prefix cache needs none
    reasoning: Any | None = None
    safety_identifier: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    text: TextConfig | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    tools: list[FunctionTool] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None

    def check(self) -> None:
        """Refuse what a stateless server without hosted tools cannot honour."""
        if self.previous_response_id is not None:
            raise Unsupported("previous_response_id", "this appliance keeps no responses; "
                                                      "send the whole conversation in input")
        if self.store:
            raise Unsupported("store", "this appliance keeps no responses; send store=false "
                                       "or leave it out")
        if self.conversation is not None:
            raise Unsupported("conversation", "this appliance keeps no conversations")
        if self.background:
            raise Unsupported("background", "background responses need stored responses, "
                                            "which this appliance does not keep")
        for name in ("prompt", "reasoning", "max_tool_calls"):
            if getattr(self, name) is not None:
                raise Unsupported(name, f"{name} is not supported by this server")
        if self.include:
            raise Unsupported("include", "include is not supported by this server")
        if self.top_logprobs:
            raise Unsupported("top_logprobs", "top_logprobs is not supported on /v1/responses")
        if self.truncation == "auto":
            raise Unsupported("truncation", "input is never truncated here; a conversation "
                                            "that does not fit is refused")
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            raise Unsupported("text.verbosity", "text.verbosity is not supported")
        if self.service_tier not in (None, "auto", "default"):
            raise Unsupported("service_tier", "only the default service tier exists here")
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "stream_options needs stream=true")

    def messages(self) -> list[Message]:
        """The conversation as chat messages: the instructions first, a call joins the
        assistant message before it, a call's output becomes a tool message."""
        out = [Message(role="system", content=self.instructions)] if self.instructions else []
        items = [MessageItem(role="user", content=self.input)] if isinstance(
            self.input, str) else self.input
        for item in items:
            if isinstance(item, MessageItem):
                out.append(Message(role=item.role, content=item.text()))
            elif isinstance(item, FunctionCallItem):
                call = ToolCall(id=item.call_id, function=FunctionCall(
                    name=item.name, arguments=item.arguments))
                if out and out[-1].role == "assistant":
                    out[-1].tool_calls = [*(out[-1].tool_calls or []), call]
                else:
                    out.append(Message(role="assistant", tool_calls=[call]))
            else:
                out.append(Message(role="tool", tool_call_id=item.call_id, content=item.text()))
        return out

    def to_chat(self) -> ChatCompletionRequest:
        choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
        if isinstance(self.tool_choice, FunctionChoice):
            choice = NamedToolChoice(type="function",
                                     function=NamedFunction(name=self.tool_choice.name))
        else:
            choice = self.tool_choice
        fmt = self.text.format if self.text else None
        return ChatCompletionRequest(
            model=self.model, messages=self.messages(),
            max_completion_tokens=self.max_output_tokens,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=None if fmt is None else ResponseFormat.model_validate({
                "type": fmt.type, "json_schema": None if fmt.type != "json_schema" else {
                    "name": fmt.name, "description": fmt.description, "schema": fmt.schema_,
                    "strict": fmt.strict}}),
            temperature=self.temperature, top_p=self.top_p, tool_choice=choice,
            tools=[Tool(type="function", function=FunctionDef(
                name=t.name, description=t.description, parameters=t.parameters,
                strict=t.strict)) for t in self.tools] if self.tools else None,
            user=self.user)
