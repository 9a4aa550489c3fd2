from __future__ import annotations

from pathlib import Path

import pytest

from appliance.device.store import Layout
from appliance.errors import FormatError, UsageError
from appliance.serve import settings


def write(root: Path, text: str) -> Layout:
    layout = Layout(root)
    layout.config.parent.mkdir(parents=True, exist_ok=True)
    layout.config.write_text(text)
    return layout


def test_file_then_environment(tmp_path: Path) -> None:
    layout = write(tmp_path, "[server]\nport = 9000\n[chat]\nparallel = 2\n"
                             "[hardware]\nmemory_fraction = 0.5\n")
    s = settings.load(layout, env={"APPLIANCE_PARALLEL": "3"})
    assert (s.port, s.parallel, s.memory_fraction) == (9000, 3, 0.5)


@pytest.mark.parametrize("text,message", [
    ("[server]\nport = 'x'\n", "port must be an integer"),
    ("[server]\nprt = 1\n", "prt is not a known key"),
    ("[chat]\nparallel = 0\n", "parallel must be between"),
    ("[hardware]\nprefer = 'tpu'\n", "prefer must be auto or cpu"),
    ("[server\n", "not valid TOML"),
])
def test_bad_settings_file(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        settings.load(write(tmp_path, text), env={})


def test_bad_environment(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="APPLIANCE_PORT"):
        settings.load(Layout(tmp_path), env={"APPLIANCE_PORT": "eighty"})


def test_auth_off_only_on_loopback(tmp_path: Path) -> None:
    ok = settings.load(Layout(tmp_path), env={"APPLIANCE_AUTH": "false"})
    ok.check()
    exposed = settings.load(Layout(tmp_path), env={"APPLIANCE_AUTH": "false",
                                                   "APPLIANCE_HOST": "0.0.0.0"})
    with pytest.raises(UsageError, match="loopback"):
        exposed.check()
    with pytest.raises(UsageError, match="no API key"):
        settings.load(Layout(tmp_path), env={}).check()


def test_api_keys_file(tmp_path: Path) -> None:
    path = settings.api_keys_path(Layout(tmp_path))
    path.parent.mkdir(parents=True)
    path.write_text("# comment\nlaptop " + "ab" * 32 + "\n")
    assert settings.load(Layout(tmp_path), env={}).api_key_hashes == ("ab" * 32,)
    path.write_text("laptop short\n")
    with pytest.raises(FormatError, match="api-keys:1"):
        settings.load(Layout(tmp_path), env={})


def test_quantization_pins(tmp_path: Path) -> None:
    layout = write(tmp_path, '[models]\nquantization = { "all-minilm-l6-v2" = "fp32" }\n')
    assert settings.load(layout, env={}).quantization == (("all-minilm-l6-v2", "fp32"),)
    with pytest.raises(FormatError, match="must be a string"):
        settings.load(write(tmp_path, '[models]\nquantization = { "m" = 8 }\n'), env={})
