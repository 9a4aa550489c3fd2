"""POST /v1/audio/transcriptions and /v1/audio/translations (multipart, as OpenAI's).

The form is read with fixed limits and every field is checked by name: an unknown field is a 400,
not something silently ignored. The upload's file name is never used, as a path or otherwise; the
format is found from the content. A translation may name the language spoken (`language`, an
extension: OpenAI's translations detect it); the text is always English.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile

from appliance.api.generation import DISCONNECT_POLL, allowed_models, runtime
from appliance.api.sse import DONE, sse, sse_error
from appliance.engines import audio
from appliance.engines.base import TranscribeBackend
from appliance.engines.transcribe import Segment, Transcript
from appliance.errors import RequestError, Unsupported

router = APIRouter()
log = logging.getLogger(__name__)
# Transcriptions run for seconds to minutes: on threads of their own, so that they can never
# take the default executor's few threads from the short jobs of other requests (tokenising).
# Past the core lanes they wait inside (engines/lanes.py); past max_queue they are refused.
AUDIO_WORKERS = ThreadPoolExecutor(32, thread_name_prefix="audio")
FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature",
          "timestamp_granularities[]", "stream"}
LANGUAGE_NAMES = {
    "en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian",
    "pt": "portuguese", "nl": "dutch", "pl": "polish", "ru": "russian", "uk": "ukrainian",
    "zh": "chinese", "ja": "japanese", "ko": "korean", "ar": "arabic", "tr": "turkish",
    "sv": "swedish", "da": "danish", "fi": "finnish", "no": "norwegian", "cs": "czech",
}


class _Form:
    """The parsed, checked form of one request."""

    def __init__(self, fields: dict[str, Any], translate: bool) -> None:
        self.translate = translate
        self.model = _text(fields, "model", required=True) or ""
        self.language = _text(fields, "language")  # spoken; for translations too
        if self.language is not None and not (self.language.isalpha()
                                              and 2 <= len(self.language) <= 3):
            raise Unsupported("language", "language must be an ISO-639-1 code such as `en`")
        self.prompt = _text(fields, "prompt")
        self.format = _text(fields, "response_format") or "json"
        if self.format not in FORMATS:
            raise Unsupported("response_format", f"response_format must be one of {FORMATS}")
        raw_temp = _text(fields, "temperature")
        try:
            self.temperature = float(raw_temp) if raw_temp is not None else None
        except ValueError:
            raise Unsupported("temperature", "temperature must be a number") from None
        if self.temperature is not None and not 0 <= self.temperature <= 1:
            raise Unsupported("temperature", "temperature must be between 0 and 1")
        grains = fields.get("timestamp_granularities[]", [])
        if set(grains) - {"word", "segment"}:
            raise Unsupported("timestamp_granularities[]", "use `word` and/or `segment`")
        if grains and self.format != "verbose_json":
            raise Unsupported("timestamp_granularities[]",
                              "timestamp_granularities needs response_format verbose_json")
        self.words = "word" in grains
        self.segments = "segment" in grains or not grains
        self.stream = (_text(fields, "stream") or "false").lower() == "true"
        if self.stream and self.format not in ("json", "text"):
            raise Unsupported("stream", "streaming gives text deltas: use json or text")


def _text(fields: dict[str, Any], name: str, required: bool = False) -> str | None:
    values = fields.get(name, [])
    if len(values) > 1:
        raise Unsupported(name, f"{name} is given more than once")
    if not values:
        if required:
            raise Unsupported(name, f"{name} is required")
        return None
    if not isinstance(values[0], str):
        raise Unsupported(name, f"{name} must be a text field")
    return str(values[0])


async def _read_form(request: Request) -> tuple[dict[str, list[Any]], bytes]:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise RequestError("send the audio as multipart/form-data", param="file")
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as exc:  # starlette raises several types for malformed multipart
        raise RequestError(f"the form could not be read: {exc}", param="file") from None
    try:  # the form spools the upload to a temporary file: closed on every path
        fields: dict[str, list[Any]] = {}
        for key, value in form.multi_items():
            if key not in FIELDS:
                raise Unsupported(key, f"Unrecognized request argument supplied: {key}")
            fields.setdefault(key, []).append(value)
        files = fields.pop("file", [])
        if len(files) != 1 or not isinstance(files[0], UploadFile):
            raise Unsupported("file", "exactly one audio file is required in the `file` field")
        data = await files[0].read()
    finally:
        await form.close()
    if not data:
        raise Unsupported("file", "the audio file is empty")
    return fields, data


def _stamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def render(t: Transcript, form: _Form) -> Response:
    usage = {"type": "duration", "seconds": round(t.duration)}
    if form.format == "text":
        return PlainTextResponse(t.text + "\n")
    if form.format == "srt":
        body = "".join(f"{i}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{s.text.strip()}\n\n"
                       for i, s in enumerate(t.segments, start=1))
        return PlainTextResponse(body, media_type="application/x-subrip")
    if form.format == "vtt":
        body = "WEBVTT\n\n" + "".join(
            f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n{s.text.strip()}\n\n"
            for s in t.segments)
        return PlainTextResponse(body, media_type="text/vtt")
    if form.format == "json":
        return JSONResponse({"text": t.text, "usage": usage})
    out: dict[str, Any] = {
        "task": "translate" if form.translate else "transcribe",
        "language": "english" if form.translate else LANGUAGE_NAMES.get(t.language, t.language),
        "duration": round(t.duration, 3), "text": t.text, "usage": usage,
    }
    if form.segments:
        out["segments"] = [_segment_json(s) for s in t.segments]
    if form.words:
        out["words"] = [{"word": w.word.strip(), "start": round(w.start, 3),
                         "end": round(w.end, 3)} for s in t.segments for w in s.words]
    return JSONResponse(out)


def _segment_json(s: Segment) -> dict[str, Any]:
    return {"id": s.id, "seek": s.seek, "start": round(s.start, 3), "end": round(s.end, 3),
            "text": s.text, "tokens": s.tokens, "temperature": s.temperature,
            "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
            "no_speech_prob": s.no_speech_prob}


async def _handle(request: Request, translate: bool) -> Response:
    rt = runtime(request)
    fields, data = await _read_form(request)
    form = _Form(fields, translate)
    served = rt.transcription(form.model, allowed_models(request))
    engine = served.engine
    engine.check(form.language, translate)
    engine.admit()  # a place in the queue, or Busy; given back when decoding has ended
    handed_over = False
    loop = asyncio.get_running_loop()
    try:
        try:
            pcm = await loop.run_in_executor(AUDIO_WORKERS, audio.decode, data,
                                             rt.settings.max_audio_seconds)
        except audio.AudioError as exc:
            raise Unsupported("file", exc.message) from None
        kw = {"language": form.language, "prompt": form.prompt,
              "temperature": form.temperature, "translate": translate, "words": form.words}
        if form.stream:
            events = _stream(engine, pcm, kw, request)  # its worker owns the place now
            handed_over = True
            return StreamingResponse(events, media_type="text/event-stream")
        transcript = await loop.run_in_executor(
            AUDIO_WORKERS, functools.partial(engine.transcribe, pcm, **kw))
    finally:
        if not handed_over:
            engine.leave()
    return render(transcript, form)


def _stream(engine: TranscribeBackend, pcm: Any, kw: dict[str, Any],
                  request: Request) -> AsyncIterator[bytes]:
    """Text deltas per segment as server-sent events, then the whole text.

    Decoding starts at once on a worker thread, which owns the queue place and gives it back
    when it ends, whether or not this generator ever runs: a client that leaves before the
    first chunk is never iterated for, so its place cannot depend on this generator."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
    gone = threading.Event()  # the client left: stop decoding after the current segment

    def work() -> None:
        try:
            for seg in engine.segments(pcm, **kw):
                if gone.is_set():
                    return
                loop.call_soon_threadsafe(queue.put_nowait, seg.text)
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except BaseException as exc:  # handed to the client as an error event
            log.exception("streamed transcription failed")
            with contextlib.suppress(RuntimeError):  # the loop may be gone
                loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            engine.leave()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL)
        gone.set()

    AUDIO_WORKERS.submit(work)
    watcher = asyncio.create_task(watch())
    return _events(queue, gone, watcher)


