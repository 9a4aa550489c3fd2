"""Pieces of the image builder that run without building an image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance import image
from appliance.target import load


def _build_dir(root: Path, sha: str, files: dict[str, str]) -> Path:
    root.mkdir()
    (root / "t.manifest.json").write_text(json.dumps({"sha256": sha, "packages": ["a 1"]}))
    (root / "t.files").write_text("".join(f"{h}  {p}\n" for p, h in files.items()))
    return root


def test_compare_lists_differences(tmp_path: Path) -> None:
    a = _build_dir(tmp_path / "a", "11" * 32,
                   {"etc/hostname": "aa", "etc/appliance/api-keys": "bb"})
    b = _build_dir(tmp_path / "b", "22" * 32,
                   {"etc/hostname": "aa", "etc/appliance/api-keys": "cc", "var/extra": "dd"})
    assert image.compare(a, b) == ["image differs: 1111111111111111 vs 2222222222222222",
                                   "file differs: etc/appliance/api-keys",
                                   "file differs: var/extra"]
    same = _build_dir(tmp_path / "c", "11" * 32, {"etc/hostname": "aa",
                                                  "etc/appliance/api-keys": "bb"})
    assert image.compare(a, same) == ["image identical"]


def test_missing_tool_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(image.ImageError, match="needs mmdebstrap") as info:
        image.need("mmdebstrap")
    assert info.value.hint == "apt-get install mmdebstrap"


def test_cuda_target_stops_early_without_nvcc(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image.shutil, "which",
                        lambda tool: None if tool == "nvcc" else f"/usr/bin/{tool}")
    ctx = image.Context(load("x86_64-cuda"), tmp_path, tmp_path, tmp_path, print, None)
    with pytest.raises(image.ImageError, match="needs nvcc on the build host"):
        image.check_host(ctx)


def test_foreign_architecture_is_refused_plainly(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    ctx = image.Context(load("arm64"), tmp_path, tmp_path, tmp_path, print, None)
    with pytest.raises(image.ImageError, match="needs qemu-user emulation"):
        image.check_host(ctx)
