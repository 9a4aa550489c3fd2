"""Both command-line tools as a person runs them: output, `error:`/`hint:` lines, exit codes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env

from appliance.errors import (
    FetchError,
    FormatError,
    IntegrityError,
    RollbackError,
    SignatureError,
    StoreError,
    UsageError,
)


def run(tool: str, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"appliance.cli.{tool}", *args],
                          env=cli_env(root), capture_output=True, text=True, timeout=120)


def _recipe(tmp_path: Path, weights: bytes = b"GGUF" + b"w" * 5000) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny.gguf").write_bytes(weights)
    (src / "LICENSE").write_text("MIT\n")
    for i, chunk in enumerate((weights[:2000], weights[2000:])):
        (src / f"part{i}").write_bytes(chunk)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f"""
name = "tiny"
sequence = 3
[[sources]]
key = "local"
path = "src"
[[models]]
id = "tiny-chat"
task = "chat"
license = "local:LICENSE"
weights = "local:tiny.gguf"
[[models.variants]]
backend = "cpu"
format = "gguf"
quantization = "Q8_0"
[[models]]
id = "tiny-joined"
task = "chat"
license = "local:LICENSE"
[models.join]
name = "joined.gguf"
sha256 = "{hashlib.sha256(weights).hexdigest()}"
parts = ["local:part0", "local:part1"]
[[models.variants]]
backend = "cpu"
format = "gguf"
quantization = "Q8_0"
""")
    return recipe


def test_workflow_keygen_build_import_status_rollback(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert run("build", root, "keygen", "--out", str(tmp_path / "pub")).returncode == 0
    recipe = _recipe(tmp_path)
    built = run("build", root, "bundle", str(recipe), "--key", str(tmp_path / "pub.key"),
                "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"))
    assert built.returncode == 0, built.stderr
    bundle = tmp_path / "out" / "tiny-3.bundle"
    assert bundle.is_file()

    refused = run("ctl", root, "bundle", "import", str(bundle))
    assert refused.returncode == SignatureError.exit_code
    assert refused.stderr.splitlines()[-2:] == [
        "error: this device trusts no signing key",
        "hint: add the publisher's key with `appliance-ctl keys add KEY.pub`"]

    assert run("ctl", root, "keys", "add", str(tmp_path / "pub.pub")).returncode == 0
    imported = run("ctl", root, "bundle", "import", str(bundle))
    assert imported.returncode == 0, imported.stderr
    assert "imported tiny sequence 3" in imported.stdout
    assert "tiny-chat" in imported.stdout and "tiny-joined" in imported.stdout

    again = run("build", root, "bundle", str(recipe), "--key", str(tmp_path / "pub.key"),
                "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
                "--sequence", "4")
    assert again.returncode == 0, again.stderr
    assert run("ctl", root, "bundle", "import",
               str(tmp_path / "out" / "tiny-4.bundle")).returncode == 0
    status = json.loads(run("ctl", root, "status", "--json").stdout)
    assert status["bundles"][0]["active"] == 4
    assert [m["id"] for m in status["bundles"][0]["models"]] == ["tiny-chat", "tiny-joined"]

    back = run("ctl", root, "bundle", "rollback", "tiny")
    assert back.returncode == 0 and "sequence 3 active (was 4)" in back.stdout
    assert run("ctl", root, "bundle", "check").returncode == 0
    old = run("ctl", root, "bundle", "import", str(bundle))
    assert old.returncode == RollbackError.exit_code
    assert "sequence 3 is already installed (active)" in old.stderr
    audit = run("ctl", root, "audit", "verify")
    assert audit.returncode == 0 and "6 entries" in audit.stdout, audit.stdout


def test_exit_codes_are_distinct() -> None:
    codes = [e.exit_code for e in (UsageError, FormatError, SignatureError, RollbackError,
                                   IntegrityError, StoreError, FetchError)]
    assert len(set(codes)) == len(codes)


def test_integrity_error_exit_code_and_debug(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run("build", root, "keygen", "--out", str(tmp_path / "k"))
    run("ctl", root, "keys", "add", str(tmp_path / "k.pub"))
    run("build", root, "bundle", str(_recipe(tmp_path)), "--key", str(tmp_path / "k.key"),
        "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"))
    bundle = tmp_path / "out" / "tiny-3.bundle"
    raw = bytearray(bundle.read_bytes())
    raw[-2048] ^= 0xFF  # inside the last payload file's data
    bundle.write_bytes(bytes(raw))
    result = run("ctl", root, "bundle", "verify", str(bundle))
    assert result.returncode == IntegrityError.exit_code
    assert "Traceback" not in result.stderr
    debug = run("ctl", root, "--debug", "bundle", "verify", str(bundle))
    assert "Traceback" in debug.stderr


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    result = run("ctl", tmp_path, "bundle", "import", str(tmp_path / "nope.bundle"))
    assert result.returncode == StoreError.exit_code
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize("edit,error", [
    (lambda s: s.replace('quantization = "Q8_0"', 'quantization = "Q8_0"\nbogus = 1', 1),
     "bogus is not a known key"),
    (lambda s: s.replace('sequence = 3', 'sequence = "3"'), "sequence must be an integer"),
    (lambda s: s.replace('"local:part0", ', ''), "join to sha256"),
    (lambda s: s.replace('local:tiny.gguf', 'local:../../etc/passwd'), "relative path"),
    (lambda s: s.replace('local:tiny.gguf', 'nowhere:tiny.gguf'), "unknown source"),
])
def test_bad_recipes(tmp_path: Path, edit: object, error: str) -> None:
    recipe = _recipe(tmp_path)
    recipe.write_text(edit(recipe.read_text()))  # type: ignore[operator]
    run("build", tmp_path, "keygen", "--out", str(tmp_path / "k"))
    result = run("build", tmp_path, "bundle", str(recipe), "--key", str(tmp_path / "k.key"),
                 "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"))
    assert result.returncode != 0
    assert error in result.stderr, result.stderr
    assert not list((tmp_path / "out").glob("*.bundle")) if (tmp_path / "out").exists() else True


def test_recipe_symlink_in_model_folder_is_refused(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    folder = tmp_path / "src" / "folder"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"ok")
    (folder / "evil").symlink_to("/etc/passwd")
    recipe.write_text(recipe.read_text().replace('local:tiny.gguf', 'local:folder'))
    run("build", tmp_path, "keygen", "--out", str(tmp_path / "k"))
    result = run("build", tmp_path, "bundle", str(recipe), "--key", str(tmp_path / "k.key"),
                 "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"))
    assert result.returncode == FormatError.exit_code
    assert "symbolic link" in result.stderr


def test_chunks_join_into_their_model_folder(tmp_path: Path) -> None:
    """A folder whose big file was published in chunks (as whisper base is): the joined file
    goes into the folder under its name, and the chunks stay out of the bundle."""
    recipe = _recipe(tmp_path)
    folder = tmp_path / "src" / "ct2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.bin.part0").write_bytes((tmp_path / "src" / "part0").read_bytes())
    text = recipe.read_text().replace(
        '[models.join]\nname = "joined.gguf"',
        'weights = "local:ct2"\n[models.join]\nname = "model.bin"').replace(
        '"local:part0"', '"local:ct2/model.bin.part0"')
    recipe.write_text(text)
    run("build", tmp_path, "keygen", "--out", str(tmp_path / "k"))
    for _ in range(2):  # the second build reuses the assembled folder from the cache
        built = run("build", tmp_path, "bundle", str(recipe), "--key", str(tmp_path / "k.key"),
                    "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"))
        assert built.returncode == 0, built.stderr
    import tarfile
    with tarfile.open(tmp_path / "out" / "tiny-3.bundle") as tf:
        names = set(tf.getnames())
        joined = tf.extractfile("models/tiny-joined/gguf/model.bin")
        assert joined is not None and joined.read() == (tmp_path / "src" / "tiny.gguf").read_bytes()
    assert "models/tiny-joined/gguf/config.json" in names
    assert not [n for n in names if "part" in n]


def test_usb_import_takes_only_regular_bundle_files(tmp_path: Path) -> None:
    """What the udev-started unit runs on a mounted stick: good bundles imported, bad ones
    rejected (exit 1, reason on stderr), links and other files never touched."""
    root = tmp_path / "root"
    run("build", root, "keygen", "--out", str(tmp_path / "k"))
    run("ctl", root, "keys", "add", str(tmp_path / "k.pub"))
    built = run("build", root, "bundle", str(_recipe(tmp_path)), "--key", str(tmp_path / "k.key"),
                "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"))
    assert built.returncode == 0, built.stderr
    stick = tmp_path / "stick"
    stick.mkdir()
    (tmp_path / "out" / "tiny-3.bundle").rename(stick / "tiny-3.bundle")
    (stick / "broken.bundle").write_bytes(b"not a bundle at all" * 100)
    (stick / "link.bundle").symlink_to(stick / "tiny-3.bundle")
    (stick / "run-me.sh").write_text("#!/bin/sh\ntouch /tmp/pwned\n")
    result = run("ctl", root, "usb-import", "--dir", str(stick))
    assert result.returncode == 1
    assert "tiny-3.bundle: imported tiny sequence 3" in result.stdout
    assert "broken.bundle: refused" in result.stderr
    assert "link.bundle" not in result.stdout + result.stderr
    assert json.loads(run("ctl", root, "status", "--json").stdout)["bundles"][0]["active"] == 3
    events = [json.loads(line)["result"] for line in run("ctl", root, "audit", "show").stdout
              .splitlines() if json.loads(line)["event"] == "import"]
    assert events == ["rejected", "ok"]  # broken.bundle sorts first


def test_usb_import_needs_a_device_or_folder(tmp_path: Path) -> None:
    result = run("ctl", tmp_path, "usb-import")
    assert result.returncode == UsageError.exit_code
    assert "error: give a block device" in result.stderr


def test_image_api_key_hashes_are_checked_first(tmp_path: Path) -> None:
    """`--api-keys` takes hashes only, checked before the (long) image build starts."""
    keys = tmp_path / "api-keys"
    keys.write_text("owner sk-appliance-this-is-a-key-not-a-hash\n")
    result = run("build", tmp_path, "image", "--target", "x86_64-cpu", "--out",
                 str(tmp_path / "out"), "--api-keys", str(keys), "--cache", str(tmp_path / "c"))
    assert result.returncode == FormatError.exit_code
    assert result.stderr.count("\n") <= 2 and "api-keys:1" in result.stderr
    assert not (tmp_path / "out").exists()
