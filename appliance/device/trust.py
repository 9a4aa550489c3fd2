"""The device's trust store: a folder of `<keyid>.pub` PEM files plus `policy.toml` (the
threshold of signatures a bundle needs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.bundle.keys import key_id, load_public, public_pem, read_small
from appliance.errors import StoreError, UsageError
from appliance.fsutil import atomic_write
from appliance.strict import parse_toml


@dataclass(frozen=True)
class TrustStore:
    """The device's trusted signing keys and how many of them must sign a bundle."""

    path: Path

    @property
    def policy_path(self) -> Path:
        return self.path / "policy.toml"

    def keys(self) -> dict[str, Ed25519PublicKey]:
        """All trusted keys by id. A file whose name disagrees with its key is an error."""
        if not self.path.is_dir():
            return {}
        found: dict[str, Ed25519PublicKey] = {}
        for entry in sorted(self.path.glob("*.pub")):
            key = load_public(entry)
            kid = key_id(key)
            if entry.name != f"{kid}.pub":
                raise StoreError(
                    f"trust store file {entry.name} holds key {kid[:16]}…",
                    hint="remove it and add the key again with `appliance-ctl keys add`",
                )
            found[kid] = key
        return found

    def threshold(self) -> int:
        return self.policy()[0]

    def version(self) -> int:
        """Rises by one with each signed trust rotation (TUF's root version)."""
        return self.policy()[1]

    def policy(self) -> tuple[int, int]:
        """(threshold, version) from policy.toml; (1, 1) without one."""
        if not self.policy_path.exists():
            return 1, 1
        try:
            text = read_small(self.policy_path).decode()
        except UnicodeDecodeError as exc:
            raise StoreError(f"{self.policy_path} is not UTF-8") from exc
        policy = parse_toml(text, str(self.policy_path), StoreError, max_depth=1)
        values = [policy.get("threshold", 1), policy.get("version", 1)]
        if set(policy) - {"threshold", "version"} or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise StoreError(f"{self.policy_path}: only `threshold` and `version` integers "
                             "are allowed")
        if min(values) < 1:
            raise StoreError(f"{self.policy_path}: threshold and version must be at least 1")
        return values[0], values[1]

    def set_threshold(self, value: int, version: int | None = None) -> None:
        if value < 1:
            raise UsageError("threshold must be at least 1")
        version = self.version() if version is None else version
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.policy_path, f"threshold = {value}\nversion = {version}\n".encode())

    def add(self, pub_file: Path) -> str:
        return self.add_key(load_public(pub_file))

    def add_key(self, key: Ed25519PublicKey) -> str:
        kid = key_id(key)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / f"{kid}.pub", public_pem(key))
        return kid

    def remove(self, kid_prefix: str) -> str:
        matches = [k for k in self.keys() if k.startswith(kid_prefix.lower())]
        if len(kid_prefix) < 8 or len(matches) != 1:
            raise UsageError(
                f"no single trusted key matches {kid_prefix!r}",
                hint="give at least 8 hex digits of a key id from `appliance-ctl keys list`",
            )
        (self.path / f"{matches[0]}.pub").unlink()
        return matches[0]
