"""Where everything of the device lives, under the state root (default `/`; tests and
`make run` use a temporary one):

    etc/appliance/trust/            trusted keys + policy.toml
    var/lib/appliance/store/<name>/<seq>/{manifest.toml,manifest.sig,files/...}
    var/lib/appliance/store/<name>/current -> <seq>      (switched with one rename)
    var/lib/appliance/highwater/<name>                    anti-rollback mark, outside the store
    var/lib/appliance/audit.log (+ .head)                 hash-chained history
    var/lib/appliance/lock                                one bundle operation at a time
    etc/appliance/appliance.toml                          settings
    etc/appliance/api-keys                                `name sha256hex` per line
    run/appliance/                                        the service's runtime state
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
    def trust(self) -> TrustStore:
        return TrustStore(self.root / "etc/appliance/trust")

    @property
    def config(self) -> Path:
        return self.root / "etc/appliance/appliance.toml"

    @property
    def api_keys(self) -> Path:
        return self.root / "etc/appliance/api-keys"

    @property
    def run(self) -> Path:
        """Runtime state of the running service (systemd's RuntimeDirectory)."""
        return self.root / "run/appliance"

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.state / "audit.log")
