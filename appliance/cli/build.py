"""appliance-build: the host tool (keys, bundles; images arrive with the image builder)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.bundle import keys
from appliance.cli.common import log, run
from appliance.errors import UsageError
from appliance.publish import build as bundle


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance-build", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    kg = sub.add_parser("keygen", help="write an Ed25519 signing key pair")
    kg.add_argument("--out", type=Path, required=True, help="PREFIX: writes PREFIX.key, PREFIX.pub")
    b = sub.add_parser("bundle", help="build and sign a bundle from a recipe")
    b.add_argument("recipe", type=Path, help="a recipe, e.g. bundles/demo.toml")
    b.add_argument("--key", type=Path, action="append", required=True,
                   help="private signing key (repeat for several signatures)")
    b.add_argument("--out", type=Path, required=True, help="folder for <name>-<sequence>.bundle")
    b.add_argument("--sequence", type=int, help="override the recipe's sequence")
    b.add_argument("--cache", type=Path, default=Path(".cache/bundle"),
                   help="where fetched and converted models are kept (default .cache/bundle)")
    im = sub.add_parser("image", help="build the OS image of a target (build/targets/*.toml)")
    im.add_argument("--target", required=True, help="x86_64-cpu, x86_64-cuda, arm64, jetson")
    im.add_argument("--out", type=Path, required=True, help="folder for the image and manifest")
    im.add_argument("--key", type=Path, help="publisher key for the preloaded bundle "
                    "(default: a new one, written beside the image)")
    im.add_argument("--api-keys", type=Path,
                    help="API key hashes for the image's seed, `name sha256hex` per line (as "
                    "`appliance-ctl apikey` keeps them); none: the first control document "
                    "adds a key")
    im.add_argument("--cache", type=Path, default=Path(".cache/image"),
                    help="built wheels and scratch space (default .cache/image)")
    im.add_argument("--targets", type=Path, default=None,
                    help="folder of target files (default build/targets); a copy with your "
                    "own mirrors is how an offline build host points at its mirror")
    im.add_argument("--llama-wheel", type=Path, default=None,
                    help="a llama-cpp-python wheel built elsewhere (e.g. on a Jetson), "
                    "installed instead of building one")
    im.add_argument("--system-version", type=int, default=None,
                    help="the system version (default: SOURCE_DATE_EPOCH or the build time); "
                    "a device installs only a version above its own")
    im.add_argument("--no-system-update", action="store_true",
                    help="do not also write the version as a signed .system file")
    su = sub.add_parser("system-update", help="a signed system update from a root file system, "
                        "kernel and initrd (an image build writes its own)")
    su.add_argument("--root", type=Path, required=True, help="the slot's ext4 image")
    su.add_argument("--kernel", type=Path, required=True)
    su.add_argument("--initrd", type=Path, required=True)
    su.add_argument("--version", type=int, required=True, help="IMAGE_VERSION inside the root")
    su.add_argument("--target", required=True, help="the image target, e.g. x86_64-cpu")
    su.add_argument("--key", type=Path, action="append", required=True,
                    help="private signing key (repeat for several signatures)")
    su.add_argument("--out", type=Path, required=True, help="folder for appliance-os-<v>.system")
    c = sub.add_parser("control", help="build and sign a control document from a spec")
    c.add_argument("spec", type=Path, help="the document's TOML (see docs/control.md)")
    c.add_argument("--key", type=Path, action="append", required=True,
                   help="private signing key (repeat for several signatures)")
    c.add_argument("--out", type=Path, required=True, help="folder for <name>-<sequence>.control")
    c.add_argument("--days", type=int, default=30, help="days until it expires (default 30)")
    r = sub.add_parser("receipts", help="verify the receipts of many devices; the fleet table")
    r.add_argument("folder", type=Path, help="receipts copied from the sticks (searched deeply)")
    r.add_argument("--fleet", type=Path, help="the devices expected: `device-id name` per line")
    cmp = sub.add_parser("image-compare", help="list what differs between two image builds")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    return p


def _main(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        kid = keys.generate(args.out)
        print(f"key id {kid}")
        print(f"private key: {args.out}.key (keep it off the devices)")
        print(f"public key:  {args.out}.pub (trust it with `appliance-ctl keys add`)")
        return 0
    if args.command == "image-compare":
        from appliance.image import build as image
        for line in image.compare(args.a, args.b):
            print(line)
        return 0
    if args.command == "image":
        from appliance.image import build as image
        from appliance.image import target
        args.cache.mkdir(parents=True, exist_ok=True)
        if args.api_keys is not None:
            from appliance.device import apikeys
            apikeys.read(args.api_keys)  # a typo must not cost an image build
        folder = args.targets.resolve() if args.targets else target.TARGETS
        wheel = args.llama_wheel.resolve() if args.llama_wheel else None
        if wheel is not None and not wheel.is_file():
            raise UsageError(f"--llama-wheel {args.llama_wheel}: no such file")
        built = image.build(target.load(args.target, folder), args.out.resolve(),
                            args.cache.resolve(), log, args.key, args.api_keys, llama_wheel=wheel,
                            version=args.system_version,
                            system_update=not args.no_system_update)
        print(f"{built} ({built.stat().st_size >> 20} MiB)")
        return 0
    if args.command == "receipts":
        from appliance.publish import fleet
        found = fleet.scan(args.folder, fleet.read_fleet(args.fleet) if args.fleet else None)
        print(fleet.table(found))
        return 1 if found.invalid else 0
    signers = [keys.load_private(k) for k in args.key]
    if args.command == "system-update":
        from appliance.image import target
        from appliance.publish import system
        arch = target.load(args.target).architecture.value
        path = system.build(args.root, args.kernel, args.initrd, args.version, args.target,
                            arch, signers, args.out, log)
        print(f"{path} ({path.stat().st_size >> 20} MiB)")
        return 0
    if args.command == "control":
        from appliance.publish import control
        path = control.build(args.spec, signers, args.out, args.days)
        print(path)
        return 0
    path = bundle.build(args.recipe, signers, args.out, args.cache, log, args.sequence)
    print(f"{path} ({path.stat().st_size >> 20} MiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_main, _parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
