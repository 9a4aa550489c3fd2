"""OpenAI request types (pydantic), fields in the order of the OpenAI reference.

Unknown fields are refused (extra="forbid"): a client that sends a parameter we do not implement
gets a 400 naming it rather than an answer that silently ignored it. Import-light on purpose: no
engine is imported here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    field_validator,
    model_validator,
)

from appliance.errors import Unsupported

MAX_STOP = 4
MAX_STOP_CHARS = 256  # stop strings are matched at every token: keep that cheap
MAX_MESSAGES = 4096


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class MediaPart(BaseModel):
    """An image, audio or file part: accepted in any shape, so that the answer can say that
    the model takes none (a 400 naming the part) rather than how the part is malformed."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file"]


MEDIA = {"image_url": "images", "input_audio": "audio input", "file": "files"}


def _part_kind(part: Any) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return "TextPart" if kind == "text" else "MediaPart" if kind in MEDIA else None


# Dispatched on `type`, so a part is checked against its own kind only (no error per branch).
ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[MediaPart, Tag("MediaPart")],
    Discriminator(_part_kind, custom_error_type="content_part_type",
                  custom_error_message="a content part's type is text, image_url, input_audio "
                                       "or file")]


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if isinstance(p, TextPart))
        return self.content or ""


def refuse_media(messages: list[Message], model: str, where: str = "messages") -> None:
    """Chat models here read text only: an image, audio or file part is a 400 naming it."""
    for i, m in enumerate(messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if isinstance(part, MediaPart):
                raise Unsupported(f"{where}.{i}.content.{j}",
                                  f"the model `{model}` takes no {MEDIA[part.type]} "
                                  f"({part.type}); send text content parts only")


class FunctionDef(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Strict):
    name: str
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None
                                           or self.json_schema.schema_ is None):
            raise ValueError("response_format json_schema needs json_schema.schema")
        return self


class StreamOptions(Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP:
        raise ValueError(f"stop takes at most {MAX_STOP} strings")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"a stop string has more than {MAX_STOP_CHARS} characters")
    return [s for s in stops if s]


class Sampled(Strict):
    """Parameters shared by chat and completions."""

    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, description="Bias added to the logits of token ids (keys), -100 to 100")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(default=None, description=(
        "Most tokens to generate. Without it: chat stops at the server's default_max_tokens "
        "(see the model card), completions at 16; a value beyond the context is a 400"))
    n: int | None = Field(default=None, description=(
        "Choices to generate, at most the server's max_n (8 by default); one prefill serves all"))
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: int | None = Field(default=None, description="Makes sampling repeatable")
    stop: str | list[str] | None = Field(default=None, description=(
        f"Up to {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters"))
    stream: bool | None = Field(default=False, description="Send the answer as server-sent events")
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(default=None, description=(
        "0 is greedy; default 1"))
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    user: str | None = Field(default=None, description="Accepted and not used")
    # --- extensions (llama.cpp and vLLM accept these too) ---
    top_k: Annotated[int, Field(ge=0)] | None = Field(default=None, description="0: off")
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=4)] | None = Field(
        default=None, description="llama.cpp's repeat penalty over the last 64 tokens; 1: off")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        _stop_list(v)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError("logit_bias keys are token ids")
        return v

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "stream_options needs stream=true")

    @property
    def stops(self) -> list[str]:
        return _stop_list(self.stop)


