"""appliance-ctl: the device tool (bundles, trust keys, audit log, status)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

from appliance.cli.common import Progress, run
from appliance.device import actions, apikeys, control, identity, install, tlscert, trial
from appliance.device import stick as stick_mod
from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.errors import ApplianceError, UsageError


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
    act.add_argument("--force", action="store_true",
                     help="activate a sequence that failed its self-test (it goes on trial)")
    bs.add_parser("rollback", help="activate the last good (or else the previous) sequence"
                  ).add_argument("name")
    bs.add_parser("settle", help="commit or fall back the trials whose self-test finished "
                                 "(a systemd path unit runs this)")
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

    usb = sub.add_parser("usb-import", help="apply a USB stick's control documents, import its "
                         "bundles, write a receipt onto it (udev runs it)")
    usb.add_argument("device", type=Path, nargs="?",
                     help="block device, mounted nosuid, nodev, noexec")
    usb.add_argument("--dir", type=Path, help="an already mounted folder instead of a device")
    usb.add_argument("--wait", type=float, default=0.0,
                     help="seconds to wait for the new bundles' self-tests before the receipt")
    usb.add_argument("--restart", action="store_true",
                     help="restart the service when a control document changed its settings")

    c = sub.add_parser("control", help="signed control documents")
    cs = c.add_subparsers(dest="action", required=True)
    cs.add_parser("verify", help="check a control document without applying it").add_argument(
        "file", type=Path)
    cs.add_parser("apply", help="verify and apply a control document").add_argument(
        "file", type=Path)

    sy = sub.add_parser("system", help="the A/B system: status, install an update, and the "
                        "boot-time check and settle (systemd runs those)")
    sys_sub = sy.add_subparsers(dest="action", required=True)
    sys_sub.add_parser("status", help="running version, slot, state, pending update")
    sys_sub.add_parser("install", help="verify a .system file and write it to the inactive "
                       "slot; the next boot tries it").add_argument("file", type=Path)
    chk = sys_sub.add_parser("check", help="on a counted boot: is this version good?")
    chk.add_argument("--timeout", type=float, default=1500.0,
                     help="seconds to wait for health and self-tests (default 1500)")
    sys_sub.add_parser("settle", help="audit what became of a pending version (every boot)")
    sub.add_parser("init", help="first boot: the device's identity and TLS certificate, and its "
                   "configuration copied from the image's seed (the image runs it)")

    ak = sub.add_parser("apikey", help="API keys for LAN clients (stored as hashes)")
    aks = ak.add_subparsers(dest="action", required=True)
    akc = aks.add_parser("create", help="make a key and print it once")
    akc.add_argument("name")
    akc.add_argument("--models", type=_model_list, default=(), metavar="A,B",
                     help="the model ids it may use (default: all)")
    akc.add_argument("--concurrent", type=int, default=0, metavar="N",
                     help="requests in flight at once (default 0: no limit)")
    akc.add_argument("--per-minute", type=int, default=0, metavar="N",
                     help="requests per rolling minute (default 0: no limit)")
    aks.add_parser("list", help="names and their limits")
    aks.add_parser("remove").add_argument("name")
    return p


def _model_list(value: str) -> tuple[str, ...]:
    return tuple(value.split(","))


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
    elif args.action == "settle":
        for o in trial.settle(layout):
            if o.passed:
                print(f"{o.name} {o.sequence}: self-test passed; it is the last good sequence")
            else:
                then = f"back to {o.fallback}" if o.fallback else "nothing to fall back to"
                print(f"{o.name} {o.sequence}: self-test FAILED ({o.summary}); {then}")
    elif args.action == "activate":
        previous = actions.activate(layout, args.name, args.sequence, args.force)
        print(f"{args.name}: sequence {args.sequence} active (was {previous})")
    else:
        seq, previous = actions.rollback(layout, args.name)
        print(f"{args.name}: sequence {seq} active (was {previous})")
    return 0


def _print_models(manifest: Any) -> None:
    for m in manifest.models:
        variants = ", ".join(f"{v.backend}/{v.format}/{v.quantization}" for v in m.variants)
        print(f"  {m.id:32} {m.task.value:14} {variants}")


def _keys(args: argparse.Namespace, layout: Layout) -> int:
    trust = layout.trust
    if args.action == "list":
        for kid in trust.keys():  # noqa: SIM118 - TrustStore.keys() reads the folder
            print(kid)
        print(f"threshold: {trust.threshold()}", file=sys.stderr)
        return 0
    if args.action == "threshold" and args.value is None:
        print(trust.threshold())
        return 0
    if args.action == "add":
        print(f"trusted {actions.trust_key(layout, args.file)}")
    elif args.action == "remove":
        print(f"removed {actions.distrust_key(layout, args.keyid)}")
    else:
        actions.set_threshold(layout, args.value)
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
        trial_seq = store.trial(name)
        entry: dict[str, Any] = {
            "name": name, "active": active, "trial": trial_seq if trial_seq == active else None,
            "last_good": store.last_good(name), "bad": store.bad(name),
            "installed": store.sequences(name), "highwater": store.highwater(name),
            "models": [],
            "self_tests": {str(s): r for s in store.sequences(name)
                           if (r := _self_test(layout, name, s)) is not None}}
        if active is not None:
            m = store.load(name, active).manifest
            entry["created"] = m.created.isoformat()
            entry["models"] = [
                {"id": mod.id, "task": mod.task.value,
                 "variants": [f"{v.backend}/{v.format}/{v.quantization}" for v in mod.variants]}
                for mod in m.models
            ]
        bundles.append(entry)
    runtime = _runtime_report(layout)
    for entry in bundles:  # what answers, and whether it is what the store says is active
        serving = (runtime or {}).get("serving", {}).get(entry["name"])
        entry["serving"] = serving
        entry["mismatch"] = runtime is not None and serving != entry["active"]
    cert = layout.identity / "tls.crt"
    device = {"id": identity.device_id(layout), "certificate_sha256": None}
    if cert.exists():
        device["certificate_sha256"] = tlscert.fingerprint(cert)
    from appliance.device import system
    return {"root": str(layout.root), "device": device, "system": system.status(layout),
            "bundles": bundles,
            "trust": {"keys": list(layout.trust.keys()), "threshold": layout.trust.threshold()},
            "runtime": runtime}


def _self_test(layout: Layout, name: str, sequence: int) -> dict[str, Any] | None:
    try:
        return trial.read_result(layout, name, sequence)
    except ApplianceError as exc:
        return {"passed": False, "checks": [], "error": exc.message}


def _runtime_report(layout: Layout) -> dict[str, Any] | None:
    """What the running server chose (runtime.json) and whether it answers /healthz: on the
    plain loopback listener if there is one, else on the main one (over TLS if it says so,
    trusting the device certificate alone)."""
    import urllib.error
    import urllib.request
    path = layout.run / "runtime.json"
    if not path.exists():
        return None
    report: dict[str, Any] = json.loads(path.read_text())
    try:
        url, context = _health_url(layout, report)
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            report["health"] = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        report["health"] = json.loads(exc.read() or b"{}") or {"status": f"HTTP {exc.code}"}
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        report["health"] = {"status": "not answering (stopped, or still starting)"}
    return report


def _health_url(layout: Layout, report: dict[str, Any]) -> tuple[str, ssl.SSLContext | None]:
    if report.get("local"):
        return f"{report['local']}/healthz", None
    host, _, port = report["listen"].rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    host = f"[{host}]" if ":" in host else host
    if not report.get("tls"):
        return f"http://{host}:{port}/healthz", None
    # the pin is the trust: which names the certificate carries does not matter
    context = ssl.create_default_context(cafile=layout.identity / tlscert.CERT)
    context.check_hostname = False
    return f"https://{host}:{port}/healthz", context


def _status(args: argparse.Namespace, layout: Layout) -> int:
    report = status_report(layout)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"state root: {report['root']}")
    device = report["device"]
    print(f"device: {device['id'] or 'no identity yet (appliance-ctl init)'}")
    if device["certificate_sha256"]:
        print(f"  certificate sha256 {device['certificate_sha256']}")
    sysinfo = report["system"]
    if sysinfo is not None:
        extra = "".join(f", {k.replace('_', ' ')} {sysinfo[k]}"
                        for k in ("tries_done", "pending", "last_failed") if k in sysinfo)
        print(f"system: {sysinfo['version']} ({sysinfo['target']}) from slot {sysinfo['slot']}, "
              f"{sysinfo['state']}{extra}")
    if not report["bundles"]:
        print("bundles: none installed")
    for b in report["bundles"]:
        state = ("on trial" if b["trial"] else "good" if b["active"] == b["last_good"]
                 else "not self-tested")
        print(f"bundle {b['name']}: active {b['active']} ({state}), last good "
              f"{b['last_good']}, bad {b['bad'] or 'none'}, installed {b['installed']}, "
              f"highest ever {b['highwater']}")
        if b["mismatch"]:
            print(f"  ! the service answers with sequence {b['serving']}, not {b['active']} "
                  "(switching, or the self-test of the active one failed)")
        for seq, r in sorted(b["self_tests"].items()):
            verdict = "passed" if r.get("passed") else "FAILED"
            print(f"  self-test of {seq}: {verdict}")
            for c in r.get("checks", []):
                print(f"    {c.get('model')}: {c.get('detail')} ({c.get('seconds', 0)} s)")
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
    if rt.get("swap_note"):
        print(f"  last switch: {rt['swap_note']}")
    for model_id, m in rt["models"].items():
        state = engines.get(model_id, "loaded" if m["loaded"] else f"not loaded: {m['error']}")
        print(f"  {model_id:28} {m['task']:14} {m['backend']}/{m['format']}/{m['quantization']}"
              f" {m['memory_mb']} MiB  {state}")
        print(f"  {'':28} why: {m['reason']}")
    return 0


def _serve(args: argparse.Namespace, layout: Layout) -> int:
    from appliance.serve.service import serve
    serve(layout, announce=lambda cfg, models: _banner(layout, cfg, models))
    return 0


def _banner(layout: Layout, cfg: Any, chat_models: list[str]) -> None:
    """What to paste into a client, printed as the server starts."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    base = f"{'https' if cfg.tls else 'http'}://{host}:{cfg.port}/v1"
    key = "unused" if not cfg.auth else "<your key from `appliance-ctl apikey create`>"
    model = chat_models[0] if chat_models else "<model>"
    auth = "" if not cfg.auth else " -H 'Authorization: Bearer $KEY'"
    local = f"; http://127.0.0.1:{cfg.local_port}/v1 on this device" if cfg.local_port else ""
    pin = verify = cacert = ""
    if cfg.tls:  # clients pin the device certificate (README: Pinned TLS)
        cert = layout.identity / tlscert.CERT
        pin = (f"\ncertificate {cert}\n  SHA-256 {tlscert.fingerprint(cert)}\n\n"
               f"    import ssl, httpx\n"
               f"    ctx = ssl.create_default_context(cafile=\"{cert.name}\")  # a copy of it\n"
               f"    ctx.check_hostname = False  # the pin is the trust, not the name\n")
        verify = ",\n                    http_client=httpx.Client(verify=ctx)"
        cacert = f" --cacert {cert.name}"
    print(f"""
serving on {base}  (Ctrl-C stops{local})
{pin}
    from openai import OpenAI
    client = OpenAI(base_url="{base}", api_key="{key}"{verify})
    reply = client.chat.completions.create(
        model="{model}", messages=[{{"role": "user", "content": "Hello!"}}])
    print(reply.choices[0].message.content)

    curl{cacert} {base}/chat/completions{auth} -H 'Content-Type: application/json' \\
      -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
""", flush=True)


