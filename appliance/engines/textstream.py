"""Turning a stream of token byte pieces into text deltas, honouring stop strings.

Tokens split UTF-8 characters (emoji, CJK) across pieces, and a stop string can span several
tokens, so text is only released once it is known to be complete and not the start of a stop
string. Pure Python: tested without a model.
"""

from __future__ import annotations

import codecs


class TextAssembler:
    def __init__(self, stops: list[str] | None = None) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in (stops or []) if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def feed(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that can be shown now.

        After a stop string is seen, `stopped` is True and the text before it is returned."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(piece)
        found = [(at, stop) for stop in self._stops if (at := text.find(stop)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda f: f[0])
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._holdback(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The rest, at the end of generation (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text
