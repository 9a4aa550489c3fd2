"""`appliance-ctl serve`: settings, runtime, the app, systemd notifications, then uvicorn.

One process, one event loop, one app, up to two listeners: `host:port` (TLS with the device
certificate unless `host` is loopback) and, when `local_port` is set, plain HTTP on 127.0.0.1
for tools on the device. Each listener has its own connection limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import ssl
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import uvicorn
from uvicorn.lifespan.on import LifespanOn

from appliance.device import tlscert
from appliance.device.layout import Layout
from appliance.errors import UsageError
from appliance.serve import settings as settings_mod
from appliance.serve.runtime import Runtime
from appliance.serve.settings import Settings

log = logging.getLogger(__name__)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def serve(layout: Layout, announce: Callable[[Settings, list[str]], None] | None = None) -> None:
    """Load the active bundles and serve them until stopped. `announce` gets the settings and
    the chat model ids once the models are loaded (the CLI prints a snippet to paste)."""
    from appliance.api.app import create_app
    from appliance.api.connections import ConnectionLimits, guarded_protocol
    from appliance.serve import notify

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = settings_mod.load(layout)
    cfg.check()
    if cfg.auth and not cfg.api_keys:
        # a sealed device waits for its first key from a control document (taken live)
        log.warning("no API key yet: every request gets 401 until one is added "
                    "(`appliance-ctl apikey create NAME`, or a control document on a stick)")
    # the certificate is checked before the models load (minutes), not after
    tls = _tls_context(layout, cfg) if cfg.tls else None
    runtime = Runtime(layout, cfg, fingerprint=tlscert.fingerprint(layout.identity / tlscert.CERT)
                      if tls else None)
    # SIGTERM (systemctl stop, a start timeout) while loading must unwind, so the record of
    # the model being loaded is cleared and not taken for a crash (uvicorn takes over later)
    signal.signal(signal.SIGTERM, _stop)
    runtime.load()
    for model_id, info in runtime.status()["models"].items():
        state = "loaded" if info["loaded"] else f"not loaded: {info['error']}"
        log.info("%s: %s/%s (%s); %s", model_id, info["backend"], info["quantization"],
                 info["reason"], state)
    app = create_app(runtime, cfg)
    if announce is not None:
        announce(cfg, [m.id for m in runtime.served() if m.task.value == "chat"])

    def healthy() -> tuple[bool, str]:
        report = runtime.health()
        engines = ", ".join(f"{k} {v}" for k, v in report["engines"].items())
        failed = ", ".join(f"{k} failed to load" for k in report.get("failed", []))
        line = "; ".join(p for p in (engines, failed) if p) or "no models"
        return not runtime.restart_would_help(), f"{report['status']}: {line}"

    listeners = [(cfg.host, cfg.port)]
    if cfg.local_port:
        listeners.append(("127.0.0.1", cfg.local_port))
    notify.supervise(listeners, healthy)
    runtime.follow()  # a new active sequence goes live by itself (self-tested if on trial)
    # The models are loaded: keep what exists now out of the collector's walks, and collect
    # young objects less often; a collection pauses the token path of every stream at once.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    # Connections are limited below HTTP (api/connections.py): timeouts, header size,
    # per-address and total caps with JSON refusals; uvicorn's own plain-text limit is off.
    # Each listener counts its own connections: a LAN flood does not evict on-device tools.
    limits = ConnectionLimits(
        max_connections=cfg.max_connections, per_client=cfg.max_connections_per_client,
        header_timeout=cfg.header_timeout, idle_timeout=cfg.idle_timeout,
        max_header_bytes=cfg.max_header_kb * 1024)

    def listener(host: str, port: int, context: ssl.SSLContext | None) -> uvicorn.Config:
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False,
            # idle keep-alive connections are closed by the header timeout (10 s), longer
            # than clients keep them (httpx: 5 s): a client never reuses one being closed
            timeout_graceful_shutdown=5, timeout_keep_alive=cfg.header_timeout,
            http=guarded_protocol(limits),
            ws="none",  # an upgrade would leave the connection limits
            server_header=False,
            lifespan="off")  # run once around all listeners (_serve_all)
        config.load()
        config.ssl = context  # ours, not uvicorn's: it sets the minimum TLS version
        return config

    configs = [listener(cfg.host, cfg.port, tls)]
    if cfg.local_port:
        configs.append(listener("127.0.0.1", cfg.local_port, None))
    app_config = uvicorn.Config(app, lifespan="on", log_level="warning")
    app_config.load()
    stopped_by = _run(_serve_all(app_config, [_Listener(c) for c in configs]))
    # as uvicorn does: the signal that stopped the servers now has its usual effect (SIGTERM:
    # _stop, exit 143; SIGINT: KeyboardInterrupt)
    for signum in reversed(stopped_by):
        signal.raise_signal(signum)


def _tls_context(layout: Layout, cfg: Settings) -> ssl.SSLContext:
    identity = layout.identity
    if not (identity / tlscert.CERT).exists() or not (identity / tlscert.KEY).exists():
        raise UsageError(f"host {cfg.host} is served over TLS, but {identity} holds no "
                         f"{tlscert.CERT} and {tlscert.KEY}",
                         hint="run `appliance-ctl init` as root: it makes the device certificate "
                              "(or set host to a loopback address)")
    return tlscert.server_context(identity)


class _Listener(uvicorn.Server):
    """One of the servers sharing the event loop: `_serve_all` takes the signals for all of
    them, so that one server does not undo the handlers of another."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_all(app_config: uvicorn.Config, servers: list[uvicorn.Server]) -> list[int]:
    """The app's lifespan once, around every listener. SIGTERM and SIGINT stop them all; each
    drains its connections (for at most its timeout_graceful_shutdown) before the app's
    shutdown closes the runtime under them. Returns the signals that stopped them."""
    lifespan = LifespanOn(app_config)
    await lifespan.startup()
    if lifespan.should_exit:
        raise SystemExit(3)
    failed: list[SystemExit] = []

    async def one(server: uvicorn.Server) -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn's answer to a port it cannot bind
            failed.append(exc)
        finally:  # one listener gone: stop the others
            for other in servers:
                other.should_exit = True

    def handle(sig: int, frame: Any) -> None:
        captured.append(sig)
        for server in servers:
            server.handle_exit(sig, frame)

    captured: list[int] = []
    original = {sig: signal.signal(sig, handle) for sig in HANDLED_SIGNALS}
    try:
        await asyncio.gather(*(one(s) for s in servers))
    finally:
        await lifespan.shutdown()
        for sig, handler in original.items():
            signal.signal(sig, handler)
    if failed:
        raise failed[0]
    return captured


def _run(main: Coroutine[Any, Any, list[int]]) -> list[int]:
    """Run `main` on uvloop where it is installed (uvicorn's choice too)."""
    try:
        import uvloop
        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
