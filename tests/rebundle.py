"""Bundles that are validly signed but fail their self-test on any device: an installed
sequence re-signed under a new sequence number, its chat check asking for a word the model
never says."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from appliance.bundle import keys, signing
from appliance.bundle import manifest as mf
from appliance.bundle.tarformat import TarWriter
from appliance.device.layout import Layout
from appliance.device.store import Store


def failing_copy(root: Path, key_file: Path, sequence: int, out: Path) -> Path:
    store = Store(Layout(root))
    inst = store.load("demo", store.active("demo") or 0)
    models = tuple(dataclasses.replace(m, checks=(dataclasses.replace(
        m.checks[0], contains=("Zanzibar",)),)) if m.task is mf.Task.CHAT else m
        for m in inst.manifest.models)
    manifest = dataclasses.replace(inst.manifest, sequence=sequence, models=models).to_toml()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"demo-{sequence}.bundle"
    with path.open("wb") as f:
        tar = TarWriter(f, 1_700_000_000)
        tar.add_bytes("manifest.toml", manifest)
        tar.add_bytes("manifest.sig", signing.sign(manifest, [keys.load_private(key_file)]))
        for entry in inst.manifest.files:
            tar.add_bytes(entry.path, inst.file(entry.path).read_bytes())
        tar.close()
    return path
