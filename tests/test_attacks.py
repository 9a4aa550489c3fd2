"""One test per attack on the bundle trust path. Each asserts the error class and that the
device's store, high-water marks and active bundle are byte-identical afterwards."""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from factory import MODEL, Factory, default_files, manifest_doc, snapshot

from appliance.bundle import keys
from appliance.bundle.tarformat import BLOCK, header
from appliance.device.install import import_bundle, verify_file
from appliance.device.layout import Layout
from appliance.device.store import Store
from appliance.errors import (
    AlreadyInstalled,
    ApplianceError,
    FormatError,
    IntegrityError,
    RollbackError,
    SignatureError,
)


def rejected(layout: Layout, bundle: Path, error: type[ApplianceError]) -> ApplianceError:
    """Import must fail with `error` and leave the device as it was."""
    before = snapshot(layout.root)
    with pytest.raises(error) as info:
        import_bundle(bundle, layout)
    assert snapshot(layout.root) == before
    assert Store(layout).active("demo") == 1
    with pytest.raises(error):
        verify_file(bundle, layout)
    return info.value


def trust(layout: Layout, key: Ed25519PrivateKey) -> None:
    kid = keys.key_id(key.public_key())
    (layout.trust.path / f"{kid}.pub").write_bytes(keys.public_pem(key.public_key()))


# --- signatures -------------------------------------------------------------------------------

def test_honest_bundle_installs(installed: Layout, factory: Factory) -> None:
    inst = import_bundle(factory.bundle(sequence=2), installed)
    assert (inst.name, inst.sequence) == ("demo", 2)
    assert Store(installed).active("demo") == 2
    assert inst.file(f"{MODEL}/weights.gguf").read_bytes() == default_files()[
        f"{MODEL}/weights.gguf"]


def test_wrong_key(installed: Layout, factory: Factory) -> None:
    bundle = factory.bundle(sequence=2, keys=[Ed25519PrivateKey.generate()])
    err = rejected(installed, bundle, SignatureError)
    assert "0 trusted signature(s), 1 required" in err.message


def test_missing_signature_member(installed: Layout, factory: Factory) -> None:
    spec = factory.spec(sequence=2)
    bundle = factory.write(spec, tar_edit=lambda raw: _drop_member(raw, "manifest.sig"))
    rejected(installed, bundle, FormatError)


def test_empty_signature_file(installed: Layout, factory: Factory) -> None:
    rejected(installed, factory.bundle(sequence=2, sig_bytes=b""), SignatureError)


def test_truncated_signature(installed: Layout, factory: Factory) -> None:
    spec = factory.spec(sequence=2)
    full = _sig_for(factory, spec)
    spec.sig_bytes = full[: len(full) - 20]
    rejected(installed, factory.write(spec), SignatureError)


def test_bit_flipped_signature(installed: Layout, factory: Factory) -> None:
    spec = factory.spec(sequence=2)
    sig = _sig_for(factory, spec)
    entry = sig.split(b'sig = "')[1].split(b'"')[0]
    raw = bytearray(base64.b64decode(entry))
    raw[10] ^= 0x01
    spec.sig_bytes = sig.replace(entry, base64.b64encode(bytes(raw)))
    err = rejected(installed, factory.write(spec), SignatureError)
    assert "does not match" in err.message


def test_manifest_changed_after_signing(installed: Layout, factory: Factory) -> None:
    bundle = factory.bundle(sequence=2, after_sign=lambda b: b.replace(b"sequence = 2",
                                                                       b"sequence = 9"))
    rejected(installed, bundle, SignatureError)


def test_threshold_not_met(installed: Layout, factory: Factory) -> None:
    installed.trust.set_threshold(2)
    trust(installed, Ed25519PrivateKey.generate())
    rejected(installed, factory.bundle(sequence=2), SignatureError)


def test_duplicate_signatures_by_one_key_count_once(installed: Layout, factory: Factory) -> None:
    installed.trust.set_threshold(2)
    bundle = factory.bundle(sequence=2, keys=[factory.key, factory.key])
    err = rejected(installed, bundle, SignatureError)
    assert "1 trusted signature(s), 2 required" in err.message


