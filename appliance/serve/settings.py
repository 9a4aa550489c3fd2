"""Runtime settings: `<root>/etc/appliance/appliance.toml`, then `APPLIANCE_*` overrides.

    [server]
    host = "127.0.0.1"          # the image sets the LAN address
    port = 8080
    auth = true                 # false is accepted only while host is a loopback address
    allowed_hosts = []          # Host headers accepted besides the bind address and localhost
    allowed_origins = []        # browser origins allowed to call the API (none by default)
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
    lookup_draft = 0            # prompt-lookup speculation for greedy requests: draft tokens
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

API keys live apart, in `<root>/etc/appliance/api-keys` (one `name sha256hex` per line, written
by `appliance-ctl apikey create`), so a key never sits in a config file in clear.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from appliance.device.store import Layout
from appliance.errors import FormatError, UsageError
from appliance.strict import load_toml

MAX_SETTINGS = 64 * 1024


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
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
    lookup_draft: int = 0
    prefer: str = "auto"
    memory_fraction: float = 0.9
    aux_cores: int = 1
    quantization: tuple[tuple[str, str], ...] = ()
    max_embedding_inputs: int = 2048
    max_embedding_tokens: int = 300_000
    max_audio_seconds: int = 1800
    api_key_hashes: tuple[str, ...] = field(default=(), repr=False)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check(self) -> None:
        """Refuse settings that would expose the API: no auth off the loopback interface."""
        if not self.auth and not self.loopback:
            raise UsageError(f"auth = false is only allowed on a loopback address, not {self.host}",
                             hint="create a key with `appliance-ctl apikey create NAME`")
        if self.auth and not self.api_key_hashes:
            raise UsageError("auth is on but no API key exists",
                             hint="create one with `appliance-ctl apikey create NAME`")
        if not 0 < self.memory_fraction <= 1:
            raise UsageError("memory_fraction must be in (0, 1]")


def load(layout: Layout, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    s = Settings()
    if layout.config.exists():
        doc = load_toml(layout.config.read_bytes(), str(layout.config), MAX_SETTINGS)
        server, chat, hw, limits, models = (
            doc.table(k, required=False)
            for k in ("server", "chat", "hardware", "limits", "models"))
        doc.done()
        if server is not None:
            s = replace(
                s,
                host=server.string("host", required=False, default=s.host) or s.host,
                port=server.integer("port", required=False, lo=1, hi=65535, default=s.port)
                or s.port,
                auth=server.boolean("auth", s.auth),
                allowed_hosts=tuple(server.strings("allowed_hosts", required=False)),
                allowed_origins=tuple(server.strings("allowed_origins", required=False)),
                max_body_mb=server.integer("max_body_mb", required=False, lo=1, hi=4096,
                                           default=s.max_body_mb) or s.max_body_mb,
                max_queue=server.integer("max_queue", required=False, lo=1, hi=100_000,
                                         default=s.max_queue) or s.max_queue,
                max_json_kb=server.integer("max_json_kb", required=False, lo=16, hi=1 << 20,
                                           default=s.max_json_kb) or s.max_json_kb,
                max_connections=server.integer(
                    "max_connections", required=False, lo=4, hi=100_000,
                    default=s.max_connections) or s.max_connections,
                max_connections_per_client=server.integer(
                    "max_connections_per_client", required=False, lo=1, hi=100_000,
                    default=s.max_connections_per_client) or s.max_connections_per_client,
                header_timeout=server.integer("header_timeout", required=False, lo=1, hi=600,
                                              default=s.header_timeout) or s.header_timeout,
                idle_timeout=server.integer("idle_timeout", required=False, lo=1, hi=3600,
                                            default=s.idle_timeout) or s.idle_timeout,
                max_header_kb=server.integer("max_header_kb", required=False, lo=4, hi=1024,
                                             default=s.max_header_kb) or s.max_header_kb,
            )
            server.done()
        if chat is not None:
            s = replace(
                s,
                parallel=chat.integer("parallel", required=False, lo=1, hi=256,
                                      default=s.parallel) or s.parallel,
                kv_cells=chat.integer("kv_cells", required=False, lo=256, hi=1 << 22,
                                      default=s.kv_cells) or s.kv_cells,
                ctx_per_seq=chat.integer("ctx_per_seq", required=False, lo=64, hi=1 << 20,
                                         default=s.ctx_per_seq) or s.ctx_per_seq,
                threads=chat.integer("threads", required=False, lo=0, hi=1024,
                                     default=s.threads) or 0,
                batch=chat.integer("batch", required=False, lo=16, hi=8192,
                                   default=s.batch) or s.batch,
                prefix_slots=chat.integer("prefix_slots", required=False, lo=0, hi=64,
                                          default=s.prefix_slots) or 0,
                lookup_draft=chat.integer("lookup_draft", required=False, lo=0, hi=16,
                                          default=s.lookup_draft) or 0,
            )
            chat.done()
        if hw is not None:
            prefer = hw.string("prefer", required=False, default=s.prefer) or s.prefer
            if prefer not in ("auto", "cpu"):
                raise FormatError(f"{layout.config}: hardware.prefer must be auto or cpu")
            s = replace(s, prefer=prefer, memory_fraction=hw.number(
                "memory_fraction", lo=0.05, hi=1.0, default=s.memory_fraction),
                aux_cores=hw.integer("aux_cores", required=False, lo=1, hi=1024,
                                     default=s.aux_cores) or s.aux_cores)
            hw.done()
        if models is not None:
            pins = models.table("quantization", required=False)
            if pins is not None:
                s = replace(s, quantization=tuple(
                    (key, pins.req_string(key, max_len=32)) for key in list(pins.keys())))
                pins.done()
            models.done()
        if limits is not None:
            s = replace(
                s,
                max_embedding_inputs=limits.integer(
                    "max_embedding_inputs", required=False, lo=1, hi=100_000,
                    default=s.max_embedding_inputs) or s.max_embedding_inputs,
                max_embedding_tokens=limits.integer(
                    "max_embedding_tokens", required=False, lo=1, hi=10_000_000,
                    default=s.max_embedding_tokens) or s.max_embedding_tokens,
                max_audio_seconds=limits.integer(
                    "max_audio_seconds", required=False, lo=1, hi=86_400,
                    default=s.max_audio_seconds) or s.max_audio_seconds,
            )
            limits.done()
    s = _env(s, env)
    return replace(s, api_key_hashes=tuple(read_api_keys(api_keys_path(layout)).values()))


def _env(s: Settings, env: dict[str, str]) -> Settings:
    def num(name: str, current: int) -> int:
        raw = env.get(name)
        if raw is None:
            return current
        try:
            return int(raw)
        except ValueError:
            raise UsageError(f"{name}={raw!r} is not a whole number") from None

    auth = env.get("APPLIANCE_AUTH")
    if auth is not None and auth not in ("0", "1", "true", "false"):
        raise UsageError(f"APPLIANCE_AUTH={auth!r}: use true or false")
    return replace(
        s,
        host=env.get("APPLIANCE_HOST", s.host),
        port=num("APPLIANCE_PORT", s.port),
        auth=s.auth if auth is None else auth in ("1", "true"),
        parallel=num("APPLIANCE_PARALLEL", s.parallel),
        kv_cells=num("APPLIANCE_KV_CELLS", s.kv_cells),
        ctx_per_seq=num("APPLIANCE_CTX_PER_SEQ", s.ctx_per_seq),
        threads=num("APPLIANCE_THREADS", s.threads),
        max_queue=num("APPLIANCE_MAX_QUEUE", s.max_queue),
        aux_cores=num("APPLIANCE_AUX_CORES", s.aux_cores),
        prefix_slots=num("APPLIANCE_PREFIX_SLOTS", s.prefix_slots),
        lookup_draft=num("APPLIANCE_LOOKUP_DRAFT", s.lookup_draft),
        max_audio_seconds=num("APPLIANCE_MAX_AUDIO_SECONDS", s.max_audio_seconds),
        prefer=env.get("APPLIANCE_PREFER", s.prefer),
    )


def api_keys_path(layout: Layout) -> Path:
    return layout.root / "etc/appliance/api-keys"


def read_api_keys(path: Path) -> dict[str, str]:
    """name -> sha256 hex of the key."""
    if not path.exists():
        return {}
    keys: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) != 64:
            raise FormatError(f"{path}:{n}: expected `name sha256hex`")
        keys[parts[0]] = parts[1].lower()
    return keys
