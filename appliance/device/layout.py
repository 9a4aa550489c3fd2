"""Where everything of the device lives, under the state root (default `/`; tests and
`make run` use a temporary one). All that changes after flashing is on the state partition
(`var/lib/appliance`); the read-only root only holds the seed:

    var/lib/appliance/config -> config.<gen>              trust, API keys, settings, control
                                                          marks: one folder, swapped whole
    var/lib/appliance/config.<gen>/trust/                 trusted keys + policy.toml
    var/lib/appliance/config.<gen>/appliance.toml         settings
    var/lib/appliance/config.<gen>/api-keys               `name sha256hex [limits]` per line
    var/lib/appliance/config.<gen>/control/<name>         highest control sequence applied
    var/lib/appliance/identity/                           device key, TLS key and certificate
    var/lib/appliance/store/<name>/<seq>/{manifest.toml,manifest.sig,files/...}
    var/lib/appliance/store/<name>/current -> <seq>      (switched with one rename)
    var/lib/appliance/highwater/<name>                    anti-rollback mark, outside the store
    var/lib/appliance/audit.log (+ .head)                 hash-chained history
    var/lib/appliance/lock                                one bundle operation at a time
    etc/appliance/                                        the seed of `config` (the image's)
    run/appliance/                                        the service's runtime state

Until the first change (or `appliance-ctl init` on first boot) there is no `config` link and
the seed is read as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from appliance.device.audit import AuditLog
from appliance.device.trust import TrustStore


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def from_env(cls, root: str | None) -> Layout:
        return cls(Path(root or os.environ.get("APPLIANCE_ROOT") or "/"))

    @property
    def state(self) -> Path:
        return self.root / "var/lib/appliance"

    @property
    def store(self) -> Path:
        return self.state / "store"

    @property
    def highwater_dir(self) -> Path:
        return self.state / "highwater"

    @property
    def seed(self) -> Path:
        return self.root / "etc/appliance"

    @property
    def config_link(self) -> Path:
        return self.state / "config"

    @property
    def config_dir(self) -> Path:
        """The live configuration: the state partition's generation, or else the seed."""
        return self.config_link if os.path.lexists(self.config_link) else self.seed

    @property
    def trust(self) -> TrustStore:
        return TrustStore(self.config_dir / "trust")

    @property
    def config(self) -> Path:
        return self.config_dir / "appliance.toml"

    @property
    def api_keys(self) -> Path:
        return self.config_dir / "api-keys"

    @property
    def identity(self) -> Path:
        """The device's own keys: made on first boot, never in an image."""
        return self.state / "identity"

    @property
    def run(self) -> Path:
        """Runtime state of the running service (systemd's RuntimeDirectory)."""
        return self.root / "run/appliance"

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.state / "audit.log")
