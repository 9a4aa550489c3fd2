from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import keys
from appliance.install import import_bundle
from appliance.store import Layout

sys.path.insert(0, str(Path(__file__).parent))
from factory import Factory

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_fault_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("APPLIANCE_KILL_AT", "APPLIANCE_CHECKPOINT_LOG", "APPLIANCE_ROOT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def layout(tmp_path: Path, signing_key: Ed25519PrivateKey) -> Layout:
    """A device state root that trusts `signing_key`."""
    layout = Layout(tmp_path / "root")
    trust = layout.trust.path
    trust.mkdir(parents=True)
    kid = keys.key_id(signing_key.public_key())
    (trust / f"{kid}.pub").write_bytes(keys.public_pem(signing_key.public_key()))
    return layout


@pytest.fixture
def factory(tmp_path: Path, signing_key: Ed25519PrivateKey) -> Factory:
    folder = tmp_path / "bundles"
    folder.mkdir()
    return Factory(folder, signing_key)


@pytest.fixture
def installed(layout: Layout, factory: Factory) -> Iterator[Layout]:
    """A device with sequence 1 of bundle `demo` active."""
    import_bundle(factory.bundle(sequence=1), layout)
    yield layout


def cli_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["APPLIANCE_ROOT"] = str(root)
    env.pop("APPLIANCE_KILL_AT", None)
    return env
