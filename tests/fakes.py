"""Fake engines and an in-process client, so the route logic (tool calls, error mapping, SSE
framing, queue bounds) runs in the fast suite. They satisfy the protocols of
appliance/engines/base.py; the real engines are tested with the real models elsewhere.

The chat fake's tokens are Unicode code points: a prompt is its characters, an answer is a
scripted text (`FakeChat.answers`, first in first out) handed out one character per event.
"""

from __future__ import annotations

import hashlib
import io
import threading
import wave
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from factory import Factory
from openai import OpenAI
from starlette.testclient import TestClient

from appliance.api.app import create_app
from appliance.bundle import keys
from appliance.bundle import manifest as mf
from appliance.device import apikeys
from appliance.device.apikeys import ApiKey, hash_key
from appliance.device.install import import_bundle
from appliance.device.layout import Layout
from appliance.engines.chat import EngineBusy, GenerationRequest, GrammarError, NoTemplate
from appliance.engines.embed import BadTokens, TooLong
from appliance.engines.events import Finish, PromptScores, Stream, TokenEvent
from appliance.engines.lanes import Slots
from appliance.engines.transcribe import Segment, Transcript
from appliance.errors import ContextTooLong, Unsupported
from appliance.serve import hardware
from appliance.serve.runtime import Runtime
from appliance.serve.settings import Settings

KEY = "sk-test-fake"
CHAT, EMBED, WHISPER = "fake-chat", "fake-embed", "fake-whisper"


class FakeChat:
    ctx_per_seq = 256
    n_vocab = 0x110000

    def __init__(self, template: bool = True, max_queue: int = 4) -> None:
        self.answers: deque[str] = deque()
        self.template = template
        self.max_queue = max_queue
        self.running = 0
        self.prompts: list[str] = []
        self.requests: list[GenerationRequest] = []
        self.closed = False
        self.stats: dict[str, Any] = {"requests": 0}
        self.gate = threading.Event()  # tokens are held while a test keeps it closed
        self.gate.set()

    @property
    def active_count(self) -> int:
        return self.running

    @property
    def queue_depth(self) -> int:
        return 0

    def chat_prompt(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None,
                    parallel: bool = True) -> list[int]:
        if not self.template:
            raise NoTemplate("model fake has no chat template; use /v1/completions")
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        if tools:
            text = f"<tools>{len(tools)}{'' if parallel else '!'}" + text
        return self.tokenize(text, True, True)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return [ord(c) for c in text]

    def piece(self, token: int, special: bool = False) -> bytes:
        return chr(token).encode()

    def check_fits(self, n_prompt: int, max_tokens: int | None) -> int:
        room = self.ctx_per_seq - n_prompt
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise ContextTooLong(f"this model's context is {self.ctx_per_seq} tokens")
        return max_tokens if max_tokens is not None else room

    def make_sampler(self, req: GenerationRequest) -> Any:
        if req.grammar and "nonsense" in req.grammar:
            raise GrammarError("the response format could not be compiled into a grammar")
        return object()

    def discard(self, req: GenerationRequest) -> None:
        req.sampler = None

    def submit(self, req: GenerationRequest, stream: Stream) -> None:
        if self.running >= self.max_queue:
            self.discard(req)
            raise EngineBusy("the chat queue is full")
        self.prompts.append("".join(chr(t) for t in req.prompt))
        self.requests.append(req)
        answers = [self.answers.popleft() if self.answers else "Hello there!"
                   for _ in range(req.n)]
        self.running += 1
        self.stats["requests"] += 1
        threading.Thread(target=self._generate, args=(req, stream, answers), daemon=True).start()

    def _generate(self, req: GenerationRequest, stream: Stream, answers: list[str]) -> None:
        try:
            if req.prompt_logprobs:  # each prompt character: -0.5, its top alternative "?"
                stream.push(PromptScores([None] + [-0.5] * (len(req.prompt) - 1),
                                         [[]] + [[(t, -0.5), (ord("?"), -3.0)][:req.logprobs]
                                                 for t in req.prompt[1:]]))
            for index, answer in enumerate(answers):
                if not self._choice(req, stream, answer, index):
                    return
        finally:
            self.running -= 1

    def _choice(self, req: GenerationRequest, stream: Stream, answer: str, index: int) -> bool:
        """One choice, one character per token; False when the request ended (error, cancel)."""
        n_prompt = len(req.prompt)
        if answer.startswith("!error"):
            stream.push(TokenEvent("Hel", ord("H"), -0.1, index=index))
            stream.push(Finish("error", n_prompt, 1, error="engine failure", index=index))
            return False
        text, n = "", 0
        for ch in answer:
            self.gate.wait(10)
            if stream.cancelled:
                stream.push(Finish("cancelled", n_prompt, n, index=index))
                return False
            if n >= req.max_tokens:
                stream.push(Finish("length", n_prompt, n, index=index))
                return True
            text += ch
            n += 1
            hit = next((s for s in req.stop if s in text), None)
            if hit is not None:
                stream.push(Finish("stop", n_prompt, n, index=index, stop=hit))
                return True
            top = ([(ord(ch), -0.1), (ord("?"), -2.5)][:req.logprobs]
                   if req.logprobs else None)
            stream.push(TokenEvent(ch, ord(ch), -0.1 if req.logprobs is not None else None,
                                   top, index))
        stream.push(Finish("stop", n_prompt, n, index=index))
        return True

    def health(self) -> str:
        return "ok"

    def idle(self) -> bool:
        return self.running == 0

    def close(self) -> None:
        self.closed = True
        self.gate.set()


