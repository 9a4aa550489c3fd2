"""The api-keys file: its format, the refusal of every bad line, matching a presented key, and
`appliance-ctl apikey` with scopes and limits (in this process: it is fast)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.cli import ctl
from appliance.device import apikeys
from appliance.device.apikeys import ApiKey, hash_key, match
from appliance.device.layout import Layout
from appliance.errors import FormatError

H = "ab" * 32


def test_round_trip(tmp_path: Path) -> None:
    keys = {"all": ApiKey("all", H),
            "scoped": ApiKey("scoped", "cd" * 32, ("fake-chat", "m-1.5:q4"), 2, 30),
            "slow": ApiKey("slow", "ef" * 32, per_minute=100_000)}
    path = tmp_path / "api-keys"
    apikeys.write(path, keys)
    assert path.read_text() == (f"all {H}\n"
                                f"scoped {'cd' * 32} models=fake-chat,m-1.5:q4 concurrent=2 "
                                f"per_minute=30\n"
                                f"slow {'ef' * 32} per_minute=100000\n")
    assert apikeys.read(path) == keys


def test_old_files_comments_and_option_order(tmp_path: Path) -> None:
    path = tmp_path / "api-keys"
    path.write_text(f"# made by the image\n\nimage {H}\n  b {'cd' * 32} per_minute=5 "
                    "models=x concurrent=1  \n")
    assert apikeys.read(path) == {"image": ApiKey("image", H),
                                  "b": ApiKey("b", "cd" * 32, ("x",), 1, 5)}
    assert apikeys.read(tmp_path / "none") == {}


@pytest.mark.parametrize(("line", "says"), [
    ("lonely", "expected `name sha256hex"),
    (f"bad-name {H}", "not a simple name"),
    (f"9lives {H}", "not a simple name"),
    ("a " + "AB" * 32, "64 lowercase hex"),
    ("a " + "ab" * 31, "64 lowercase hex"),
    ("a " + "zz" * 32, "64 lowercase hex"),
    (f"a {H} extra", "unknown option 'extra'"),
    (f"a {H} colour=red", "unknown option 'colour=red'"),
    (f"a {H} concurrent=1 concurrent=2", "concurrent is given twice"),
    (f"a {H} concurrent=0", "concurrent must be a whole number from 1 to 100000"),
    (f"a {H} concurrent=100001", "concurrent must be"),
    (f"a {H} per_minute=-1", "per_minute must be"),
    (f"a {H} per_minute=1.5", "per_minute must be"),
    (f"a {H} per_minute=\u00b2", "per_minute must be"),
    (f"a {H} per_minute=", "per_minute must be"),
    (f"a {H} models=", "'' is not a model id"),
    (f"a {H} models=a,,b", "'' is not a model id"),
    (f"a {H} models=a,/etc", "'/etc' is not a model id"),
    (f"a {H} models=a,a", "a model is listed twice"),
])
def test_bad_lines_are_refused_naming_file_and_line(tmp_path: Path, line: str,
                                                    says: str) -> None:
    path = tmp_path / "api-keys"
    path.write_text(f"ok {'cd' * 32}\n# fine\n{line}\n")
    with pytest.raises(FormatError, match="api-keys:3: ") as info:
        apikeys.read(path)
    assert says in info.value.message


def test_a_name_twice_and_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "api-keys"
    path.write_text(f"a {H}\na {'cd' * 32}\n")
    with pytest.raises(FormatError, match="api-keys:2: the name 'a' is used twice"):
        apikeys.read(path)
    path.write_bytes(b"a\xff " + H.encode())
    with pytest.raises(FormatError, match="not UTF-8"):
        apikeys.read(path)


def test_match_finds_the_key_it_hashes_to() -> None:
    keys = [ApiKey(f"k{i}", hash_key(f"secret-{i}"), concurrent=i + 1) for i in range(4)]
    assert match("secret-2", keys) == keys[2]
    assert match("secret-0", keys) == keys[0]
    assert match("secret-9", keys) is None
    assert match("", keys) is None
    assert match("secret-1", []) is None


def _ctl(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str, str]:
    code = ctl.main(["--root", str(root), "apikey", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_create_with_scope_and_limits(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _ctl(capsys, tmp_path, "create", "laptop", "--models", "fake-chat,fake-embed",
                        "--concurrent", "2", "--per-minute", "60")
    assert code == 0 and out.startswith(apikeys.PREFIX)
    code, out, _ = _ctl(capsys, tmp_path, "create", "any")
    assert code == 0
    stored = apikeys.read(Layout(tmp_path).api_keys)
    assert stored["laptop"] == ApiKey("laptop", stored["laptop"].sha256,
                                      ("fake-chat", "fake-embed"), 2, 60)
    assert match(out.strip(), stored.values()) == ApiKey("any", hash_key(out.strip()))
    code, out, _ = _ctl(capsys, tmp_path, "list")
    assert out.splitlines() == ["laptop: models=fake-chat,fake-embed concurrent=2 per_minute=60",
                                "any: all models, no limits"]
    entries = list(Layout(tmp_path).audit.entries())
    assert entries[0]["event"] == "apikey-create" and "concurrent=2" in entries[0]["limits"]


@pytest.mark.parametrize(("args", "says"), [
    (["--models", "a,,b"], "'' is not a model id"),
    (["--concurrent", "-1"], "concurrent must be from 0 (no limit) to 100000"),
    (["--per-minute", "100001"], "per_minute must be"),
])
def test_cli_refuses_bad_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                args: list[str], says: str) -> None:
    code, out, err = _ctl(capsys, tmp_path, "create", "k", *args)
    assert code == 2 and out == "" and says in err
    assert apikeys.read(Layout(tmp_path).api_keys) == {}


def test_cli_name_taken_and_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _ctl(capsys, tmp_path, "create", "k")[0] == 0
    code, _, err = _ctl(capsys, tmp_path, "create", "k", "--concurrent", "1")
    assert code == 2 and "exists" in err and "apikey remove k" in err
    assert _ctl(capsys, tmp_path, "remove", "k")[0] == 0
    assert apikeys.read(Layout(tmp_path).api_keys) == {}
    code, _, err = _ctl(capsys, tmp_path, "remove", "k")
    assert code == 2 and "no API key named 'k'" in err
