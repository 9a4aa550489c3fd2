"""The device's own identity: an Ed25519 key made on first boot on the state partition (never
in an image, so every device flashed from one image is still its own). The device id is the
hex sha256 of the raw public key, so it names the key itself; receipts are signed with it."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.bundle import keys
from appliance.device.layout import Layout
from appliance.errors import StoreError
from appliance.fsutil import atomic_write

KEY = "device.key"
PUB = "device.pub"


@dataclass(frozen=True)
class Identity:
    key: Ed25519PrivateKey

    @property
    def id(self) -> str:
        return keys.key_id(self.key.public_key())

    @property
    def public_raw(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.Raw,
                                                  serialization.PublicFormat.Raw)


def ensure(layout: Layout) -> bool:
    """Make the identity key if there is none; True if it was made now."""
    folder = layout.identity
    if (folder / KEY).exists():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o711)  # the service may reach its TLS files inside, not list or read the key
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    atomic_write(folder / PUB, keys.public_pem(private.public_key()))
    atomic_write(folder / KEY, pem, mode=0o600)  # last: its presence means all is there
    return True


def load(layout: Layout) -> Identity:
    path = layout.identity / KEY
    if not path.exists():
        raise StoreError("this device has no identity yet",
                         hint="run `appliance-ctl init` as root (the image does on first boot)")
    return Identity(keys.load_private(path))


def device_id(layout: Layout) -> str | None:
    """The id, or None before `init` (read from the public half: no root needed)."""
    path = layout.identity / PUB
    if not path.exists():
        return None
    return keys.key_id(keys.load_public(path))