class ChatCompletionRequest(Sampled):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)] = Field(
        description="The conversation; content is text or text parts (this server's chat "
                    "models take no images, audio or files)")
    model: str = Field(description="A chat model's id (GET /v1/models)")
    audio: Any | None = Field(default=None, description="Not supported (400)")
    logprobs: bool | None = Field(default=None, description="Log probabilities of the tokens")
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(default=None, description=(
        "OpenAI's newer name for max_tokens"))
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = Field(default=None, description='Only ["text"]')
    parallel_tool_calls: bool | None = Field(default=None, description=(
        "false: at most one tool call per answer"))
    prediction: Any | None = Field(default=None, description="Not supported (400)")
    reasoning_effort: str | None = Field(default=None, description="Not supported (400)")
    response_format: ResponseFormat | None = Field(default=None, description=(
        "json_object or json_schema: the answer is held to it by a grammar"))
    service_tier: str | None = None
    store: bool | None = Field(default=None, description="Nothing is stored: true is a 400")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="required or a named function is enforced by a grammar")
    tools: list[Tool] | None = Field(default=None, description=(
        "Functions the model may call; a call comes back in message.tool_calls"))
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(default=None, description=(
        "Alternatives per token, with logprobs"))
    web_search_options: Any | None = Field(default=None, description="Not supported (400)")

    def check(self) -> None:
        self.check_common()
        for name in ("audio", "prediction", "web_search_options", "reasoning_effort"):
            if getattr(self, name) is not None:
                raise Unsupported(name, f"{name} is not supported by this server")
        if self.modalities not in (None, ["text"]):
            raise Unsupported("modalities", "only text output is supported")
        if self.store:
            raise Unsupported("store", "this appliance stores no completions")
        if self.service_tier not in (None, "auto", "default"):
            raise Unsupported("service_tier", "only the default service tier exists here")
        if self.top_logprobs and not self.logprobs:
            raise Unsupported("top_logprobs", "top_logprobs needs logprobs=true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise Unsupported("tool_choice", "tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise Unsupported("tool_choice", f"no tool named {self.tool_choice.function.name}")
        if self.tools and self.response_format and self.response_format.type != "text":
            raise Unsupported("response_format", "response_format cannot be combined with tools")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampled):
    model: str = Field(description="A chat model's id (GET /v1/models); base models too")
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=64)] = Field(
        description="Text to continue, or up to 64 of them (one choice each)")
    best_of: int | None = Field(default=None, description="Only 1")
    echo: bool | None = Field(default=False, description="Put the prompt before the answer")
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(default=None, description=(
        "Alternatives per token (0: the chosen token's only); with echo, the prompt's too"))
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(default=None, description=(
        "Most tokens to generate (16 by default); 0 with echo scores the prompt alone"))
    suffix: str | None = Field(default=None, description="Not supported (400)")

    def check(self) -> None:
        self.check_common()
        if self.max_tokens == 0 and not self.echo:
            raise Unsupported("max_tokens", "max_tokens=0 generates nothing; it needs echo=true "
                                            "(to score the prompt)")
        if self.best_of not in (None, 1):
            raise Unsupported("best_of", "best_of > 1 is not supported")
        if self.suffix:
            raise Unsupported("suffix", "suffix (fill-in-the-middle) is not supported")
        if isinstance(self.prompt, list) and self.stream and len(self.prompt) > 1:
            raise Unsupported("prompt", "streaming takes one prompt at a time")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class EmbeddingRequest(Strict):
    input: str | list[str] | list[int] | list[list[int]] = Field(description=(
        "A text, texts, token ids, or lists of token ids (limits: the model card)"))
    model: str = Field(description="An embeddings model's id (GET /v1/models)")
    dimensions: Annotated[int, Field(ge=1)] | None = Field(default=None, description=(
        "Fewer dimensions than the model's: the first ones, renormalised"))
    encoding_format: Literal["float", "base64"] = Field(default="float", description=(
        "base64: little-endian float32"))
    user: str | None = None

    def items(self) -> tuple[list[str], list[list[int]]]:
        """(texts, token lists): exactly one of them is non-empty."""
        raw = self.input
        if isinstance(raw, str):
            raw = [raw]
        if not raw:
            raise Unsupported("input", "input must not be empty")
        if all(isinstance(x, str) for x in raw):
            texts = [x for x in raw if isinstance(x, str)]
            if any(not t for t in texts):
                raise Unsupported("input", "input must not contain empty strings")
            return texts, []
        if all(isinstance(x, int) for x in raw):
            return [], [[x for x in raw if isinstance(x, int)]]
        lists = [x for x in raw if isinstance(x, list)]
        if len(lists) != len(raw) or any(not x for x in lists):
            raise Unsupported("input", "input must be text, a list of texts, token ids, or "
                                       "a list of non-empty token id lists")
        return [], lists


# --- tokenizer routes (llama.cpp's and vLLM's shapes; not in OpenAI's reference) -------------

