"""Deep nesting in any untrusted file ends in the one-line error and exit code of its class,
never in a RecursionError traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_tool
from factory import Factory

from appliance.device.layout import Layout
from appliance.errors import FormatError
from appliance.strict import MAX_DEPTH, parse_toml, toml_depth

DEEP_ARRAY = "[" * 20_000 + "]" * 20_000  # 40 KB: under the 64 KiB cap of manifest.sig
DEEP_TABLE = "{a = " * 5_000 + "1" + "}" * 5_000


def _one_line_error(result: object, code: int) -> None:
    stderr: str = result.stderr  # type: ignore[attr-defined]
    assert result.returncode == code, stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr and "RecursionError" not in stderr
    assert stderr.startswith("error: ") and len(stderr.splitlines()) <= 2, stderr


@pytest.mark.parametrize("payload", [DEEP_ARRAY, DEEP_TABLE])
def test_deep_manifest_sig(installed: Layout, factory: Factory, payload: str) -> None:
    bundle = factory.bundle(sequence=2, sig_bytes=f"x = {payload}\n".encode())
    _one_line_error(run_tool("ctl", installed.root, "bundle", "verify", str(bundle)), 4)
    _one_line_error(run_tool("ctl", installed.root, "bundle", "import", str(bundle)), 4)


@pytest.mark.parametrize("payload", [f"x = {DEEP_ARRAY}\n", f"x = {DEEP_TABLE}\n",
                                     "a" + ".a" * 5_000 + " = 1\n",
                                     "[" + ".".join(["t"] * 5_000) + "]\n"])
def test_deep_signed_manifest(installed: Layout, factory: Factory, payload: str) -> None:
    bundle = factory.bundle(sequence=2, manifest_bytes=payload.encode())
    _one_line_error(run_tool("ctl", installed.root, "bundle", "verify", str(bundle)), 3)


def test_deep_settings_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = root / "etc/appliance/appliance.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f"[server]\nallowed_hosts = {DEEP_ARRAY}\n")
    _one_line_error(run_tool("ctl", root, "serve"), 3)


def test_deep_trust_policy(installed: Layout) -> None:
    deep = "[" * 5_000 + "]" * 5_000  # under the 16 KiB cap of trust files
    (installed.trust.path / "policy.toml").write_text(f"threshold = {deep}\n")
    _one_line_error(run_tool("ctl", installed.root, "status"), 7)


def test_depth_scan_skips_strings_and_comments() -> None:
    text = ('a = "[[[[{{{{"\nb = \'[[[[\'\nc = """\n[[[[\n"""\nd = \'\'\'[[[[\'\'\'\n'
            '# [[[[[[[[\ne = [[1], [2]]\nf = "esc \\" [[[["\ng = """q"""" ; [[\n')
    assert toml_depth(text) <= 3
    assert parse_toml('a = [[1], [2]]\nb = "[[[["', "x") == {"a": [[1], [2]], "b": "[[[["}
    # the closing delimiter may touch up to two quotes of the content; what follows counts
    sneaky = 'a = [ """x"""", ' + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + " ]\n"
    with pytest.raises(FormatError, match="deeper than"):
        parse_toml(sneaky, "x")
