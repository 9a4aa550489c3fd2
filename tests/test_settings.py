from __future__ import annotations

from pathlib import Path

import pytest

from appliance.device.apikeys import ApiKey
from appliance.device.layout import Layout
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
    ("[chat]\nkv_cells = 256\nparallel = 8\n", "fewer than 64 cells"),
])
def test_bad_settings_file(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        settings.load(write(tmp_path, text), env={})


def test_bad_environment(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="APPLIANCE_PORT"):
        settings.load(Layout(tmp_path), env={"APPLIANCE_PORT": "eighty"})


@pytest.mark.parametrize(("env", "message"), [
    ({"APPLIANCE_PARALLEL": "0"}, r"APPLIANCE_PARALLEL \(chat.parallel\) must be between 1"),
    ({"APPLIANCE_PORT": "-5"}, r"APPLIANCE_PORT \(server.port\) must be between 1 and 65535"),
    ({"APPLIANCE_PREFER": "gpu"}, r"APPLIANCE_PREFER \(hardware.prefer\) must be auto or cpu"),
    ({"APPLIANCE_AUX_CORES": "0"}, r"APPLIANCE_AUX_CORES \(hardware.aux_cores\)"),
])
def test_environment_passes_the_same_validator(tmp_path: Path, env: dict[str, str],
                                               message: str) -> None:
    """One validator for both sources: a value the file may not hold, the environment may
    not either, and the error names the variable."""
    with pytest.raises(FormatError, match=message):
        settings.load(Layout(tmp_path), env=env)
    key = next(iter(env)).removeprefix("APPLIANCE_").lower()
    table = settings.ENV[next(iter(env))][0]
    value = env[next(iter(env))]
    text = f"[{table}]\n{key} = {value if value.lstrip('-').isdigit() else repr(value)}\n"
    with pytest.raises(FormatError, match="must be"):
        settings.load(write(tmp_path, text), env={})


def test_environment_overrides_a_file_table(tmp_path: Path) -> None:
    layout = write(tmp_path, "[chat]\nparallel = 2\nbatch = 64\n")
    s = settings.load(layout, env={"APPLIANCE_PARALLEL": "6", "APPLIANCE_HOST": "0.0.0.0"})
    assert (s.parallel, s.batch, s.host) == (6, 64, "0.0.0.0")


def test_auth_off_only_on_loopback(tmp_path: Path) -> None:
    ok = settings.load(Layout(tmp_path), env={"APPLIANCE_AUTH": "false"})
    ok.check()
    exposed = settings.load(Layout(tmp_path), env={"APPLIANCE_AUTH": "false",
                                                   "APPLIANCE_HOST": "0.0.0.0"})
    with pytest.raises(UsageError, match="loopback"):
        exposed.check()
    # no key yet is no error: a sealed device waits for one from a stick (401 meanwhile)
    settings.load(Layout(tmp_path), env={}).check()


def test_api_keys_file(tmp_path: Path) -> None:
    path = Layout(tmp_path).api_keys
    path.parent.mkdir(parents=True)
    path.write_text("# comment\nlaptop " + "ab" * 32 + "\n")
    assert settings.load(Layout(tmp_path), env={}).api_keys == (ApiKey("laptop", "ab" * 32),)
    path.write_text("laptop short\n")
    with pytest.raises(FormatError, match="api-keys:1"):
        settings.load(Layout(tmp_path), env={})


def test_quantization_pins(tmp_path: Path) -> None:
    layout = write(tmp_path, '[models]\nquantization = { "all-minilm-l6-v2" = "fp32" }\n')
    assert settings.load(layout, env={}).quantization == (("all-minilm-l6-v2", "fp32"),)
    with pytest.raises(FormatError, match="must be a string"):
        settings.load(write(tmp_path, '[models]\nquantization = { "m" = 8 }\n'), env={})


def test_default_max_tokens(tmp_path: Path) -> None:
    assert settings.load(Layout(tmp_path), env={}).default_max_tokens == 1024
    layout = write(tmp_path, "[chat]\ndefault_max_tokens = 256\n")
    assert settings.load(layout, env={}).default_max_tokens == 256
    with pytest.raises(FormatError, match="default_max_tokens must be between 1"):
        settings.load(write(tmp_path, "[chat]\ndefault_max_tokens = 0\n"), env={})