def test_threshold_met_by_two_keys(installed: Layout, factory: Factory) -> None:
    second = Ed25519PrivateKey.generate()
    trust(installed, second)
    installed.trust.set_threshold(2)
    import_bundle(factory.bundle(sequence=2, keys=[factory.key, second]), installed)
    assert Store(installed).active("demo") == 2


def test_untrusted_extra_signature_is_ignored(installed: Layout, factory: Factory) -> None:
    bundle = factory.bundle(sequence=2, keys=[Ed25519PrivateKey.generate(), factory.key])
    import_bundle(bundle, installed)
    assert Store(installed).active("demo") == 2


def test_oversized_signature_file(installed: Layout, factory: Factory) -> None:
    rejected(installed, factory.bundle(sequence=2, sig_bytes=b"#" * (65 * 1024)), FormatError)


# --- payload integrity ------------------------------------------------------------------------

def test_payload_byte_flipped(installed: Layout, factory: Factory) -> None:
    spec = factory.spec(sequence=2)
    good = spec.files[f"{MODEL}/weights.gguf"]
    spec.members = [(f"{MODEL}/LICENSE.txt", spec.files[f"{MODEL}/LICENSE.txt"]),
                    (f"{MODEL}/weights.gguf", good[:100] + bytes([good[100] ^ 1]) + good[101:])]
    err = rejected(installed, factory.write(spec), IntegrityError)
    assert "sha256" in err.message


def test_file_swapped_from_another_bundle(installed: Layout, factory: Factory) -> None:
    other = default_files(b"b")  # same sizes, other content: a validly signed file elsewhere
    spec = factory.spec(sequence=2)
    spec.members = [(f"{MODEL}/LICENSE.txt", spec.files[f"{MODEL}/LICENSE.txt"]),
                    (f"{MODEL}/weights.gguf", other[f"{MODEL}/weights.gguf"])]
    rejected(installed, factory.write(spec), IntegrityError)


def test_mix_and_match_manifest_and_payload(installed: Layout, factory: Factory) -> None:
    a = factory.spec(sequence=2)
    b = factory.spec(sequence=2, files=default_files(b"b"))
    a.members = sorted(b.files.items())
    rejected(installed, factory.write(a), IntegrityError)


def test_extra_unlisted_member(installed: Layout, factory: Factory) -> None:
    spec = factory.spec(sequence=2)
    spec.members = [*sorted(spec.files.items()), (f"{MODEL}/extra.bin", b"surprise")]
    err = rejected(installed, factory.write(spec), FormatError)
    assert "not listed" in err.message


def test_listed_file_missing(installed: Layout, factory: Factory) -> None:
    spec = factory.spec(sequence=2)
    spec.members = [(f"{MODEL}/LICENSE.txt", spec.files[f"{MODEL}/LICENSE.txt"])]
    rejected(installed, factory.write(spec), IntegrityError)


def test_duplicate_member(installed: Layout, factory: Factory) -> None:
    spec = factory.spec(sequence=2)
    spec.members = [*sorted(spec.files.items()), (f"{MODEL}/LICENSE.txt",
                                                  spec.files[f"{MODEL}/LICENSE.txt"])]
    err = rejected(installed, factory.write(spec), FormatError)
    assert "twice" in err.message


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "models/../../x", "models//x",
                                  "models/./x", "a\\b", ".hidden"])
def test_path_traversal_member(installed: Layout, factory: Factory, name: str) -> None:
    spec = factory.spec(sequence=2)
    spec.members = [*sorted(spec.files.items()), (name, b"x")]
    rejected(installed, factory.write(spec), FormatError)


@pytest.mark.parametrize("name", ["../evil", "/abs/file", "models/../x", "manifest.sig"])
def test_path_traversal_in_signed_manifest(installed: Layout, factory: Factory, name: str) -> None:
    files = {**default_files(), name: b"x"}

    def edit(doc: dict[str, Any]) -> None:
        doc["models"][0]["variants"][0]["files"].append(name)

    spec = factory.spec(sequence=2, files=files, edit_doc=edit)
    spec.members = sorted(default_files().items())
    rejected(installed, factory.write(spec), FormatError)


