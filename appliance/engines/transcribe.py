"""Transcription engine: faster-whisper (CTranslate2) from the bundle's local folder only.

The model is always a folder path, never a size name: faster-whisper downloads when given a name,
and on the appliance a missing file is an error, never a download. int8 on the CPU, float16 on
CUDA. Each transcription holds one core lane (see lanes.py) and runs on one thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.engines.lanes import CoreLanes, Slots
from appliance.errors import FormatError, Unsupported

__all__ = ["Segment", "TranscribeEngine", "Transcript", "Word"]
REQUIRED = ("model.bin", "config.json", "tokenizer.json")


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word]


@dataclass(frozen=True)
class Transcript:
    language: str
    duration: float
    segments: list[Segment]

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments).strip()


class TranscribeEngine:
    def __init__(self, folder: Path, lanes: CoreLanes, device: str = "cpu",
                 compute_type: str = "int8", threads: int = 1,
                 languages: tuple[str, ...] = (), max_queue: int = 64) -> None:
        """Load a CTranslate2 whisper folder. `device` cpu or cuda; `compute_type` int8 (CPU) or
        float16 (CUDA); `threads` CPU threads per transcription; `languages` the ones the bundle
        offers (empty: all the model knows); `max_queue` transcriptions admitted at once
        (decoding or waiting for a core lane) before Busy."""
        for name in REQUIRED:
            if not (folder / name).is_file():
                raise FormatError(f"the whisper model folder lacks {name}",
                                  hint="the bundle is incomplete; rebuild it")
        from faster_whisper import WhisperModel

        self.model = WhisperModel(str(folder), device=device, compute_type=compute_type,
                                  cpu_threads=threads, num_workers=1, local_files_only=True)
        self.lanes = lanes
        self.multilingual = bool(self.model.model.is_multilingual)
        # the bundle may narrow what the model knows; an unknown code is the client's error,
        # not a ValueError inside faster-whisper (a 500)
        self.languages = languages or tuple(self.model.supported_languages)
        self.stats = {"requests": 0, "audio_seconds": 0.0}
        self.slots = Slots(max_queue, "transcription")

    def admit(self) -> None:
        self.slots.take()

    def leave(self) -> None:
        self.slots.give()

    def check(self, language: str | None, translate: bool) -> None:
        if translate and not self.multilingual:
            raise Unsupported("model", "this model is English-only and cannot translate; use "
                                       "/v1/audio/transcriptions, or a multilingual model")
        if language and self.languages and language not in self.languages:
            known = ", ".join(self.languages[:12]) + (", ..." if len(self.languages) > 12 else "")
            raise Unsupported("language", f"this model does not know the language {language!r}; "
                                          f"it knows: {known}")

    def stream(self, audio: np.ndarray, *, language: str | None, prompt: str | None,
               temperature: float | None, translate: bool,
               words: bool) -> tuple[Iterator[Segment], str, float]:
        """Segments as they are decoded, the language and the duration. The caller iterates the
        segments while holding a lane (`self.lanes.borrow`)."""
        self.check(language, translate)
        temps: Any = [temperature] if temperature is not None else [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
        segments, info = self.model.transcribe(
            audio, language=language or (None if self.multilingual else "en"),
            task="translate" if translate else "transcribe", initial_prompt=prompt or None,
            temperature=temps, word_timestamps=words, vad_filter=False, beam_size=5)
        duration = float(info.duration)
        self.stats["requests"] += 1
        self.stats["audio_seconds"] += duration

        def convert() -> Iterator[Segment]:
            for s in segments:
                yield Segment(s.id, s.seek, s.start, s.end, s.text, list(s.tokens),
                              s.temperature or 0.0, s.avg_logprob, s.compression_ratio,
                              s.no_speech_prob,
                              [Word(w.word, w.start, w.end) for w in s.words or []])

        return convert(), info.language, duration

    def transcribe(self, audio: np.ndarray, **kw: Any) -> Transcript:
        with self.lanes.borrow("transcription"):
            segments, language, duration = self.stream(audio, **kw)
            return Transcript(language, duration, list(segments))

    def segments(self, audio: np.ndarray, **kw: Any) -> Iterator[Segment]:
        with self.lanes.borrow("transcription"):
            found, _, _ = self.stream(audio, **kw)
            yield from found

    def idle(self) -> bool:
        return self.slots.taken == 0

    def health(self) -> str:
        return "ok"

    def close(self) -> None:
        del self.model
