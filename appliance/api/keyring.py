"""The API keys as the running service sees them. Keys are added and revoked while it runs
(`appliance-ctl apikey`, a signed control document): the api-keys file is re-read when the file
it resolves to changes, checked at most once a second, so no restart is needed.

`layout.api_keys` goes through the `config -> config.<gen>` link, which a change swaps whole:
it is resolved anew on every check, and the resolved file's identity (inode, mtime, size) says
whether to read it again. A file that cannot be read keeps the previous keys in use."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable

from appliance.device import apikeys
from appliance.device.apikeys import ApiKey
from appliance.device.layout import Layout
from appliance.errors import ApplianceError

log = logging.getLogger(__name__)
CHECK_EVERY = 1.0  # seconds; a check is a stat on the event loop
Seen = tuple[object, ...] | None


class KeyRing:
    def __init__(self, layout: Layout, keys: Iterable[ApiKey] = ()) -> None:
        """`keys` are those read at start-up; the first lookup checks the file again (the
        models load in between, which may take minutes)."""
        self.layout = layout
        self._keys = tuple(keys)
        self._seen: Seen = ("start-up",)
        self._checked = -math.inf

    def keys(self) -> tuple[ApiKey, ...]:
        now = time.monotonic()
        if now - self._checked >= CHECK_EVERY:
            self._checked = now
            self._refresh()
        return self._keys

    def match(self, presented: str) -> ApiKey | None:
        return apikeys.match(presented, self.keys())

    def _refresh(self) -> None:
        path = self.layout.api_keys
        seen: Seen
        resolved = path
        try:
            resolved = path.resolve(strict=True)
            st = os.stat(resolved)
            seen = (str(resolved), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None  # no file, no keys (as settings.load reads it)
        except OSError as exc:
            seen = ("unreadable", exc.errno)
        if seen == self._seen:
            return
        self._seen = seen  # a bad file is reported once, not every second
        try:
            keys = apikeys.read(resolved) if seen is not None else {}
        except (ApplianceError, OSError) as exc:
            log.warning("API keys not re-read, the previous ones stay in use: %s", exc)
            return
        self._keys = tuple(keys.values())
        log.info("API keys re-read from %s: %d key(s)", path, len(self._keys))