def test_nul_byte_in_member_name(installed: Layout, factory: Factory) -> None:
    spec = factory.spec(sequence=2)
    target = f"{MODEL}/LICENSE.txt".encode()
    bundle = factory.write(spec, tar_edit=lambda raw: _rewrite_header(
        raw, target, lambda h: h[:7] + b"\0zz" + h[10:]))
    rejected(installed, bundle, FormatError)


@pytest.mark.parametrize("kind", [b"1", b"2", b"3", b"4", b"5", b"6", b"x", b"L", b"S"])
def test_link_device_and_extension_members(installed: Layout, factory: Factory,
                                           kind: bytes) -> None:
    """Hard links, symlinks, devices, folders, FIFOs, pax and GNU headers are all refused."""
    spec = factory.spec(sequence=2)
    target = f"{MODEL}/LICENSE.txt".encode()
    bundle = factory.write(spec, tar_edit=lambda raw: _rewrite_header(
        raw, target, lambda h: h[:156] + kind + h[157:]))
    err = rejected(installed, bundle, FormatError)
    assert "only regular files" in err.message


def test_symlink_made_by_tarfile(installed: Layout, factory: Factory) -> None:
    """A symlink written by a real tar implementation, pointing out of the store."""
    spec = factory.spec(sequence=2)
    good = factory.write(spec)
    buf = io.BytesIO(good.read_bytes()[: -2 * BLOCK])
    buf.seek(0, io.SEEK_END)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo(f"{MODEL}/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tf.addfile(info)
    good.write_bytes(buf.getvalue())
    rejected(installed, good, FormatError)


def test_member_larger_than_declared(installed: Layout, factory: Factory) -> None:
    """The archive claims more bytes than the manifest: refused before reading them."""
    spec = factory.spec(sequence=2)
    big = spec.files[f"{MODEL}/weights.gguf"] + b"EXTRA" * 1000
    spec.members = [(f"{MODEL}/LICENSE.txt", spec.files[f"{MODEL}/LICENSE.txt"]),
                    (f"{MODEL}/weights.gguf", big)]
    err = rejected(installed, factory.write(spec), IntegrityError)
    assert "in the archive" in err.message


def test_endless_member_is_never_read(installed: Layout, factory: Factory) -> None:
    """A header claiming 1 TiB followed by little data: refused at the header."""
    spec = factory.spec(sequence=2)
    target = f"{MODEL}/weights.gguf".encode()

    def huge(h: bytes) -> bytes:
        block = bytearray(h[:124] + b"\x80" + (1 << 40).to_bytes(11, "big") + h[136:])
        block[148:156] = b" " * 8
        block[148:156] = f"{sum(block):06o}".encode() + b"\0 "
        return bytes(block)

    bundle = factory.write(spec, tar_edit=lambda raw: _rewrite_header(raw, target, huge, False))
    rejected(installed, bundle, IntegrityError)


def test_truncated_tar(installed: Layout, factory: Factory) -> None:
    bundle = factory.bundle(sequence=2)
    bundle.write_bytes(bundle.read_bytes()[:3000])
    err = rejected(installed, bundle, FormatError)
    assert "truncated" in err.message


def test_bad_header_checksum(installed: Layout, factory: Factory) -> None:
    bundle = factory.bundle(sequence=2)
    raw = bytearray(bundle.read_bytes())
    raw[5] ^= 0x20  # inside the first member's name
    bundle.write_bytes(bytes(raw))
    rejected(installed, bundle, FormatError)


def test_data_after_end_marker(installed: Layout, factory: Factory) -> None:
    bundle = factory.bundle(sequence=2)
    bundle.write_bytes(bundle.read_bytes() + header("models/tiny/later", 0, 0))
    rejected(installed, bundle, FormatError)


def test_not_a_tar_at_all(installed: Layout, tmp_path: Path) -> None:
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"\x7fELF" + bytes(5000))
    rejected(installed, junk, FormatError)


