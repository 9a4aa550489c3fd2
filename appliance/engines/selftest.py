"""Running a bundle's signed self-tests (`Check`, appliance/bundle/manifest.py) on an engine.

The same code computes the expected results on the host when a bundle is built and checks
them on the device, on the variant the device chose, before a sequence goes live."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.bundle import manifest as mf
from appliance.engines.base import ChatBackend, EmbedBackend, TranscribeBackend
from appliance.engines.chat import GenerationRequest, Sampling
from appliance.engines.events import Finish, PromptScores, Stream


@dataclass(frozen=True)
class CheckResult:
    model: str
    passed: bool
    detail: str
    figure: float | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def greedy_answer(engine: ChatBackend, message: str, max_tokens: int) -> str:
    prompt = engine.chat_prompt([{"role": "user", "content": message}])
    stream = Stream()
    engine.submit(GenerationRequest(prompt, max_tokens, Sampling(temperature=0.0)), stream)
    text = ""
    while True:
        event = stream.get_sync(timeout=300)
        if isinstance(event, PromptScores):  # not asked for here
            continue
        text += event.text
        if isinstance(event, Finish):
            if event.reason == "error":
                raise RuntimeError(event.error or "generation failed")
            return text


def embedding(engine: EmbedBackend, text: str) -> np.ndarray:
    return np.asarray(engine.submit(engine.encode([text])).result(timeout=300)[0])


def transcript(engine: TranscribeBackend, clip: Path, language: str | None = None) -> str:
    from appliance.engines import audio
    pcm = audio.decode(clip.read_bytes(), 60)
    kw = {"language": language, "prompt": None, "temperature": 0.0, "translate": False,
          "words": False}
    return engine.transcribe(pcm, **kw).text


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance over the reference's words (case and
    punctuation ignored)."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def run(model: mf.Model, engine: Any, files: Path) -> list[CheckResult]:
    """Every check of `model` on `engine`; `files` is the bundle's payload folder (clips)."""
    out = []
    for check in model.checks:
        start = time.monotonic()
        try:
            result = _one(model, engine, check, files)
        except Exception as exc:  # a check that cannot even run has failed
            result = CheckResult(model.id, False, f"{type(exc).__name__}: {exc}"[:300])
        out.append(CheckResult(result.model, result.passed, result.detail, result.figure,
                               round(time.monotonic() - start, 3)))
    return out


def _one(model: mf.Model, engine: Any, check: mf.Check, files: Path) -> CheckResult:
    if model.task is mf.Task.CHAT:
        answer = greedy_answer(engine, check.input, check.max_tokens)
        missing = [w for w in check.contains if w.lower() not in answer.lower()]
        detail = (f"answer {answer[:80]!r} " +
                  (f"lacks {missing}" if missing else f"contains {list(check.contains)}"))
        return CheckResult(model.id, not missing, detail)
    if model.task is mf.Task.EMBEDDINGS:
        got = embedding(engine, check.input)
        want = np.asarray(check.vector, dtype=np.float32)
        if got.shape != want.shape:
            return CheckResult(model.id, False, f"{got.shape[0]} dimensions, expected "
                                                f"{want.shape[0]}")
        norms = float(np.linalg.norm(got) * np.linalg.norm(want))
        cosine = float(got @ want) / max(norms, 1e-12)
        ok = cosine >= check.min_cosine
        return CheckResult(model.id, ok, f"cosine {cosine:.4f} "
                                         f"{'>=' if ok else '<'} {check.min_cosine}", cosine)
    text = transcript(engine, files / check.input)
    rate = wer(check.expect, text)
    ok = rate <= check.max_wer
    return CheckResult(model.id, ok, f"WER {rate:.2f} {'<=' if ok else '>'} {check.max_wer} "
                                     f"({text.strip()[:80]!r})", rate)