def _probe(args: argparse.Namespace, layout: Layout) -> int:
    from appliance.serve import hardware
    print(json.dumps(hardware.probe().to_json(), indent=2))
    return 0


def _apikey(args: argparse.Namespace, layout: Layout) -> int:
    if args.action == "list":
        for name, key in apikeys.read(layout.api_keys).items():
            print(f"{name}: {key.limits()}")
    elif args.action == "create":
        print(apikeys.create(layout, args.name, args.models, args.concurrent, args.per_minute))
        print("store it now: only its hash is kept", file=sys.stderr)
    else:
        apikeys.remove(layout, args.name)
    return 0


def _usb_import(args: argparse.Namespace, layout: Layout) -> int:
    from appliance.serve.settings import check_document
    if args.dir is None and args.device is None:
        raise UsageError("give a block device or --dir")
    stick = args.device.name if args.device is not None else str(args.dir)

    def say(line: str) -> None:
        refused = ": refused: " in line
        print(f"stick {stick}: {line}", file=sys.stderr if refused else sys.stdout, flush=True)

    if args.dir is not None:
        report = stick_mod.process(layout, args.dir, check_document, args.wait, say)
    else:
        with actions.mounted(args.device) as mount:
            report = stick_mod.process(layout, mount.path, check_document, args.wait, say,
                                       mount.writable)
    if not report.results:
        print(f"stick {stick}: no *.control or *.bundle file", flush=True)
    if report.receipt is not None:
        print(f"stick {stick}: receipt {report.receipt} written; the stick can be removed",
              flush=True)
    else:
        print(f"stick {stick}: no receipt: {report.receipt_error}", file=sys.stderr, flush=True)
    if report.settings_changed and args.restart:
        subprocess.run(["systemctl", "try-restart", "appliance.service"], check=False)
    if report.system_installed is not None and args.device is not None:
        _reboot_policy(layout, report.system_installed, say)
    return 1 if any(r.result == "refused" for r in report.results) else 0