@pytest.mark.parametrize("name,head", [("models/tiny/w.pkl", b"anything"),
                                       ("models/tiny/w.pt", b"anything"),
                                       ("models/tiny/w.bin", b"\x80\x04\x95 pickle"),
                                       ("models/tiny/w.gguf", b"PK\x03\x04zip")])
def test_pickle_files(installed: Layout, factory: Factory, name: str, head: bytes) -> None:
    files = {f"{MODEL}/LICENSE.txt": b"license", name: head + bytes(100)}
    rejected(installed, factory.bundle(sequence=2, files=files), FormatError)


# --- sequence and time ------------------------------------------------------------------------

def test_equal_sequence(installed: Layout, factory: Factory) -> None:
    """Another bundle under the installed number is a rollback; the very same one (a stick
    left in) is told apart, and changes nothing either."""
    files = {f"{MODEL}/LICENSE.txt": b"license", f"{MODEL}/w.gguf": b"GGUF" + bytes(100)}
    err = rejected(installed, factory.bundle(sequence=1, files=files), RollbackError)
    assert "must be > installed 1" in err.message
    assert not isinstance(err, AlreadyInstalled)
    again = rejected(installed, factory.bundle(sequence=1), AlreadyInstalled)
    assert again.message == "bundle demo sequence 1 is already installed (active)"
    assert again.exit_code == RollbackError.exit_code


def test_same_bundle_that_failed_its_trial_says_so(installed: Layout, factory: Factory) -> None:
    failed = factory.bundle(sequence=2)
    import_bundle(failed, installed)
    store = Store(installed)
    store.activate("demo", 1)
    store.mark_bad("demo", 2)
    with pytest.raises(AlreadyInstalled, match=r"failed its self-test before, not active") as info:
        import_bundle(failed, installed)
    assert "higher sequence" in (info.value.hint or "") and store.active("demo") == 1


def test_same_bundle_again_never_activates_it(installed: Layout, factory: Factory) -> None:
    """After a rollback, the newer bundle still on the stick is reported, not made active."""
    newer = factory.bundle(sequence=2)
    import_bundle(newer, installed)
    Store(installed).activate("demo", 1)
    before = snapshot(installed.root)
    with pytest.raises(AlreadyInstalled, match=r"sequence 2 is already installed \(not active\)"
                       ) as info:
        import_bundle(newer, installed)
    assert info.value.hint == "appliance-ctl bundle activate demo 2"
    assert snapshot(installed.root) == before and Store(installed).active("demo") == 1


def test_older_sequence_after_newer(installed: Layout, factory: Factory) -> None:
    import_bundle(factory.bundle(sequence=5), installed)
    Store(installed).activate("demo", 1)
    before = snapshot(installed.root)
    with pytest.raises(RollbackError, match="sequence 3 must be > installed 5"):
        import_bundle(factory.bundle(sequence=3), installed)
    assert snapshot(installed.root) == before


def test_highwater_survives_store_loss(installed: Layout, factory: Factory) -> None:
    """The mark lives outside the store: wiping the store does not re-open old sequences."""
    import_bundle(factory.bundle(sequence=4), installed)
    shutil.rmtree(installed.store)
    with pytest.raises(RollbackError):
        import_bundle(factory.bundle(sequence=3), installed)


def test_expired_bundle(installed: Layout, factory: Factory) -> None:
    past = datetime.now(UTC) - timedelta(days=1)
    spec = factory.spec(sequence=2, expires=past)
    err = rejected(installed, factory.write(spec), RollbackError)
    assert "expired" in err.message


# --- malformed manifests (validly signed) -----------------------------------------------------

def _doc_edit(**changes: Any) -> Any:
    def edit(doc: dict[str, Any]) -> None:
        for dotted, value in changes.items():
            target = doc
            *parents, last = dotted.split("__")
            for p in parents:
                target = target[int(p)] if p.isdigit() else target[p]
            if value is KeyError:
                del target[last]
            else:
                target[last] = value
    return edit


