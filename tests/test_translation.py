"""Translation into English with a multilingual whisper (bundles/multilingual.toml): a real
server, the official OpenAI SDK, and German speech made at test time by espeak-ng.

espeak-ng's German is robotic and whisper base is small: the translation is rough ("Good
morning. I'm going to have a cup of coffee ... on the table"), so the check is on content words,
in English, that a wrong model, an English-only one, or a transcription instead of a
translation does not give."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Server, start_server

pytestmark = pytest.mark.models
WHISPER = "whisper-base"
GERMAN = ("Guten Morgen. Ich trinke jeden Morgen eine Tasse Kaffee. Das Buch liegt auf dem "
          "Tisch. Mein Bruder hat einen kleinen Hund.")
# English words of the sentence above; 3 of 4 were heard at both 130 and 150 words a minute
ENGLISH = ("morning", "cup", "coffee", "table")
# the German ones: a transcription (or no translation) gives these
UNTRANSLATED = ("morgen", "tasse", "kaffee", "tisch")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           multilingual_bundle: tuple[Path, Path]) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("translate") / "root", multilingual_bundle,
                       "[limits]\nmax_audio_seconds = 60\n",
                       bundles=("multilingual-1.bundle",))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=server.key, max_retries=0)


@pytest.fixture(scope="module")
def german(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wav = tmp_path_factory.mktemp("german") / "de.wav"
    subprocess.run(["espeak-ng", "-v", "de", "-s", "130", "-w", str(wav), GERMAN], check=True)
    return wav


def _words(text: str, words: tuple[str, ...]) -> list[str]:
    low = text.lower()
    return [w for w in words if w in low]


def test_german_speech_translated_to_english(client: openai.OpenAI, german: Path) -> None:
    with german.open("rb") as f:
        text = client.audio.translations.create(model=WHISPER, file=f).text
    assert len(_words(text, ENGLISH)) >= 3, text
    assert not _words(text, UNTRANSLATED), text


def test_translation_verbose_json_and_spoken_language(server: Server, german: Path) -> None:
    """The spoken language may be named (an extension); verbose_json says the text is English."""
    r = httpx.post(f"{server.base}/v1/audio/translations", timeout=120,
                   headers={"Authorization": f"Bearer {server.key}"},
                   files={"file": ("de.wav", german.read_bytes(), "audio/wav")},
                   data={"model": WHISPER, "language": "de", "response_format": "verbose_json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "translate" and body["language"] == "english"
    assert len(_words(body["text"], ENGLISH)) >= 3 and body["segments"], body["text"]


def test_german_transcription_stays_german(client: openai.OpenAI, german: Path) -> None:
    with german.open("rb") as f:
        r = client.audio.transcriptions.create(model=WHISPER, file=f, language="de",
                                               response_format="verbose_json")
    assert r.language == "german"
    assert len(_words(r.text, UNTRANSLATED)) >= 3, r.text


def test_unknown_spoken_language_is_400(server: Server, german: Path) -> None:
    r = httpx.post(f"{server.base}/v1/audio/translations", timeout=120,
                   headers={"Authorization": f"Bearer {server.key}"},
                   files={"file": ("de.wav", german.read_bytes(), "audio/wav")},
                   data={"model": WHISPER, "language": "xx"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "language", r.text