async def _events(queue: asyncio.Queue[str | BaseException | None], gone: threading.Event,
                  watcher: asyncio.Task[None]) -> AsyncIterator[bytes]:
    parts: list[str] = []
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                yield sse_error("transcription failed")
                return
            text = item if parts else item.lstrip()
            parts.append(text)
            yield sse({"type": "transcript.text.delta", "delta": text})
        yield sse({"type": "transcript.text.done", "text": "".join(parts).strip()})
        yield DONE
    finally:
        gone.set()
        watcher.cancel()


def _form_doc(translate: bool) -> dict[str, Any]:
    """The form for the OpenAPI document (the route reads it itself, so FastAPI cannot tell)."""
    fields: dict[str, Any] = {
        "file": {"type": "string", "format": "binary",
                 "description": "wav, mp3, ogg, flac, m4a or webm"},
        "model": {"type": "string"},
        "prompt": {"type": "string"},
        "response_format": {"enum": list(FORMATS), "default": "json"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "stream": {"type": "boolean", "description": "text deltas as server-sent events"},
        "timestamp_granularities[]": {"type": "array", "items": {"enum": ["word", "segment"]},
                                      "description": "with verbose_json"},
        "language": {"type": "string", "description": (
            "The language spoken, ISO-639-1 such as de (otherwise detected); the text is "
            "always English" if translate else "ISO-639-1, such as en")}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "model"], "properties": fields}}}}}


@router.post("/v1/audio/transcriptions", response_model=None, openapi_extra=_form_doc(False))
async def transcriptions(request: Request) -> Response:
    return await _handle(request, translate=False)


@router.post("/v1/audio/translations", response_model=None, openapi_extra=_form_doc(True))
async def translations(request: Request) -> Response:
    return await _handle(request, translate=True)