@pytest.mark.parametrize("changes", [
    {"sequence": "2"},
    {"sequence": True},
    {"sequence": -1},
    {"format": 2},
    {"name": "Demo/../x"},
    {"name": "x" * 100_000},
    {"surprise": 1},
    {"models__0__task": "mining"},
    {"models__0__id": "a" * 5000},
    {"models__0__variants__0__backend": "tpu"},
    {"models__0__variants__0__memory_mb": 1.5},
    {"models__0__variants__0__extra": "x"},
    {"models__0__defaults": {"chat_template": "x" * 70_000}},
    {"models__0__license": KeyError},
    {"files__0__sha256": "00"},
    {"files__0__size": 2**70 // 2**10},
    {"files__0__size": -5},
    {"created": "yesterday"},
])
def test_malformed_manifest(installed: Layout, factory: Factory, changes: dict[str, Any]) -> None:
    bundle = factory.bundle(sequence=2, edit_doc=_doc_edit(**changes))
    err = rejected(installed, bundle, FormatError)
    assert err.message.startswith("manifest.toml: ")


@pytest.mark.parametrize("data", [b"\xff\xfe not utf8", b"name = ", b"a = 1\na = 2",
                                  b"x = '" + b"y" * (2 << 20) + b"'"])
def test_unparseable_manifest(installed: Layout, factory: Factory, data: bytes) -> None:
    rejected(installed, factory.bundle(sequence=2, manifest_bytes=data), FormatError)


def test_manifest_file_claimed_by_no_model(installed: Layout, factory: Factory) -> None:
    files = {**default_files(), f"{MODEL}/orphan.gguf": b"GGUF"}
    def edit(doc: dict[str, Any]) -> None:
        variant = doc["models"][0]["variants"][0]
        variant["path"] = f"{MODEL}/weights.gguf"
        variant["files"].remove(f"{MODEL}/orphan.gguf")

    bundle = factory.bundle(sequence=2, files=files, edit_doc=edit)
    err = rejected(installed, bundle, FormatError)
    assert "belongs to no model" in err.message


def test_case_colliding_paths(installed: Layout, factory: Factory) -> None:
    files = {**default_files(), f"{MODEL}/WEIGHTS.gguf": b"GGUF"}
    rejected(installed, factory.bundle(sequence=2, files=files), FormatError)


def test_file_used_as_folder(installed: Layout, factory: Factory) -> None:
    files = {**default_files(), f"{MODEL}/weights.gguf/inner.gguf": b"GGUF"}
    rejected(installed, factory.bundle(sequence=2, files=files), FormatError)


# --- helpers ----------------------------------------------------------------------------------

def _sig_for(factory: Factory, spec: Any) -> bytes:
    from appliance.bundle import signing
    return signing.sign(factory.manifest_bytes(spec), spec.keys)


def _walk(raw: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, name, size) of each header in an archive we wrote."""
    out, pos = [], 0
    while pos + BLOCK <= len(raw) and raw[pos:pos + BLOCK] != bytes(BLOCK):
        name = raw[pos:pos + 100].rstrip(b"\0")
        size = int(raw[pos + 124:pos + 136].rstrip(b"\0"), 8)
        out.append((pos, name, size))
        pos += BLOCK + size + (-size % BLOCK)
    return out


def _drop_member(raw: bytes, name: str) -> bytes:
    for pos, member, size in _walk(raw):
        if member == name.encode():
            return raw[:pos] + raw[pos + BLOCK + size + (-size % BLOCK):]
    raise AssertionError(name)


def _rewrite_header(raw: bytes, name: bytes, edit: Any, fix_checksum: bool = True) -> bytes:
    for pos, member, _size in _walk(raw):
        if member == name:
            block = bytearray(edit(raw[pos:pos + BLOCK]))
            if fix_checksum:
                block[148:156] = b" " * 8
                block[148:156] = f"{sum(block):06o}".encode() + b"\0 "
            return raw[:pos] + bytes(block) + raw[pos + BLOCK:]
    raise AssertionError(name)


def test_factory_digest_helper_matches() -> None:
    doc = manifest_doc(default_files())
    assert doc["files"][0]["sha256"] == hashlib.sha256(
        default_files()[doc["files"][0]["path"]]).hexdigest()
    assert tomli_w.dumps(doc)
