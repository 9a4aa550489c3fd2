"""Self-test goldens, computed on the host at bundle build: each recipe check is run on the
real model, its expected result recorded (signed with the manifest), and the bound it declares
verified on every CPU variant the bundle carries, so a check that the host itself fails is a
build error, not a device that falls back for nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from appliance.bundle import manifest as mf
from appliance.errors import FormatError, UsageError
from appliance.publish import recipe as rc

Log = Callable[[str], None]
Add = Callable[[str, Path], str]  # payload path, source file -> payload path


def compute(spec: rc.ModelSpec, variants: tuple[mf.Variant, ...], source: Callable[[str], Path],
            add: Add, work: Path, log: Log) -> tuple[mf.Check, ...]:
    """The model's checks with their expected results. `source` maps a payload path to the
    file on the host; `add` puts a new file (a clip) into the payload."""
    if not spec.checks:
        return ()
    cpu = [v for v in variants if v.backend is mf.Backend.CPU]
    if not cpu:
        raise FormatError(f"model {spec.id}: self-tests need a CPU variant to run on the host")
    log(f"self-test goldens for {spec.id}")
    if spec.task is mf.Task.CHAT:
        return tuple(_chat(spec, check, cpu, source) for check in spec.checks)
    if spec.task is mf.Task.EMBEDDINGS:
        return tuple(_embedding(spec, check, cpu, source) for check in spec.checks)
    return tuple(_clip(spec, i, check, cpu, source, add, work)
                 for i, check in enumerate(spec.checks, start=1))


def _chat(spec: rc.ModelSpec, check: rc.CheckSpec, cpu: list[mf.Variant],
          source: Callable[[str], Path]) -> mf.Check:
    from appliance.engines.chat import ChatEngine, EngineConfig
    from appliance.engines.selftest import greedy_answer
    answers = []
    for variant in cpu:
        engine = ChatEngine(source(variant.path), EngineConfig(parallel=1, ctx_per_seq=1024,
                                                               prefix_slots=0),
                            template=spec.defaults.chat_template)
        try:
            answers.append(greedy_answer(engine, check.prompt, check.max_tokens))
        finally:
            engine.close()
    for answer in answers:
        missing = [w for w in check.contains if w.lower() not in answer.lower()]
        if missing:
            raise FormatError(f"model {spec.id}: the self-test answer {answer[:120]!r} lacks "
                              f"{missing}", hint="change the check's prompt or contains")
    return mf.Check(input=check.prompt, expect=answers[0], contains=check.contains,
                    max_tokens=check.max_tokens)


def _embedding(spec: rc.ModelSpec, check: rc.CheckSpec, cpu: list[mf.Variant],
               source: Callable[[str], Path]) -> mf.Check:
    from appliance.engines.embed import EmbedEngine
    from appliance.engines.lanes import CoreLanes
    from appliance.engines.selftest import embedding
    vectors = {}
    for variant in cpu:
        engine = EmbedEngine(source(variant.path), spec.defaults.max_input_tokens or 512,
                             CoreLanes(2), max_batch=1)
        try:
            vectors[variant.quantization] = embedding(engine, check.text)
        finally:
            engine.close()
    golden = vectors.get("fp32", next(iter(vectors.values())))
    for quant, vec in vectors.items():
        cosine = float(vec @ golden) / max(float(np.linalg.norm(vec) * np.linalg.norm(golden)),
                                           1e-12)
        if cosine < check.min_cosine:
            raise FormatError(f"model {spec.id}: the {quant} variant's self-test cosine "
                              f"{cosine:.4f} is below {check.min_cosine}")
    return mf.Check(input=check.text, vector=tuple(round(float(x), 6) for x in golden),
                    min_cosine=check.min_cosine)


def _clip(spec: rc.ModelSpec, index: int, check: rc.CheckSpec, cpu: list[mf.Variant],
          source: Callable[[str], Path], add: Add, work: Path) -> mf.Check:
    from appliance.engines.lanes import CoreLanes
    from appliance.engines.selftest import transcript, wer
    from appliance.engines.transcribe import TranscribeEngine
    clip = work / f"{spec.id}-selftest-{index}.wav"
    speak(check.say, clip)
    path = add(f"{spec.folder}/selftest-{index}.wav", clip)
    for variant in cpu:
        engine = TranscribeEngine(source(variant.path), CoreLanes(2),
                                  languages=spec.defaults.languages)
        try:
            text = transcript(engine, clip)
        finally:
            engine.close()
        rate = wer(check.say, text)
        if rate > check.max_wer:
            raise FormatError(f"model {spec.id}: the self-test clip gives {text!r}, WER "
                              f"{rate:.2f} > {check.max_wer}")
    return mf.Check(input=path, expect=check.say, max_wer=check.max_wer)


def speak(text: str, out: Path) -> None:
    """A 16 kHz mono WAV of `text` by espeak-ng (deterministic for the same text)."""
    espeak, sox = shutil.which("espeak-ng"), shutil.which("sox")
    if espeak is None or sox is None:
        raise UsageError("self-test clips are spoken by espeak-ng and sox",
                         hint="apt-get install espeak-ng sox (make does this)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # made beside `out` and renamed onto it: two builds sharing the cache may speak it at once
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp:
        raw, wav = Path(tmp) / "raw.wav", Path(tmp) / "clip.wav"
        subprocess.run([espeak, "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True,
                       capture_output=True)
        # -D: no dither, which sox would add with random noise: the clip (and with it the
        # signed manifest, and the image that preloads the bundle) must come out the same
        subprocess.run([sox, "-D", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav)],
                       check=True, capture_output=True)
        os.replace(wav, out)
