"""Runtime settings: `<root>/etc/appliance/appliance.toml` merged with `APPLIANCE_*` overrides
(see ENV), then validated once.

    [server]
    host = "127.0.0.1"          # the image sets the LAN address
    port = 8080                 # HTTPS with the device certificate unless host is loopback
    local_port = 0              # a plain-HTTP listener on 127.0.0.1 for on-device tools (0: none)
    auth = true                 # false is accepted only while host is a loopback address
    allowed_hosts = []          # Host headers accepted besides the bind address and localhost
    allowed_origins = []        # browser origins allowed to call the API, as the browser
                                # sends them ("http://chat.lan:3000"); none by default
    max_body_mb = 25            # audio uploads
    max_json_kb = 4096          # JSON request bodies (parsed on the event loop: keep it small)
    max_queue = 64              # waiting requests per engine before 503
    max_connections = 256       # open connections in all; idle ones are closed to make room
    max_connections_per_client = 32   # from one address (429 past that)
    header_timeout = 10         # seconds to send the request headers
    idle_timeout = 30           # seconds a request body may stall
    max_header_kb = 32          # request line + headers
    [chat]
    parallel = 8                # sequences decoded together
    kv_cells = 20480            # KV cells in all, split over parallel + prefix_slots streams
    ctx_per_seq = 2048          # ... but at most this many (and the model's own context)
    threads = 0                 # 0: one per physical core
    batch = 512
    prefix_slots = 2            # recent prompts kept for reuse (shared system prompts)
    lookup_draft = 2            # prompt-lookup speculation for greedy requests: most draft
                                # tokens (fewer if they would not verify bit-identically; 0: off)
    default_max_tokens = 1024   # answer length when a request sets no max_tokens (chat; the
                                # completions default, 16, only if this is smaller)
    max_n = 8                   # most choices (`n`) one request may ask for
    [hardware]
    prefer = "auto"             # or "cpu"
    memory_fraction = 0.9
    aux_cores = 1               # cores lent to embeddings/transcription while they run
    [models]
    quantization = { "all-minilm-l6-v2" = "fp32" }   # pin a model's variant by quantisation
    [limits]
    max_embedding_inputs = 2048 # inputs in one embeddings request
    max_embedding_tokens = 300000   # tokens in one embeddings request
    max_audio_seconds = 1800    # longest audio accepted for transcription
    [system]
    update_reboot = "now"       # after a stick wrote a system update: "now", a daily "HH:MM"
                                # (local time), or "manual" (it boots at the next power cycle)

Off loopback the API is served over TLS only, with the device's own certificate
(`identity/tls.crt`, made by `appliance-ctl init`), which clients pin: there is no setting for
clear HTTP on the LAN. Tools on the device itself use `local_port` (or a loopback `host`).

API keys live apart, in the live configuration's `api-keys` (one `name sha256hex [limits]` per
line, written by `appliance-ctl apikey create`; see device/apikeys.py), so a key never sits in a
config file in clear. They are read here for the start-up check; the running service re-reads
them when they change (api/keyring.py).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from appliance.device import apikeys
from appliance.device.layout import Layout
from appliance.errors import FormatError, UsageError
from appliance.strict import Fields, parse_toml

MAX_SETTINGS = 64 * 1024
UPDATE_REBOOT = re.compile(r"now|manual|([01][0-9]|2[0-3]):[0-5][0-9]")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    local_port: int = 0
    auth: bool = True
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    max_body_mb: int = 25
    max_json_kb: int = 4096
    max_queue: int = 64
    max_connections: int = 256
    max_connections_per_client: int = 32
    header_timeout: int = 10
    idle_timeout: int = 30
    max_header_kb: int = 32
    parallel: int = 8
    kv_cells: int = 20480
    ctx_per_seq: int = 2048
    threads: int = 0
    batch: int = 512
    prefix_slots: int = 2
    lookup_draft: int = 2
    default_max_tokens: int = 1024
    max_n: int = 8
    prefer: str = "auto"
    memory_fraction: float = 0.9
    aux_cores: int = 1
    quantization: tuple[tuple[str, str], ...] = ()
    max_embedding_inputs: int = 2048
    max_embedding_tokens: int = 300_000
    max_audio_seconds: int = 1800
    update_reboot: str = "now"
    api_keys: tuple[apikeys.ApiKey, ...] = field(default=(), repr=False)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def tls(self) -> bool:
        """The main listener speaks TLS whenever it is reachable from off the device."""
        return not self.loopback

    def check(self) -> None:
        """Refuse settings that would expose the API: no auth off the loopback interface."""
        if not self.auth and not self.loopback:
            raise UsageError(f"auth = false is only allowed on a loopback address, not {self.host}",
                             hint="create a key with `appliance-ctl apikey create NAME`")
        if not 0 < self.memory_fraction <= 1:
            raise UsageError("memory_fraction must be in (0, 1]")


# The environment overrides these keys of the file (the unit files and `make run` use them).
ENV: dict[str, tuple[str, str, type]] = {
    "APPLIANCE_HOST": ("server", "host", str),
    "APPLIANCE_PORT": ("server", "port", int),
    "APPLIANCE_LOCAL_PORT": ("server", "local_port", int),
    "APPLIANCE_AUTH": ("server", "auth", bool),
    "APPLIANCE_MAX_QUEUE": ("server", "max_queue", int),
    "APPLIANCE_PARALLEL": ("chat", "parallel", int),
    "APPLIANCE_KV_CELLS": ("chat", "kv_cells", int),
    "APPLIANCE_CTX_PER_SEQ": ("chat", "ctx_per_seq", int),
    "APPLIANCE_THREADS": ("chat", "threads", int),
    "APPLIANCE_PREFIX_SLOTS": ("chat", "prefix_slots", int),
    "APPLIANCE_LOOKUP_DRAFT": ("chat", "lookup_draft", int),
    "APPLIANCE_PREFER": ("hardware", "prefer", str),
    "APPLIANCE_AUX_CORES": ("hardware", "aux_cores", int),
    "APPLIANCE_MAX_AUDIO_SECONDS": ("limits", "max_audio_seconds", int),
}


def load(layout: Layout, env: dict[str, str] | None = None) -> Settings:
    """The settings file and the `APPLIANCE_*` environment merged first, then validated once,
    by the same rules: an error names the file key, or the variable it came from."""
    env = dict(os.environ if env is None else env)
    doc: dict[str, Any] = {}
    if layout.config.exists():
        data = layout.config.read_bytes()
        if len(data) > MAX_SETTINGS:
            raise FormatError(f"{layout.config} is larger than {MAX_SETTINGS} bytes")
        try:
            doc = parse_toml(data.decode("utf-8"), str(layout.config))
        except UnicodeDecodeError:
            raise FormatError(f"{layout.config} is not UTF-8") from None
    labels: dict[str, str] = {}
    for var, (table, key, kind) in ENV.items():
        if var not in env:
            continue
        section = doc.setdefault(table, {})
        if not isinstance(section, dict):
            raise FormatError(f"{layout.config}: {table} must be a table")
        section[key] = _env_value(var, env[var], kind)
        labels[f"{table}.{key}"] = var
    s = validate(Fields(doc, str(layout.config), labels=labels))
    return replace(s, api_keys=tuple(apikeys.read(layout.api_keys).values()))


def check_document(data: bytes) -> None:
    """A settings file from a signed control document, before it may go live: read by the same
    rules as the file (size, TOML, every key) and the same refusal to expose the API."""
    if len(data) > MAX_SETTINGS:
        raise FormatError(f"the settings would be larger than {MAX_SETTINGS} bytes")
    try:
        doc = parse_toml(data.decode("utf-8"), "settings")
    except UnicodeDecodeError:
        raise FormatError("the settings are not UTF-8") from None
    validate(Fields(doc, "settings")).check()


def _env_value(var: str, raw: str, kind: type) -> Any:
    if kind is bool:
        if raw not in ("0", "1", "true", "false"):
            raise UsageError(f"{var}={raw!r}: use true or false")
        return raw in ("1", "true")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise UsageError(f"{var}={raw!r} is not a whole number") from None
    return raw


def validate(doc: Fields) -> Settings:
    """Every key of the merged settings, checked: types, ranges, no unknown keys."""
    d = Settings()
    server, chat, hw, limits, models, system = (
        doc.table(k, required=False) or Fields({}, "", f"{k}.")
        for k in ("server", "chat", "hardware", "limits", "models", "system"))
    doc.done()

    def integer(t: Fields, key: str, lo: int, hi: int) -> int:
        value = t.integer(key, required=False, lo=lo, hi=hi, default=getattr(d, key))
        assert value is not None
        return value

    prefer = hw.string("prefer", required=False, default=d.prefer) or d.prefer
    if prefer not in ("auto", "cpu"):
        raise hw.fail("prefer", "must be auto or cpu")
    pins = models.table("quantization", required=False)
    quantization: tuple[tuple[str, str], ...] = ()
    if pins is not None:
        quantization = tuple((key, pins.req_string(key, max_len=32))
                             for key in list(pins.keys()))
        pins.done()
    s = Settings(
        host=server.string("host", required=False, default=d.host) or d.host,
        port=integer(server, "port", 1, 65535),
        local_port=integer(server, "local_port", 0, 65535),
        auth=server.boolean("auth", d.auth),
        allowed_hosts=tuple(server.strings("allowed_hosts", required=False)),
        allowed_origins=tuple(server.strings("allowed_origins", required=False)),
        max_body_mb=integer(server, "max_body_mb", 1, 4096),
        max_json_kb=integer(server, "max_json_kb", 16, 1 << 20),
        max_queue=integer(server, "max_queue", 1, 100_000),
        max_connections=integer(server, "max_connections", 4, 100_000),
        max_connections_per_client=integer(server, "max_connections_per_client", 1, 100_000),
        header_timeout=integer(server, "header_timeout", 1, 600),
        idle_timeout=integer(server, "idle_timeout", 1, 3600),
        max_header_kb=integer(server, "max_header_kb", 4, 1024),
        parallel=integer(chat, "parallel", 1, 256),
        kv_cells=integer(chat, "kv_cells", 256, 1 << 22),
        ctx_per_seq=integer(chat, "ctx_per_seq", 64, 1 << 20),
        threads=integer(chat, "threads", 0, 1024),
        batch=integer(chat, "batch", 16, 8192),
        prefix_slots=integer(chat, "prefix_slots", 0, 64),
        lookup_draft=integer(chat, "lookup_draft", 0, 16),
        default_max_tokens=integer(chat, "default_max_tokens", 1, 1 << 20),
        max_n=integer(chat, "max_n", 1, 128),
        prefer=prefer,
        memory_fraction=hw.number("memory_fraction", lo=0.05, hi=1.0, default=d.memory_fraction),
        aux_cores=integer(hw, "aux_cores", 1, 1024),
        quantization=quantization,
        max_embedding_inputs=integer(limits, "max_embedding_inputs", 1, 100_000),
        max_embedding_tokens=integer(limits, "max_embedding_tokens", 1, 10_000_000),
        max_audio_seconds=integer(limits, "max_audio_seconds", 1, 86_400),
        update_reboot=system.string("update_reboot", required=False, default=d.update_reboot,
                                    pattern=UPDATE_REBOOT) or d.update_reboot,
    )
    for table in (server, chat, hw, limits, models, system):
        table.done()
    if s.local_port == s.port and (s.loopback or _wildcard(s.host)):
        raise server.fail("local_port", f"must differ from port ({s.port}): host {s.host} "
                                        "already listens on 127.0.0.1")
    if s.kv_cells // (s.parallel + s.prefix_slots) < 64:
        raise chat.fail("kv_cells", f"gives each of the {s.parallel + s.prefix_slots} streams "
                                    "(parallel + prefix_slots) fewer than 64 cells")
    return s


def _wildcard(host: str) -> bool:
    """A bind address that covers 127.0.0.1 too (all interfaces)."""
    return host in ("", "0.0.0.0", "::")
