"""Building a signed control document from an owner's spec (host side).

The spec is the document itself (`appliance/bundle/control.py`) with `format`, `kind` and
`created` filled in, plus two conveniences that keep secrets and files off the stick:
`key = "sk-..."` in an `apikey-add` becomes its sha256 (the key itself never leaves the host),
and `key_files = ["new.pub", ...]` in a `trust-rotate` become the PEM keys. Paths are relative
to the spec.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.bundle import control as ctl
from appliance.bundle import keys as keyfiles
from appliance.bundle import signing
from appliance.bundle.manifest import FORMAT_VERSION
from appliance.errors import FormatError, UsageError
from appliance.publish.archive import write_signed
from appliance.strict import parse_toml


def build(spec_path: Path, signers: list[Ed25519PrivateKey], out_dir: Path,
          valid_days: int = 30) -> Path:
    """Write `<name>-<sequence>.control` into out_dir and return its path."""
    try:
        doc: dict[str, Any] = parse_toml(spec_path.read_text(), str(spec_path))
    except OSError as exc:
        raise UsageError(f"cannot read {spec_path}: {exc.strerror}") from exc
    created = datetime.now(UTC).replace(microsecond=0)
    doc = {"format": FORMAT_VERSION, "kind": ctl.KIND, "created": created,
           "expires": created + timedelta(days=valid_days), "target": ctl.ALL, **doc}
    actions = doc.get("actions")
    if not isinstance(actions, list):
        raise FormatError(f"{spec_path}: needs [[actions]]")
    for action in actions:
        if not isinstance(action, dict):
            raise FormatError(f"{spec_path}: each [[actions]] entry must be a table")
        if "key" in action:
            action["sha256"] = hashlib.sha256(str(action.pop("key")).encode()).hexdigest()
        if "key_files" in action:
            files = [spec_path.parent / str(f) for f in action.pop("key_files")]
            action["keys"] = [keyfiles.public_pem(keyfiles.load_public(f)).decode()
                              for f in files]
    import tomli_w

    data = tomli_w.dumps(doc).encode()
    parsed = ctl.parse(data, str(spec_path))  # what we sign must be what a device accepts
    sig = signing.sign(data, signers)
    return write_signed(out_dir / parsed.filename, created, data, sig)
