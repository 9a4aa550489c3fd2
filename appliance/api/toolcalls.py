"""Tool calls read out of generated text as it arrives, as typed events any front end can
translate (chat chunks here; other APIs name the same moments differently).

The model answers a call as a JSON object `{"name": ..., "arguments": {...}}` (our tool
instructions and the forced-call grammar ask for that; `"parameters"` is read as arguments),
optionally inside `<tool_call>` tags or a JSON array; several calls follow each other,
separated by white space, commas or tags. A call is only recognised at the start of the answer
or right after another call: prose that merely contains JSON stays content.

A call becomes a `CallStart` as soon as its name is complete and names one of the tools; its
arguments then stream raw, as `CallArgs` fragments, while the model writes them; `CallEnd`
closes it, `complete=False` when generation stopped inside it (max_tokens). A forced call cut
short is still a call, never content: its arguments, and its name if even that was cut and
several tools could match, are what the model wrote so far.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Call", "CallArgs", "CallEnd", "CallStart", "Parser", "Text", "ToolEvent"]

_TAGS = ("<tool_call>", "</tool_call>")
_ARG_KEYS = ("arguments", "parameters")


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArgs:
    index: int
    delta: str  # the next piece of the arguments' JSON text


@dataclass(frozen=True)
class CallEnd:
    index: int
    arguments: str  # the whole JSON text (all the deltas joined)
    complete: bool


ToolEvent = Text | CallStart | CallArgs | CallEnd


@dataclass
class Call:
    index: int
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


class _Scanner:
    """One JSON object, scanned character by character without judging it valid: it tracks
    strings and nesting, the top-level keys, the value of "name" and where the arguments'
    value starts and ends. Cheap enough per token (a call is tens of characters)."""

    def __init__(self) -> None:
        self.buf = ""
        self.pos = 0
        self.depth = 0
        self.in_str = self.esc = False
        self.str_start = 0
        self.expect = "key"  # at depth 1: key, colon, value, comma
        self.key = ""
        self.value_start = -1
        self.name: str | None = None
        self.name_start = -1  # where the name's string starts (to read a cut-off name)
        self.args_start = self.args_end = -1
        self.invalid = False
        self.end = -1  # index just past the closing brace

    def feed(self, text: str) -> None:
        self.buf += text
        buf = self.buf
        i = self.pos
        while i < len(buf) and not self.invalid and self.end < 0:
            c = buf[i]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.depth == 1:
                        self._string_done(i)
                i += 1
                continue
            if self.depth == 0:
                if c != "{":
                    self.invalid = True
                self.depth = 1
            elif c == '"':
                self.in_str, self.str_start = True, i
                if self.depth == 1:
                    self._value_begins(i)
            elif c in "{[":
                if self.depth == 1:
                    self._value_begins(i)
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self._value_ends(i + 1)
                elif self.depth == 0:
                    if c != "}" or self.expect == "colon":
                        self.invalid = True
                    self._value_ends(i)
                    self.end = i + 1
            elif self.depth == 1 and not c.isspace():
                if c == ":" and self.expect == "colon":
                    self.expect = "value"
                elif c == ",":
                    self._value_ends(i)
                    self.expect = "key"
                elif self.expect == "value" or self.expect == "literal":
                    self._value_begins(i)
                    self.expect = "literal"
                else:
                    self.invalid = True
            i += 1
        self.pos = i

    def _value_begins(self, i: int) -> None:
        if self.expect == "key":  # a key's string, not a value
            return
        if self.expect != "value" and self.expect != "literal":
            self.invalid = True
            return
        if self.expect == "value":
            self.value_start = i
            if self.key in _ARG_KEYS:
                self.args_start = i
            if self.key == "name":
                self.name_start = i

    def _value_ends(self, i: int) -> None:
        if self.expect not in ("value", "literal", "comma") or self.value_start < 0:
            return
        if self.key in _ARG_KEYS and self.args_end < 0:
            self.args_end = i
        self.value_start = -1
        self.expect = "comma"

    def _string_done(self, i: int) -> None:
        raw = self.buf[self.str_start:i + 1]
        if self.expect == "key":
            self.key = _decode(raw) or ""
            if self.key not in ("name", *_ARG_KEYS) and self.name is None:
                self.invalid = True  # not a call (once named, other keys are tolerated)
            self.expect = "colon"
        elif self.value_start == self.str_start:  # a whole value that is a string
            if self.key == "name":
                self.name = _decode(raw)
            self._value_ends(i + 1)

    @property
    def args_container(self) -> bool:
        """The arguments are an object or array: their raw text can stream as it comes."""
        return self.args_start >= 0 and self.buf[self.args_start] in "{["

    def args_text(self) -> str:
        if self.args_start < 0:
            return ""
        return self.buf[self.args_start:self.args_end if self.args_end >= 0 else len(self.buf)]

    def partial_name(self) -> str:
        if self.name is not None:
            return self.name
        if self.name_start < 0:
            return ""
        raw = self.buf[self.name_start:]
        return _decode(raw + '"') or raw[1:]


def _decode(raw: str) -> str | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


class Parser:
    """Feed the generated text piece by piece; get text and call events back.

    `names`: the tools the model may call. `forced`: a grammar made the answer a call (so an
    unfinished one is still reported as a call). `parallel`: more than one call per answer;
    when False, whatever follows the first call is dropped."""

    def __init__(self, names: Iterable[str], *, forced: bool = False,
                 parallel: bool = True) -> None:
        self.names = set(names)
        self.forced = forced
        self.parallel = parallel
        self.calls: list[Call] = []
        self._mode = "start"  # start (between calls), call, text, done
        self._held = ""  # text since the last decision, released as content if no call
        self._scan: _Scanner | None = None
        self._open: Call | None = None  # the call being written, once announced
        self._sent = 0  # characters of the current call's arguments already sent

    def feed(self, text: str) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        if self._mode == "text":
            if text:
                out.append(Text(text))
            return out
        if self._mode == "done":
            return out
        rest = text
        while rest or self._mode == "start":
            if self._mode == "start":
                rest = self._start(self._held + rest, out)
                if self._mode == "start":
                    return out  # waiting for more text
            elif self._mode == "call":
                rest = self._call(rest, out)
            elif self._mode == "text":
                if rest:
                    out.append(Text(rest))
                return out
            else:
                return out
        return out

    def close(self) -> list[ToolEvent]:
        """The end of generation: release or close whatever is held."""
        out: list[ToolEvent] = []
        if self._mode == "start" and self._held and not self._after_call_tags():
            out.append(Text(self._held))
        elif self._mode == "call" and self._scan is not None:
            if self._open is not None:
                self._end_call(out, complete=False)
            elif self.forced:
                self._begin_call(self._resolve(self._scan.partial_name()), out)
                self._end_call(out, complete=False)
            else:
                out.append(Text(self._held))
        self._held = ""
        self._mode = "done"
        return out

    # --- states ---------------------------------------------------------------------------

    def _start(self, text: str, out: list[ToolEvent]) -> str:
        """Between calls: skip separators; a `{` opens a candidate call."""
        self._held = text
        i = 0
        while i < len(text):
            c = text[i]
            if c.isspace() or (c == "[" and not self.calls) or (c in ",]" and self.calls):
                i += 1
                continue
            if c == "<":
                tag = next((t for t in _TAGS if text.startswith(t, i)), None)
                if tag is not None:
                    i += len(tag)
                    continue
                if any(t.startswith(text[i:]) for t in _TAGS):
                    return ""  # maybe a tag: wait for the rest of it
            if c == "{":
                self._held = text[:i]
                self._mode = "call"
                self._scan = _Scanner()
                self._sent = 0
                return text[i:]
            self._to_text(out)
            return ""
        return ""

    def _after_call_tags(self) -> bool:
        """Only separators and tags are held (after a call): nothing to show."""
        return bool(self.calls) and not self._held.replace("<tool_call>", "").replace(
            "</tool_call>", "").strip(" \t\r\n,]")

    def _to_text(self, out: list[ToolEvent]) -> None:
        """Not a call: what was held is content, and so is the rest of the answer."""
        if self.calls and not self.parallel:
            self._mode, self._held = "done", ""
            return
        if self._held:
            out.append(Text(self._held))
        self._mode, self._held = "text", ""

    def _call(self, text: str, out: list[ToolEvent]) -> str:
        scan = self._scan
        assert scan is not None
        before = len(scan.buf)
        scan.feed(text)
        started = self._open is not None
        if scan.invalid:
            if started:  # already announced: the call ends here, as far as it got
                self._end_call(out, complete=False)
                self._mode, self._held = "text", ""
                return text[max(0, scan.pos - before):]
            self._held += text
            self._to_text(out)
            return ""
        if not started:
            self._held += text if scan.end < 0 else text[:scan.end - before]
            if scan.name is not None:
                if scan.name not in self.names and not self.forced:
                    self._to_text(out)
                    return text[scan.end - before:] if scan.end >= 0 else ""
                self._begin_call(scan.name, out)
                started = True
        if self._open is not None:
            self._stream_args(out, self._open.index)
        if scan.end < 0:
            return ""
        rest = text[scan.end - before:]
        if started:
            self._end_call(out, complete=True)
        else:  # an object without a name: not a call
            self._to_text(out)
            return rest
        self._held = ""
        self._mode = "start" if self.parallel else "done"
        return rest

    def _begin_call(self, name: str, out: list[ToolEvent]) -> None:
        call = Call(len(self.calls), new_call_id(), name)
        self.calls.append(call)
        self._open = call
        self._held = ""
        out.append(CallStart(call.index, call.id, name))
        self._stream_args(out, call.index)  # arguments written before the name

    def _stream_args(self, out: list[ToolEvent], index: int) -> None:
        scan = self._scan
        assert scan is not None
        if not scan.args_container:
            return
        text = scan.args_text()
        if len(text) > self._sent:
            out.append(CallArgs(index, text[self._sent:]))
            self._sent = len(text)

    def _end_call(self, out: list[ToolEvent], complete: bool) -> None:
        scan = self._scan
        assert scan is not None
        call = self._open
        assert call is not None
        self._open = None
        self._stream_args(out, call.index)
        if scan.args_container:
            args = scan.args_text()
        elif scan.args_start >= 0:  # a string or a literal: sent whole at the end
            raw = scan.args_text().strip()
            decoded = _decode(raw) if complete and raw.startswith('"') else None
            args = raw if decoded is None else decoded
            if args:
                out.append(CallArgs(call.index, args))
        else:
            args = "{}" if complete else ""
            if args:
                out.append(CallArgs(call.index, args))
        call.arguments, call.complete = args, complete
        out.append(CallEnd(call.index, args, complete))

    def _resolve(self, prefix: str) -> str:
        """A forced call's name cut short: the tool it must be, if only one fits."""
        fits = [n for n in self.names if n.startswith(prefix)]
        return fits[0] if len(fits) == 1 else prefix