def _reboot_policy(layout: Layout, version: int, say: Any) -> None:
    """When a written system version boots: the owner's `[system] update_reboot`."""
    from appliance.serve import settings
    try:
        when = settings.load(layout).update_reboot
    except ApplianceError:
        when = "now"  # broken settings must not keep a fix from booting
    if when == "manual":
        say(f"system {version} boots at the next restart (update_reboot = manual)")
        return
    if when == "now":
        say(f"rebooting into system {version}")
        subprocess.run(["systemctl", "reboot", "--no-block"], check=False)
        return
    out = subprocess.run(["systemd-run", "--unit=appliance-system-reboot", "--collect",
                          f"--on-calendar=*-*-* {when}:00", "systemctl", "reboot"],
                         capture_output=True, text=True)
    if out.returncode == 0:
        say(f"system {version} boots at the next {when} (update_reboot)")
    else:
        say(f"system {version}: could not schedule the reboot at {when}: "
            f"{out.stderr.strip()[-200:]}; it boots at the next restart")


def _system(args: argparse.Namespace, layout: Layout) -> int:
    from appliance.device import system
    if args.action == "status":
        print(json.dumps(system.status(layout), indent=2))
        return 0
    if args.action == "install":
        version, seconds = system.install_file(args.file, layout,
                                               lambda line: print(line, flush=True))
        print(f"system {version} written in {seconds} s; the next boot tries it")
        return 0
    if args.action == "settle":
        system.settle(layout, print)
        return 0
    from appliance.serve import settings
    port = settings.load(layout).local_port
    good = system.check(layout, args.timeout, system.health_probe(port),
                        system.unit_failed("appliance.service"), system.bless,
                        lambda line: print(line, flush=True))
    return 0 if good else 1