class TokenizeRequest(Strict):
    """One of `content` (llama-server), `prompt` or `messages` (vLLM)."""

    model: str | None = Field(default=None, description=(
        "A chat model's id; may be left out while the API key sees only one chat model"))
    content: str | None = Field(default=None, description=(
        "Text, tokenized as llama-server does it (no BOS unless add_special)"))
    prompt: str | None = Field(default=None, description=(
        "Text, tokenized as /v1/completions tokenizes a prompt (BOS added by default)"))
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)] | None = (
        Field(default=None, description="A conversation, rendered by the model's chat template "
                                        "as /v1/chat/completions does"))
    tools: list[Tool] | None = Field(default=None, description=(
        "With messages: tools shown to the template, as in chat"))
    add_special: bool | None = Field(default=None, description=(
        "Add the model's special tokens (BOS): default false for content, true for prompt; "
        "not with messages, where the template decides"))
    add_special_tokens: bool | None = Field(default=None, description="vLLM's name for add_special")
    parse_special: bool = Field(default=False, description=(
        "Read special-token text such as <|im_start|> as that token; off by default, as "
        "/v1/completions reads prompts"))
    add_generation_prompt: bool = Field(default=True, description=(
        "vLLM's flag; the chat template always ends with the answer's prompt here"))
    with_pieces: bool = Field(default=False, description=(
        "llama-server's form: tokens as {id, piece} objects, a piece as text or, where it is "
        "not whole UTF-8, as its bytes"))

    def check(self) -> None:
        given = [n for n in ("content", "prompt", "messages") if getattr(self, n) is not None]
        if len(given) != 1:
            raise Unsupported(given[1] if given else "content",
                              "give exactly one of content (llama.cpp), prompt or messages "
                              "(vLLM)")
        if self.add_special is not None and self.add_special_tokens is not None:
            raise Unsupported("add_special_tokens", "give add_special or add_special_tokens, "
                                                    "not both")
        if self.messages is None:
            for name in ("tools", "add_generation_prompt"):
                if name in self.model_fields_set:
                    raise Unsupported(name, f"{name} goes with messages")
            return
        for name in ("add_special", "add_special_tokens", "parse_special"):
            if getattr(self, name):
                raise Unsupported(name, f"with messages the chat template decides the special "
                                        f"tokens: {name} cannot be set")
        if not self.add_generation_prompt:
            raise Unsupported("add_generation_prompt", "the chat template always ends with the "
                                                       "answer's prompt here")

    @property
    def special(self) -> bool:
        """Whether to add BOS and the like to text."""
        asked = self.add_special if self.add_special is not None else self.add_special_tokens
        return asked if asked is not None else self.prompt is not None


class DetokenizeRequest(Strict):
    model: str | None = Field(default=None, description=(
        "A chat model's id; may be left out while the API key sees only one chat model"))
    tokens: list[StrictInt] = Field(description=(
        "Token ids of the model's vocabulary; special tokens come back as their text"))


class RerankRequest(Strict):
    """POST /v1/rerank, in the shape Cohere, Jina and vLLM share. Documents are strings or
    `{"text": ...}` objects, read by `texts()` so that a wrong one is named plainly (a union
    type would answer with one error per member)."""

    model: str = Field(description="An embeddings model's id (GET /v1/models)")
    query: str = Field(description="The text the documents are scored against")
    documents: list[Any] = Field(description=(
        'Strings or {"text": string} objects; the query counts as one of the embeddings '
        "model's inputs (limits: the model card)"))
    top_n: Annotated[int, Field(ge=1)] | None = Field(default=None, description=(
        "Return only the best n (at most the number of documents); default all"))
    return_documents: bool = Field(default=True, description=(
        "Give each result its document's text (Jina's and vLLM's default)"))

    def texts(self) -> list[str]:
        if not self.query:
            raise Unsupported("query", "query must not be empty")
        if not self.documents:
            raise Unsupported("documents", "documents must not be empty")
        out = []
        for i, doc in enumerate(self.documents):
            text = doc.get("text") if isinstance(doc, dict) and doc.keys() == {"text"} else doc
            if not isinstance(text, str):
                raise Unsupported(f"documents.{i}", f"documents.{i} must be a string or an "
                                                    'object {"text": string}')
            if not text:
                raise Unsupported(f"documents.{i}", f"documents.{i} is empty")
            out.append(text)
        return out
