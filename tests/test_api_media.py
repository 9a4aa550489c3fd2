"""Embeddings and transcription end to end: a real server with the demo bundle, the official
OpenAI SDK, and speech made at test time with espeak-ng from known sentences."""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jiwer
import jsonschema
import numpy as np
import openai
import pytest
import srt
import webvtt
from conftest import Server, start_server

pytestmark = pytest.mark.models
EMBED = "all-minilm-l6-v2"
WHISPER = "whisper-tiny.en"
SENTENCES = [
    "The weather today is sunny with a light breeze from the west.",
    "Please send the quarterly report to the finance team by Friday.",
    "My favorite fruit is a ripe banana.",
]
# Word error rate of whisper tiny.en on espeak-ng's robotic voice, over all sentences
# (measured 0.10 here: "is a" heard as "in the").
WER_BOUND = 0.2
REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "embed_reference.json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           demo_bundles: tuple[Path, Path]) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("media") / "root", demo_bundles,
                       "[server]\nmax_body_mb = 2\n[limits]\nmax_embedding_inputs = 64\n"
                       "max_audio_seconds = 30\n")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=server.key, max_retries=0)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One wav per sentence, plus the first one in other containers."""
    folder = tmp_path_factory.mktemp("speech")
    files = {}
    for i, text in enumerate(SENTENCES):
        wav = folder / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(wav), text],
                       check=True)
        files[f"s{i}"] = wav
    for ext in ("flac", "ogg"):
        out = folder / f"s0.{ext}"
        subprocess.run(["sox", str(files["s0"]), str(out)], check=True)
        files[ext] = out
    for ext, fmt, codec in (("mp3", "mp3", "libmp3lame"), ("m4a", "mp4", "aac"),
                            ("webm", "webm", "libopus")):
        files[ext] = _encode(files["s0"], folder / f"s0.{ext}", fmt, codec)
    long_silence = folder / "long.flac"  # 60 s of silence: a few KB of FLAC
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(long_silence), "trim", "0", "60"],
                   check=True)
    files["long"] = long_silence
    return files


def _encode(wav: Path, out: Path, fmt: str, codec: str) -> Path:
    """Re-encode with PyAV (sox here has no mp3, m4a or webm writer)."""
    import av
    with av.open(str(wav)) as src, av.open(str(out), "w", format=fmt) as dst:
        stream = dst.add_stream(codec, rate=48000 if codec == "libopus" else 16000)
        stream.layout = "mono"
        resampler = av.AudioResampler(format=stream.format.name, layout="mono",
                                      rate=stream.rate)
        for frame in src.decode(audio=0):
            frame.pts = None
            for r in resampler.resample(frame):
                dst.mux(stream.encode(r))
        dst.mux(stream.encode(None))
    return out


# --- embeddings -------------------------------------------------------------------------------

def test_embeddings_match_reference(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model=EMBED, input=REFERENCE["sentences"])
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert got.shape == (len(REFERENCE["sentences"]), 384)
    assert [d.index for d in r.data] == list(range(len(REFERENCE["sentences"])))
    cos = (got * np.array(REFERENCE["vectors"], dtype=np.float32)).sum(axis=1)
    assert cos.min() >= 0.98  # the int8 variant, which the CPU probe picks
    assert r.usage.prompt_tokens == r.usage.total_tokens > len(REFERENCE["sentences"]) * 3


def test_a_text_gets_one_vector_however_it_is_batched(client: openai.OpenAI) -> None:
    """Index in batches, query one at a time: the int8 variant must give the same vector."""
    batch = client.embeddings.create(model=EMBED, input=REFERENCE["sentences"])
    for i in (0, len(REFERENCE["sentences"]) - 1):
        alone = client.embeddings.create(model=EMBED, input=REFERENCE["sentences"][i])
        diff = np.abs(np.array(alone.data[0].embedding) - np.array(batch.data[i].embedding))
        assert diff.max() < 1e-4


def test_base64_and_dimensions(client: openai.OpenAI) -> None:
    plain = client.embeddings.create(model=EMBED, input="hello there")
    raw = client.embeddings.with_raw_response.create(model=EMBED, input="hello there",
                                                     encoding_format="base64")
    b64 = json.loads(raw.text)["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    assert np.allclose(decoded, plain.data[0].embedding, atol=1e-6)
    short = client.embeddings.create(model=EMBED, input="hello there", dimensions=64)
    vec = np.array(short.data[0].embedding)
    assert vec.shape == (64,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    assert np.allclose(vec, np.array(plain.data[0].embedding[:64]) /
                       np.linalg.norm(plain.data[0].embedding[:64]), atol=1e-5)


def test_token_id_input(client: openai.OpenAI) -> None:
    by_text = client.embeddings.create(model=EMBED, input="hello world")
    # BERT word-piece ids of "hello world"; the server adds [CLS] and [SEP]
    by_ids = client.embeddings.create(model=EMBED, input=[[7592, 2088]])
    assert np.allclose(by_ids.data[0].embedding, by_text.data[0].embedding, atol=1e-5)


@pytest.mark.parametrize("kwargs,param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["x"] * 65}, "input"),
    ({"input": "word " * 300}, "input"),
    ({"input": [[10**9]]}, "input"),
    ({"input": [[-1]]}, "input"),
    ({"input": "x", "dimensions": 1000}, "dimensions"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
])
def test_embedding_errors(client: openai.OpenAI, kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=EMBED, **kwargs)  # type: ignore[arg-type]
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body


def test_embeddings_of_a_chat_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="smollm2-135m-instruct", input="x")


def test_concurrent_requests_are_micro_batched(server: Server, client: openai.OpenAI) -> None:
    headers = {"Authorization": f"Bearer {server.key}"}

    def batches() -> int:
        text = httpx.get(f"{server.base}/metrics", headers=headers).text
        line = next(x for x in text.splitlines() if x.startswith("appliance_embeddings_batches"))
        return int(float(line.split()[-1]))

    before = batches()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: client.embeddings.create(
            model=EMBED, input=f"sentence number {i}"), range(48)))
    assert len(results) == 48
    assert batches() - before < 48


# --- rerank (POST /v1/rerank: cosines of the embeddings model) --------------------------------

WEATHER = "Will it rain tomorrow, or will the weather be sunny?"
UNRELATED = ["Please send the quarterly report to the finance team by Friday.",
             "My favorite fruit is a ripe banana.",
             "The train to Berlin leaves from platform nine.",
             "Add two eggs and a cup of flour, then stir well."]


def _rerank(server: Server, **fields: object) -> httpx.Response:
    """The OpenAI SDK has no rerank call: plain httpx, as a Cohere- or Jina-style client."""
    return httpx.post(f"{server.base}/v1/rerank", timeout=60,
                      headers={"Authorization": f"Bearer {server.key}"},
                      json={"model": EMBED, **fields})


def test_rerank_puts_the_weather_first(server: Server, client: openai.OpenAI) -> None:
    documents = [*UNRELATED[:2], SENTENCES[0], *UNRELATED[2:]]
    r = _rerank(server, query=WEATHER, documents=documents)
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert results[0]["document"] == {"text": SENTENCES[0]}
    assert results[0]["index"] == 2 and len(results) == len(documents)
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert scores[0] - scores[1] > 0.1, scores
    # the tokens are the embeddings model's, counted as /v1/embeddings counts them
    usage = client.embeddings.create(model=EMBED, input=[WEATHER, *documents]).usage
    assert body["usage"] == {"prompt_tokens": usage.prompt_tokens,
                             "total_tokens": usage.prompt_tokens}


def test_rerank_scores_are_the_embeddings_cosines(server: Server,
                                                  client: openai.OpenAI) -> None:
    documents = [WEATHER, SENTENCES[0], {"text": UNRELATED[0]}]
    r = _rerank(server, query=WEATHER, documents=documents, top_n=2, return_documents=False)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1]
    assert all(set(x) == {"index", "relevance_score"} for x in results)
    assert results[0]["relevance_score"] == pytest.approx(1.0, abs=1e-5)  # itself
    vectors = client.embeddings.create(model=EMBED, input=[WEATHER, SENTENCES[0]]).data
    cosine = float(np.dot(vectors[0].embedding, vectors[1].embedding))
    assert results[1]["relevance_score"] == pytest.approx(cosine, abs=1e-4)


def test_rerank_refusals(server: Server) -> None:
    chat = _rerank(server, model="smollm2-135m-instruct", query="q", documents=["d"])
    assert chat.status_code == 400 and "is a chat model" in chat.json()["error"]["message"]
    long = _rerank(server, query="q", documents=["d", "word " * 300])
    assert long.status_code == 400, long.text
    assert long.json()["error"]["param"] == "documents.1"
    assert long.json()["error"]["code"] == "context_length_exceeded"
    many = _rerank(server, query="q", documents=["d"] * 64)  # max_embedding_inputs = 64
    assert many.status_code == 400 and many.json()["error"]["param"] == "documents"


def test_rerank_latency_of_ten_documents(server: Server, client: openai.OpenAI) -> None:
    """Shown with -s; beside it, /v1/embeddings of the same eleven texts."""
    documents = [*SENTENCES, *UNRELATED, *REFERENCE["sentences"]][:10]
    assert len(documents) == 10

    def median(call: Callable[[], object]) -> float:
        call()  # warm
        took = []
        for _ in range(7):
            start = time.perf_counter()
            call()
            took.append(time.perf_counter() - start)
        return sorted(took)[3]

    body = {"model": EMBED, "query": WEATHER, "documents": documents}
    with httpx.Client(base_url=server.base, timeout=60,  # one connection, as the SDK's
                      headers={"Authorization": f"Bearer {server.key}"}) as http:
        rerank = median(lambda: http.post("/v1/rerank", json=body).raise_for_status())
    embed = median(lambda: client.embeddings.create(model=EMBED, input=[WEATHER, *documents]))
    print(f"10 documents: rerank median {rerank * 1000:.0f} ms, "
          f"embeddings of the same texts {embed * 1000:.0f} ms")
    assert rerank < 5.0  # a generous bound on a shared two-core machine


# --- transcription ----------------------------------------------------------------------------

def test_transcription_word_error_rate(client: openai.OpenAI, speech: dict[str, Path]) -> None:
    heard = []
    for i in range(len(SENTENCES)):
        with speech[f"s{i}"].open("rb") as f:
            heard.append(client.audio.transcriptions.create(model=WHISPER, file=f).text)
    tf = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(),
                        jiwer.RemoveMultipleSpaces(), jiwer.Strip(),
                        jiwer.ReduceToListOfListOfWords()])
    error = jiwer.wer(SENTENCES, heard, reference_transform=tf, hypothesis_transform=tf)
    assert error <= WER_BOUND, (heard, error)


@pytest.mark.parametrize("container", ["flac", "ogg", "mp3", "m4a", "webm"])
def test_other_containers(client: openai.OpenAI, speech: dict[str, Path], container: str) -> None:
    with speech[container].open("rb") as f:
        text = client.audio.transcriptions.create(model=WHISPER, file=f).text
    assert "weather" in text.lower()


def test_text_srt_vtt(client: openai.OpenAI, speech: dict[str, Path]) -> None:
    def ask(fmt: str) -> str:
        with speech["s1"].open("rb") as f:
            out = client.audio.transcriptions.create(model=WHISPER, file=f,
                                                     response_format=fmt)  # type: ignore[call-overload]
        return str(out)

    assert "report" in ask("text").lower()
    subs = list(srt.parse(ask("srt")))
    assert subs and all(s.start < s.end for s in subs)
    assert all(a.end <= b.start for a, b in itertools.pairwise(subs))
    captions = webvtt.from_string(ask("vtt"))
    times = [(c.start_in_seconds, c.end_in_seconds) for c in captions]
    assert times and all(s < e for s, e in times)
    assert "report" in " ".join(c.text for c in captions).lower()


VERBOSE_SCHEMA = {
    "type": "object",
    "required": ["task", "language", "duration", "text", "segments", "words"],
    "properties": {
        "task": {"const": "transcribe"}, "language": {"const": "english"},
        "duration": {"type": "number", "exclusiveMinimum": 0}, "text": {"type": "string"},
        "segments": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["id", "seek", "start", "end", "text", "tokens", "temperature",
                         "avg_logprob", "compression_ratio", "no_speech_prob"],
            "properties": {"start": {"type": "number"}, "end": {"type": "number"},
                           "tokens": {"type": "array", "items": {"type": "integer"}}}}},
        "words": {"type": "array", "minItems": 3, "items": {
            "type": "object", "required": ["word", "start", "end"],
            "properties": {"word": {"type": "string"}, "start": {"type": "number"},
                           "end": {"type": "number"}}}},
    },
}


def test_verbose_json_with_words(server: Server, speech: dict[str, Path]) -> None:
    with speech["s2"].open("rb") as f:
        r = httpx.post(f"{server.base}/v1/audio/transcriptions",
                       headers={"Authorization": f"Bearer {server.key}"}, timeout=120,
                       files={"file": ("x.wav", f, "audio/wav")},
                       data={"model": WHISPER, "response_format": "verbose_json",
                             "timestamp_granularities[]": ["word", "segment"]})
    assert r.status_code == 200, r.text
    body = r.json()
    jsonschema.validate(body, VERBOSE_SCHEMA)
    starts = [w["start"] for w in body["words"]]
    assert starts == sorted(starts) and "banana" in body["text"].lower()


def test_sdk_verbose_json(client: openai.OpenAI, speech: dict[str, Path]) -> None:
    with speech["s2"].open("rb") as f:
        r = client.audio.transcriptions.create(model=WHISPER, file=f,
                                               response_format="verbose_json",
                                               timestamp_granularities=["word"])
    assert r.words and r.words[0].end > r.words[0].start and r.duration > 1


def test_streamed_transcription(client: openai.OpenAI, speech: dict[str, Path]) -> None:
    with speech["s0"].open("rb") as f:
        events = list(client.audio.transcriptions.create(model=WHISPER, file=f, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(done) == 1 and done[0].text == deltas.strip() and "weather" in deltas.lower()


def test_filename_is_never_a_path(server: Server, speech: dict[str, Path],
                                  tmp_path: Path) -> None:
    target = tmp_path / "planted"
    with speech["s0"].open("rb") as f:
        r = httpx.post(f"{server.base}/v1/audio/transcriptions", timeout=120,
                       headers={"Authorization": f"Bearer {server.key}"},
                       files={"file": (f"../../../../{target}", f, "audio/wav")},
                       data={"model": WHISPER, "response_format": "text"})
    assert r.status_code == 200 and "weather" in r.text.lower()
    assert not target.exists()


def _post(server: Server, data: dict[str, object], content: bytes,
          name: str = "a.wav") -> httpx.Response:
    return httpx.post(f"{server.base}/v1/audio/transcriptions", timeout=120,
                      headers={"Authorization": f"Bearer {server.key}"},
                      files={"file": (name, content, "application/octet-stream")},
                      data={"model": WHISPER, **data})


@pytest.mark.parametrize("data,param", [
    ({"language": "de"}, "language"),
    ({"language": "english!"}, "language"),
    ({"response_format": "docx"}, "response_format"),
    ({"temperature": "hot"}, "temperature"),
    ({"timestamp_granularities[]": "word"}, "timestamp_granularities[]"),
    ({"stream": "true", "response_format": "srt"}, "stream"),
    ({"chunking_strategy": "auto"}, "chunking_strategy"),
])
def test_bad_transcription_fields(server: Server, speech: dict[str, Path],
                                  data: dict[str, object], param: str) -> None:
    r = _post(server, data, speech["s0"].read_bytes())
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(2000), "decoded"),
    (bytes(range(256)) * 40, "decoded"),
])
def test_not_audio(server: Server, content: bytes, needle: str) -> None:
    r = _post(server, {}, content)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_duration_and_size_limits(server: Server, speech: dict[str, Path]) -> None:
    long = _post(server, {}, speech["long"].read_bytes(), "long.flac")
    assert long.status_code == 400 and "longer than the 30 s" in long.json()["error"]["message"]
    big = _post(server, {}, bytes(3 * 1024 * 1024))
    assert big.status_code == 413


def test_translation_needs_a_multilingual_model(client: openai.OpenAI,
                                                speech: dict[str, Path]) -> None:
    with speech["s0"].open("rb") as f, pytest.raises(openai.BadRequestError) as info:
        client.audio.translations.create(model=WHISPER, file=f)
    assert "English-only" in info.value.body["message"]  # type: ignore[index]