def _control(args: argparse.Namespace, layout: Layout) -> int:
    from appliance.serve.settings import check_document
    if args.action == "verify":
        c, *_ = control.read(args.file, layout)
        print(f"ok: control {c.name} {c.sequence} for {c.target}, "
              f"{len(c.actions)} action(s); this device has applied up to "
              f"{control.mark(layout, c.name)}")
        return 0
    applied = control.apply_file(args.file, layout, identity.device_id(layout) or "",
                                 check_document)
    for line in applied.done:
        print(line)
    return 0


def _init(args: argparse.Namespace, layout: Layout) -> int:
    """Idempotent: run on every boot, it makes only what is missing."""
    from appliance.device import config
    store = Store(layout)
    with store.locked():
        if not os.path.lexists(layout.config_link):
            with config.change(layout):
                pass  # the seed, copied as it is
            print(f"configuration copied from {layout.seed}")
        try:
            for line in control.resume(layout):
                print(f"finished after a restart: {line}")
        except ApplianceError as exc:  # the service must start all the same
            print(f"could not finish an interrupted control document: {exc.message}",
                  file=sys.stderr)
    if identity.ensure(layout):
        print("made the device identity")
    host = socket.gethostname()
    if tlscert.ensure(layout.identity, [host, f"{host}.local"]):
        print("made the TLS certificate")
    print(f"device {identity.device_id(layout)}")
    print(f"certificate sha256 {tlscert.fingerprint(layout.identity / 'tls.crt')}")
    return 0


def _main(args: argparse.Namespace) -> int:
    layout = Layout.from_env(args.root)
    handler = {"bundle": _bundle, "keys": _keys, "audit": _audit, "status": _status,
               "serve": _serve, "probe": _probe, "apikey": _apikey, "usb-import": _usb_import,
               "control": _control, "init": _init, "system": _system}
    return handler[args.command](args, layout)


def main(argv: list[str] | None = None) -> int:
    return run(_main, _parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
