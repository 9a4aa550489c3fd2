"""appliance-ctl: the device tool (bundles, trust keys, audit log, status)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

from appliance.cli.common import Progress, run
from appliance.device import install
from appliance.device.store import Layout, Store
from appliance.errors import UsageError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance-ctl", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--root", help="state root (default $APPLIANCE_ROOT or /)")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bundle", help="verify, import, list, activate, roll back bundles")
    bs = b.add_subparsers(dest="action", required=True)
    bs.add_parser("verify", help="check a bundle file without installing it").add_argument(
        "file", type=Path)
    bs.add_parser("import", help="verify, install and activate a bundle file").add_argument(
        "file", type=Path)
    bs.add_parser("list", help="installed bundles and their sequences")
    act = bs.add_parser("activate", help="make an installed sequence the active one")
    act.add_argument("name")
    act.add_argument("sequence", type=int)
    bs.add_parser("rollback", help="activate the previous installed sequence").add_argument("name")
    bs.add_parser("check", help="re-hash the active bundles' files on disk").add_argument(
        "name", nargs="?")

    k = sub.add_parser("keys", help="the trusted signing keys")
    ks = k.add_subparsers(dest="action", required=True)
    ks.add_parser("list")
    ks.add_parser("add").add_argument("file", type=Path)
    ks.add_parser("remove").add_argument("keyid")
    ks.add_parser("threshold", help="show or set how many trusted keys must sign").add_argument(
        "value", type=int, nargs="?")

    a = sub.add_parser("audit", help="the hash-chained audit log")
    aus = a.add_subparsers(dest="action", required=True)
    aus.add_parser("verify")
    aus.add_parser("show")

    st = sub.add_parser("status", help="bundles, models and trust keys on this device")
    st.add_argument("--json", action="store_true")

    sub.add_parser("serve", help="serve the active bundles' models (the systemd unit runs this)")
    sub.add_parser("probe", help="show the hardware the runtime sees")

    usb = sub.add_parser("usb-import", help="import every *.bundle of a USB stick (udev runs it)")
    usb.add_argument("device", type=Path, nargs="?", help="block device, mounted read-only")
    usb.add_argument("--dir", type=Path, help="an already mounted folder instead of a device")

    ak = sub.add_parser("apikey", help="API keys for LAN clients (stored as hashes)")
    aks = ak.add_subparsers(dest="action", required=True)
    aks.add_parser("create", help="make a key and print it once").add_argument("name")
    aks.add_parser("list")
    aks.add_parser("remove").add_argument("name")
    return p


def _bundle(args: argparse.Namespace, layout: Layout) -> int:
    store = Store(layout)
    if args.action == "verify":
        v = install.verify(args.file, layout, Progress("verify"))
        print(f"ok: {v.manifest.name} sequence {v.manifest.sequence}, "
              f"{len(v.manifest.files)} files, signed by {', '.join(s[:16] for s in v.signers)}")
        _print_models(v.manifest)
    elif args.action == "import":
        inst = install.import_bundle(args.file, layout, Progress("import"))
        print(f"imported {inst.name} sequence {inst.sequence} (active)")
        _print_models(inst.manifest)
    elif args.action == "check":
        for name in [args.name] if args.name else store.names():
            seq = store.active(name)
            if seq is None:
                raise UsageError(f"bundle {name} has no active sequence")
            inst = store.load(name, seq)
            store.check(inst)
            print(f"{name} {seq}: {len(inst.manifest.files)} files intact")
    elif args.action == "list":
        for name in store.names():
            active = store.active(name)
            seqs = ", ".join(f"{s}{'*' if s == active else ''}" for s in store.sequences(name))
            print(f"{name}: {seqs or 'none'} (highest ever {store.highwater(name)})")
    else:
        with store.locked():
            store.cleanup()
            seq = args.sequence if args.action == "activate" else store.rollback_target(args.name)
            previous = store.activate(args.name, seq)
            layout.audit.append(args.action, bundle=args.name, sequence=seq, previous=previous,
                                result="ok")
        print(f"{args.name}: sequence {seq} active (was {previous})")
    return 0


def _print_models(manifest: Any) -> None:
    for m in manifest.models:
        variants = ", ".join(f"{v.backend}/{v.format}/{v.quantization}" for v in m.variants)
        print(f"  {m.id:32} {m.task.value:14} {variants}")


def _keys(args: argparse.Namespace, layout: Layout) -> int:
    trust = layout.trust
    store = Store(layout)
    if args.action == "list":
        for kid in trust.keys():  # noqa: SIM118 - TrustStore.keys() reads the folder
            print(kid)
        print(f"threshold: {trust.threshold()}", file=sys.stderr)
        return 0
    if args.action == "threshold" and args.value is None:
        print(trust.threshold())
        return 0
    with store.locked():
        if args.action == "add":
            kid = trust.add(args.file)
            layout.audit.append("key-add", keyid=kid, result="ok")
            print(f"trusted {kid}")
        elif args.action == "remove":
            kid = trust.remove(args.keyid)
            layout.audit.append("key-remove", keyid=kid, result="ok")
            print(f"removed {kid}")
        else:
            trust.set_threshold(args.value)
            layout.audit.append("key-threshold", threshold=args.value, result="ok")
            print(f"threshold {args.value}")
    return 0


def _audit(args: argparse.Namespace, layout: Layout) -> int:
    if args.action == "verify":
        found = layout.audit.verify()
        print(f"audit log intact: {found.entries} entries")
        if found.torn_bytes or found.head_behind:
            # a power cut during an append, not tampering: the next append repairs and records it
            what = (f"an unfinished last line of {found.torn_bytes} bytes" if found.torn_bytes
                    else "the last line was written but not yet counted by the head")
            print(f"note: an append was interrupted ({what}); "
                  "the next change repairs this and records it in the log")
    else:
        for entry in layout.audit.entries():
            print(json.dumps(entry, sort_keys=True))
    return 0


def status_report(layout: Layout) -> dict[str, Any]:
    store = Store(layout)
    bundles = []
    for name in store.names():
        active = store.active(name)
        entry: dict[str, Any] = {"name": name, "active": active,
                                 "installed": store.sequences(name),
                                 "highwater": store.highwater(name), "models": []}
        if active is not None:
            m = store.load(name, active).manifest
            entry["created"] = m.created.isoformat()
            entry["models"] = [
                {"id": mod.id, "task": mod.task.value,
                 "variants": [f"{v.backend}/{v.format}/{v.quantization}" for v in mod.variants]}
                for mod in m.models
            ]
        bundles.append(entry)
    return {"root": str(layout.root), "bundles": bundles,
            "trust": {"keys": list(layout.trust.keys()), "threshold": layout.trust.threshold()},
            "runtime": _runtime_report(layout)}


def _runtime_report(layout: Layout) -> dict[str, Any] | None:
    """What the running server chose (runtime.json) and whether it answers /healthz."""
    import urllib.error
    import urllib.request
    path = layout.run / "runtime.json"
    if not path.exists():
        return None
    report: dict[str, Any] = json.loads(path.read_text())
    host, _, port = report["listen"].rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2) as r:
            report["health"] = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        report["health"] = json.loads(exc.read() or b"{}") or {"status": f"HTTP {exc.code}"}
    except (OSError, ValueError):
        report["health"] = {"status": "not answering (stopped, or still starting)"}
    return report


def _status(args: argparse.Namespace, layout: Layout) -> int:
    report = status_report(layout)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"state root: {report['root']}")
    if not report["bundles"]:
        print("bundles: none installed")
    for b in report["bundles"]:
        print(f"bundle {b['name']}: active {b['active']}, installed {b['installed']}, "
              f"highest ever {b['highwater']}")
        for m in b["models"]:
            print(f"  {m['id']:32} {m['task']:14} {', '.join(m['variants'])}")
    keys = report["trust"]["keys"]
    print(f"trust: {len(keys)} key(s), threshold {report['trust']['threshold']}")
    for kid in keys:
        print(f"  {kid}")
    rt = report["runtime"]
    if rt is None:
        print("runtime: not running")
        return 0
    engines = rt["health"].get("engines", {})
    print(f"runtime: {rt['version']} on {rt['listen']}, health {rt['health'].get('status')}; "
          f"cores {rt['lanes']['cores']} ({rt['lanes']['aux_lanes']} lent to "
          f"embeddings/transcription while they run)")
    for model_id, m in rt["models"].items():
        state = engines.get(model_id, "loaded" if m["loaded"] else f"not loaded: {m['error']}")
        print(f"  {model_id:28} {m['task']:14} {m['backend']}/{m['format']}/{m['quantization']}"
              f" {m['memory_mb']} MiB  {state}")
        print(f"  {'':28} why: {m['reason']}")
    return 0


def _serve(args: argparse.Namespace, layout: Layout) -> int:
    import logging

    import uvicorn

    from appliance.api.app import create_app
    from appliance.api.connections import ConnectionLimits, guarded_protocol
    from appliance.serve import notify
    from appliance.serve import settings as settings_mod
    from appliance.serve.runtime import Runtime

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = settings_mod.load(layout)
    cfg.check()
    runtime = Runtime(layout, cfg)
    runtime.load()
    for model_id, info in runtime.status()["models"].items():
        state = "loaded" if info["loaded"] else f"not loaded: {info['error']}"
        print(f"{model_id}: {info['backend']}/{info['quantization']} ({info['reason']}); {state}",
              file=sys.stderr)
    app = create_app(runtime, cfg)
    _banner(cfg, [m.id for m in runtime.served() if m.task.value == "chat"])

    def healthy() -> tuple[bool, str]:
        report = runtime.health()
        engines = ", ".join(f"{k} {v}" for k, v in report["engines"].items())
        failed = ", ".join(f"{k} failed to load" for k in report.get("failed", {}))
        line = "; ".join(p for p in (engines, failed) if p) or "no models"
        return not runtime.restart_would_help(), f"{report['status']}: {line}"

    notify.supervise(cfg.host, cfg.port, healthy)
    # The models are loaded: keep what exists now out of the collector's walks, and collect
    # young objects less often; a collection pauses the token path of every stream at once.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    # Connections are limited below HTTP (appliance/connections.py): timeouts, header size,
    # per-address and total caps with JSON refusals; uvicorn's own plain-text limit is off.
    limits = ConnectionLimits(
        max_connections=cfg.max_connections, per_client=cfg.max_connections_per_client,
        header_timeout=cfg.header_timeout, idle_timeout=cfg.idle_timeout,
        max_header_bytes=cfg.max_header_kb * 1024)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5, timeout_keep_alive=5, http=guarded_protocol(limits),
                server_header=False)
    return 0


def _banner(cfg: Any, chat_models: list[str]) -> None:
    """What to paste into a client, printed as the server starts."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    base = f"http://{host}:{cfg.port}/v1"
    key = "unused" if not cfg.auth else "<your key from `appliance-ctl apikey create`>"
    model = chat_models[0] if chat_models else "<model>"
    auth = "" if not cfg.auth else " -H 'Authorization: Bearer $KEY'"
    print(f"""
serving on {base}  (Ctrl-C stops)

    from openai import OpenAI
    client = OpenAI(base_url="{base}", api_key="{key}")
    reply = client.chat.completions.create(
        model="{model}", messages=[{{"role": "user", "content": "Hello!"}}])
    print(reply.choices[0].message.content)

    curl {base}/chat/completions{auth} -H 'Content-Type: application/json' \\
      -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
""", flush=True)


