"""`appliance-ctl serve`: settings, runtime, the app, systemd notifications, then uvicorn."""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import Callable

from appliance.device.layout import Layout
from appliance.serve import settings as settings_mod
from appliance.serve.runtime import Runtime
from appliance.serve.settings import Settings

log = logging.getLogger(__name__)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def serve(layout: Layout, announce: Callable[[Settings, list[str]], None] | None = None) -> None:
    """Load the active bundles and serve them until stopped. `announce` gets the settings and
    the chat model ids once the models are loaded (the CLI prints a snippet to paste)."""
    import uvicorn

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
    runtime = Runtime(layout, cfg)
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

    notify.supervise(cfg.host, cfg.port, healthy)
    runtime.follow()  # a new active sequence goes live by itself (self-tested if on trial)
    # The models are loaded: keep what exists now out of the collector's walks, and collect
    # young objects less often; a collection pauses the token path of every stream at once.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    # Connections are limited below HTTP (api/connections.py): timeouts, header size,
    # per-address and total caps with JSON refusals; uvicorn's own plain-text limit is off.
    limits = ConnectionLimits(
        max_connections=cfg.max_connections, per_client=cfg.max_connections_per_client,
        header_timeout=cfg.header_timeout, idle_timeout=cfg.idle_timeout,
        max_header_bytes=cfg.max_header_kb * 1024)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                # idle keep-alive connections are closed by the header timeout (10 s), longer
                # than clients keep them (httpx: 5 s): a client never reuses one being closed
                timeout_graceful_shutdown=5, timeout_keep_alive=cfg.header_timeout,
                http=guarded_protocol(limits),
                ws="none", server_header=False)  # an upgrade would leave the connection limits
