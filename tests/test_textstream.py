from __future__ import annotations

from appliance.engines.textstream import TextAssembler


def run(pieces: list[bytes], stops: list[str] | None = None) -> tuple[list[str], str, bool]:
    t = TextAssembler(stops)
    out = [t.feed(p) for p in pieces]
    return out, t.flush(), t.stopped


def test_utf8_split_across_tokens() -> None:
    smile = "😀".encode()
    out, rest, _ = run([b"hi ", smile[:2], smile[2:], b"!"])
    assert out == ["hi ", "", "😀", "!"] and rest == ""


def test_stop_string_across_tokens() -> None:
    out, rest, stopped = run([b"one two ST", b"OP three"], stops=["STOP"])
    assert "".join(out) == "one two " and stopped and rest == ""


def test_partial_stop_is_released_when_it_does_not_complete() -> None:
    out, _rest, stopped = run([b"a S", b"T", b"x"], stops=["STOP"])
    assert out == ["a ", "", "STx"] and not stopped


def test_incomplete_character_at_the_end() -> None:
    out, rest, _ = run([b"ok", "é".encode()[:1]])
    assert out == ["ok", ""] and rest == "\ufffd"


def test_earliest_of_several_stops() -> None:
    t = TextAssembler(["STOP", "END"])
    assert t.feed(b"x END y STOP") == "x " and t.stopped
    assert t.matched == "END"  # which one ended the text (Anthropic's stop_sequence)