def _probe(args: argparse.Namespace, layout: Layout) -> int:
    from appliance.serve import hardware
    print(json.dumps(hardware.probe().to_json(), indent=2))
    return 0


def _apikey(args: argparse.Namespace, layout: Layout) -> int:
    import secrets

    from appliance.api.app import hash_key
    from appliance.fsutil import atomic_write
    from appliance.serve.settings import api_keys_path, read_api_keys

    path = api_keys_path(layout)
    keys = read_api_keys(path)
    if args.action == "list":
        for name in keys:
            print(name)
        return 0
    if args.action == "create":
        if not args.name.isidentifier() or args.name in keys:
            raise UsageError(f"key name {args.name!r} is taken or not a simple name")
        key = "sk-appliance-" + secrets.token_urlsafe(32)
        keys[args.name] = hash_key(key)
    elif keys.pop(args.name, None) is None:
        raise UsageError(f"no API key named {args.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # readable by the service's group only: the service runs as `appliance`, not root
    atomic_write(path, "".join(f"{n} {h}\n" for n, h in keys.items()).encode(), mode=0o640)
    try:
        import grp
        os.chown(path, -1, grp.getgrnam("appliance").gr_gid)
    except (KeyError, PermissionError):
        pass  # no such group here (a development machine): root-only is fine
    layout.audit.append(f"apikey-{args.action}", name=args.name, result="ok")
    if args.action == "create":
        print(key)
        print("store it now: only its hash is kept", file=sys.stderr)
    return 0


def _usb_import(args: argparse.Namespace, layout: Layout) -> int:
    """Import the bundles at the top of a stick. Nothing on it is executed or followed: only
    regular files named *.bundle, each verified before anything is installed."""
    import subprocess
    import tempfile

    from appliance.errors import ApplianceError, StoreError

    def import_all(folder: Path) -> int:
        failures = 0
        for entry in sorted(folder.iterdir()):
            if entry.suffix != ".bundle" or entry.is_symlink() or not entry.is_file():
                continue
            try:
                inst = install.import_bundle(entry, layout)
                print(f"{entry.name}: imported {inst.name} sequence {inst.sequence}")
            except ApplianceError as exc:
                failures += 1
                print(f"{entry.name}: rejected: {exc.message}", file=sys.stderr)
        return failures

    if args.dir is not None:
        return 1 if import_all(args.dir) else 0
    if args.device is None:
        raise UsageError("give a block device or --dir")
    with tempfile.TemporaryDirectory(prefix="appliance-usb-") as mnt:
        mounted = subprocess.run(["mount", "-o", "ro,nosuid,nodev,noexec", str(args.device), mnt],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            raise StoreError(f"cannot mount {args.device}: {mounted.stderr.strip()}")
        try:
            return 1 if import_all(Path(mnt)) else 0
        finally:
            subprocess.run(["umount", mnt], check=False)


def _main(args: argparse.Namespace) -> int:
    layout = Layout.from_env(args.root)
    handler = {"bundle": _bundle, "keys": _keys, "audit": _audit, "status": _status,
               "serve": _serve, "probe": _probe, "apikey": _apikey, "usb-import": _usb_import}
    return handler[args.command](args, layout)


def main(argv: list[str] | None = None) -> int:
    return run(_main, _parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