class FakeEmbed:
    max_tokens = 64
    dimensions = 8

    def __init__(self, max_queue: int = 4) -> None:
        self.stats: dict[str, Any] = {"requests": 0}
        self.hold = threading.Event()
        self.hold.set()
        self.queued = 0
        self.max_queue = max_queue

    def encode(self, texts: list[str]) -> list[list[int]]:
        out = [[101] + [len(w) for w in t.split()] + [102] for t in texts]
        for i, row in enumerate(out):
            if len(row) > self.max_tokens:
                raise TooLong(f"input[{i}] has {len(row)} tokens; at most {self.max_tokens}",
                              index=i, tokens=len(row))
        return out

    def wrap(self, token_lists: list[list[int]]) -> list[list[int]]:
        for i, ids in enumerate(token_lists):
            if any(not 0 <= t < 30000 for t in ids):
                raise BadTokens(f"input[{i}] has a token id outside 0..29999")
        return [[101, *ids, 102] for ids in token_lists]

    def submit(self, ids: list[list[int]]) -> Future[np.ndarray]:
        from appliance.errors import Busy
        if self.queued >= self.max_queue:
            raise Busy("the embeddings queue is full; retry shortly")
        self.queued += 1
        future: Future[np.ndarray] = Future()

        def run() -> None:
            self.hold.wait()
            rows = []
            for row in ids:
                seed = int.from_bytes(hashlib.sha256(str(row).encode()).digest()[:4], "little")
                vec = np.random.default_rng(seed).standard_normal(self.dimensions)
                rows.append(vec / np.linalg.norm(vec))
            self.queued -= 1
            future.set_result(np.array(rows, dtype=np.float32))

        threading.Thread(target=run, daemon=True).start()
        return future

    def health(self) -> str:
        return "ok"

    def idle(self) -> bool:
        return self.queued == 0

    def close(self) -> None:
        self.hold.set()


class FakeWhisper:
    multilingual = False
    languages = ("en",)

    def __init__(self, max_queue: int = 2) -> None:
        self.stats: dict[str, Any] = {"requests": 0}
        self.slots = Slots(max_queue, "transcription")
        self.gate = threading.Event()  # segments are held until the test opens it
        self.gate.set()

    def check(self, language: str | None, translate: bool) -> None:
        if translate:
            raise Unsupported("model", "this model is English-only and cannot translate")
        if language and language != "en":
            raise Unsupported("language", f"this model does not know the language {language!r}")

    def admit(self) -> None:
        self.slots.take()

    def leave(self) -> None:
        self.slots.give()

    def _segments(self, audio: np.ndarray) -> list[Segment]:
        seconds = len(audio) / 16000
        return [Segment(0, 0, 0.0, seconds / 2, " Hello", [1], 0.0, -0.1, 1.0, 0.01, []),
                Segment(1, 0, seconds / 2, seconds, " world.", [2], 0.0, -0.1, 1.0, 0.01, [])]

    def transcribe(self, audio: np.ndarray, **kw: Any) -> Transcript:
        return Transcript("en", len(audio) / 16000, self._segments(audio))

    def segments(self, audio: np.ndarray, **kw: Any) -> Any:
        for seg in self._segments(audio):
            self.gate.wait(10)
            yield seg

    def health(self) -> str:
        return "ok"

    def idle(self) -> bool:
        return self.slots.taken == 0

    def close(self) -> None:
        self.gate.set()


