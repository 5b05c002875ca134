"""The updater's settings (UPDATER_*, pydantic-settings): read as before, bad values named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.system.config import ConfigError
from appliance.system.update.settings import Config

DOCS = Path(__file__).resolve().parent.parent / "docs" / "reference" / "configuration.md"


def test_defaults_and_construction_in_code_ignore_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("UPDATER_KEEP", "7")
    monkeypatch.setenv("UPDATER_ROOT", "/elsewhere")
    cfg = Config(root=Path("/opt/x"), health_timeout=8)
    assert (cfg.root, cfg.keep, cfg.health_timeout) == (Path("/opt/x"), 3, 8.0)
    assert cfg.url == "https://127.0.0.1:5001" and cfg.verify_tls
    assert cfg.spool_dir == Path("/var/lib/whisper-appliance/update-requests")
    assert Config.from_env().keep == 7  # from_env reads os.environ
    assert Config.from_env({}).keep == 3  # a given mapping replaces it


def test_every_variable_is_read(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(" wa_secret \n")
    env = {
        "UPDATER_ROOT": "/r",
        "UPDATER_DATA_DIR": "/d",
        "DATA_DIR": "/ignored",
        "UPDATER_KEY_DIR": "/k",
        "UPDATER_RESTART_COMMAND": "restart it",
        "UPDATER_STOP_COMMAND": "stop it",
        "UPDATER_URL": "http://10.0.0.5:5001",
        "UPDATER_SPOOL": "/s",
        "UPDATER_KEEP": "5",
        "UPDATER_HEALTH_TIMEOUT": "2.5",
        "UPDATER_CLIP": "/c.wav",
        "UPDATER_EXPECT": "ask not",
        "UPDATER_API_KEY_FILE": str(key),
        "UPDATER_PYTHON": "/usr/bin/python3.11",
        "HTTPS_PORT": "9999",  # UPDATER_URL wins over the service's listener
    }
    cfg = Config.from_env(env)
    assert (cfg.root, cfg.data_dir, cfg.key_dir, cfg.spool_dir) == (
        Path("/r"),
        Path("/d"),
        Path("/k"),
        Path("/s"),
    )
    assert (cfg.restart_command, cfg.stop_command) == ("restart it", "stop it")
    assert (cfg.url, cfg.verify_tls) == ("http://10.0.0.5:5001", True)
    assert (cfg.keep, cfg.health_timeout, cfg.clip) == (5, 2.5, Path("/c.wav"))
    assert (cfg.expect, cfg.api_key, cfg.python) == ("ask not", "wa_secret", "/usr/bin/python3.11")


def test_the_service_env_file_is_understood() -> None:
    cfg = Config.from_env({"DATA_DIR": "/srv/wa", "UPDATER_DATA_DIR": "", "HTTPS_PORT": "8443"})
    assert cfg.data_dir == Path("/srv/wa")  # empty counts as unset, as before
    assert (cfg.url, cfg.verify_tls) == ("https://127.0.0.1:8443", False)
    cfg = Config.from_env({"HTTPS_ENABLED": "false", "BIND_ADDRESS": "::"})
    assert cfg.url == "http://[::1]:5001"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("UPDATER_KEEP", "abc"),
        ("UPDATER_KEEP", "0"),
        ("UPDATER_KEEP", "-3"),
        ("UPDATER_KEEP", "1.5"),
        ("UPDATER_KEEP", "101"),
        ("UPDATER_HEALTH_TIMEOUT", "soon"),
        ("UPDATER_HEALTH_TIMEOUT", "0"),
        ("UPDATER_HEALTH_TIMEOUT", "-1"),
        ("UPDATER_HEALTH_TIMEOUT", "nan"),
        ("UPDATER_HEALTH_TIMEOUT", "inf"),
        ("UPDATER_HEALTH_TIMEOUT", "1" * 5000),
        ("UPDATER_API_KEY_FILE", "/no/such/key"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_env({name: value})
    message = str(caught.value)
    assert message.startswith(f"{name}: "), message
    assert "\n" not in message and len(message) < 400


def test_values_set_later_are_checked_too() -> None:
    cfg = Config()
    cfg.keep = 4  # the command line's --keep
    assert cfg.keep == 4
    with pytest.raises(ValueError, match="keep"):
        cfg.keep = 0


def test_the_configuration_page_lists_every_variable() -> None:
    if not DOCS.exists():
        pytest.skip("no docs/reference/configuration.md in this checkout")
    text = DOCS.read_text()
    missing = [name for name, _, _ in Config.documentation() if f"`{name}`" not in text]
    assert not missing


def test_the_updater_still_imports_without_the_core() -> None:
    """It runs as root: its settings must not pull in the web app or the engines."""
    code = (
        "import sys; import appliance.system.update.settings\n"
        "bad = [m for m in sys.modules if m.startswith(('appliance.core', 'appliance.web',"
        " 'quart', 'faster_whisper'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_updater_command_names_a_bad_variable_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "DATA_DIR": str(tmp_path), "UPDATER_KEEP": "abc"}
    result = subprocess.run(
        [sys.executable, "-I", "-m", "appliance.updater", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "updater: configuration error: UPDATER_KEEP: input should be a valid integer, "
        "unable to parse string as an integer, got 'abc'"
    ]
