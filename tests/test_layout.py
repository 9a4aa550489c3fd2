"""The package's sides stay apart: a host module loads nothing of the service, and no
subpackage imports one that sits above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "appliance"
# what each side may import (besides itself and the shared top-level modules)
ALLOWED = {
    "bundle": set(),
    "device": {"bundle"},
    "publish": {"bundle", "engines"},  # the host runs the models for self-test goldens
    "image": {"bundle", "publish", "device"},
    "engines": {"bundle"},  # self-tests read the manifest's checks
    "serve": {"bundle", "device", "engines", "api"},  # api only in serve/service.py, lazily
    "api": {"bundle", "device", "engines", "serve"},
    "cli": {"bundle", "device", "publish", "image", "serve", "api", "engines"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "appliance."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "appliance":
            found.update(a.name for a in node.names)
    return found


def test_sides_import_only_downwards() -> None:
    for side, allowed in ALLOWED.items():
        for path in (PACKAGE / side).glob("*.py"):
            wrong = {m for m in _imports(path) if m in ALLOWED and m != side and m not in allowed}
            assert not wrong, f"{path.relative_to(PACKAGE)} imports {sorted(wrong)}"
    service_users = [p.name for p in (PACKAGE / "serve").glob("*.py") if "api" in _imports(p)]
    assert service_users == ["service.py"]


def test_building_an_image_loads_no_service() -> None:
    probe = ("import sys, appliance.image.build, appliance.publish.build, appliance.cli.build; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', "
             "'llama_cpp', 'onnxruntime') or m.startswith(('appliance.api', 'appliance.serve', "
             "'appliance.engines'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out