def wav(seconds: float = 1.0) -> bytes:
    """A 16 kHz mono WAV of a quiet tone."""
    t = np.arange(int(16000 * seconds)) / 16000
    samples = (np.sin(2 * np.pi * 440 * t) * 3000).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


FILES = {"models/tiny/LICENSE.txt": b"license", "models/tiny/weights.gguf": b"GGUF",
         "models/tiny/embed.onnx": b"onnx", "models/tiny/asr.bin": b"ct2",
         "models/tiny/clip.wav": wav()}


def bundle_doc(checks: dict[str, list[dict[str, Any]]] | None = None) -> Any:
    """An edit_doc for the factory: one model of each task, with `checks` by model id."""
    def edit(doc: dict[str, Any]) -> None:
        _bundle_doc(doc)
        for model in doc["models"]:
            if checks and checks.get(model["id"]):
                model["checks"] = checks[model["id"]]
    return edit


def _bundle_doc(doc: dict[str, Any]) -> None:
    """One model of each task, over the factory's files."""
    def model(model_id: str, task: str, fmt: str, quant: str, path: str) -> dict[str, Any]:
        return {"id": model_id, "task": task, "license": "models/tiny/LICENSE.txt",
                "variants": [{"backend": "cpu", "format": fmt, "quantization": quant,
                              "path": path, "memory_mb": 1, "files": [path]}]}
    doc["models"] = [model(CHAT, "chat", "gguf", "Q4_0", "models/tiny/weights.gguf"),
                     model(EMBED, "embeddings", "onnx", "int8", "models/tiny/embed.onnx"),
                     model(WHISPER, "transcription", "ct2", "int8", "models/tiny/asr.bin")]


@dataclass
class Fakes:
    chat: FakeChat = field(default_factory=FakeChat)
    embed: FakeEmbed = field(default_factory=FakeEmbed)
    whisper: FakeWhisper = field(default_factory=FakeWhisper)


def fake_runtime(root: Path, fakes: Fakes, settings: Settings) -> Runtime:
    key = Ed25519PrivateKey.generate()
    layout = Layout(root)
    layout.trust.path.mkdir(parents=True, exist_ok=True)
    # the app's key ring reads them from the live configuration, as on a device
    apikeys.write(layout.api_keys, {k.name: k for k in settings.api_keys})
    kid = keys.key_id(key.public_key())
    (layout.trust.path / f"{kid}.pub").write_bytes(keys.public_pem(key.public_key()))
    folder = root.parent / "fake-bundles"
    folder.mkdir(exist_ok=True)
    files = {k: v for k, v in FILES.items() if k != "models/tiny/clip.wav"}
    import_bundle(Factory(folder, key).bundle(files=files, edit_doc=_bundle_doc), layout)
    probe = hardware.Probe(machine="x86_64", system="Linux", cpu_model="fake", logical_cores=2,
                           physical_cores=2, simd=("avx2",), memory_mb=8192, available_mb=8192)
    loaders = {mf.Task.CHAT: lambda rt, inst, m: fakes.chat,
               mf.Task.EMBEDDINGS: lambda rt, inst, m: fakes.embed,
               mf.Task.TRANSCRIPTION: lambda rt, inst, m: fakes.whisper}
    runtime = Runtime(layout, settings, probe, loaders)
    runtime.load()
    return runtime


def fake_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"allowed_hosts": ("testserver",),
                            "api_keys": (ApiKey("test", hash_key(KEY)),)}
    return Settings(**{**base, **overrides})


def client(runtime: Runtime, settings: Settings) -> tuple[OpenAI, TestClient]:
    """The official SDK talking to the app in this process (no socket). The app's key ring
    reads the keys from the live configuration, as on a device: they are written there."""
    path = runtime.layout.api_keys
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        apikeys.write(path, {k.name: k for k in settings.api_keys})
    http = TestClient(create_app(runtime, settings))
    return OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http,
                  max_retries=0), http
