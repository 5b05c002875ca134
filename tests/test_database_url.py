"""DATABASE_URL (issue 16): empty means the SQLite file, a PostgreSQL URL the shared server,
anything else stops the start naming the variable; the password in it never reaches a message
or a log, neither of a refused setting nor of a server that cannot be reached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.system.config import ConfigError, Settings

SECRET = "Se%3Dcr3t"  # percent-encoded in the URL, "Se=cr3t" once decoded


def test_empty_is_the_sqlite_file_and_postgresql_urls_are_taken() -> None:
    assert Settings.from_env({}).database_url == ""
    assert Settings.from_env({"DATABASE_URL": "  "}).database_url == ""
    for url in (
        "postgresql://whisper:pw@db.lan:5432/whisper",
        "postgres://whisper@db.lan/whisper?sslmode=verify-full",
        "postgresql:///whisper?host=/run/postgresql",
    ):
        assert Settings.from_env({"DATABASE_URL": f" {url} "}).database_url == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (f"mysql://whisper:{SECRET}@db.lan/whisper", "expected empty .* or a URL such as"),
        (f"sqlite:///var/lib/{SECRET}.db", "expected empty"),
        (f"whisper:{SECRET}@db.lan", "expected empty"),
        (f"postgresql://whisper:{SECRET}@[::1/whisper", "not a valid PostgreSQL URL"),
        (f"postgresql://whisper:{SECRET}@db.lan/whisper?bogus=1", "not a valid PostgreSQL URL"),
    ],
)
def test_a_refused_url_names_the_variable_never_the_password(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=rf"^DATABASE_URL: {why}") as caught:
        Settings.from_env({"DATABASE_URL": url})
    assert "cr3t" not in str(caught.value)


def test_an_unreachable_server_stops_the_service_without_the_password(tmp_path: Path) -> None:
    data = tmp_path / "data"
    url = f"postgresql://whisper:{SECRET}@/whisper?host={tmp_path}&port=1"  # nothing listens
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "serve"],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATA_DIR": str(data),
            "HTTPS_ENABLED": "false",
            "BIND_ADDRESS": "127.0.0.1",
            "HTTP_PORT": "1",
            "HTTPS_PORT": "1",
            "DATABASE_URL": url,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"cannot start: cannot connect to postgresql://whisper@{tmp_path}:1/whisper" in output
    logs = "".join(p.read_text() for p in data.rglob("*.log*") if p.is_file())
    assert "cannot connect to" in logs  # the log file was written, and holds no password
    assert "cr3t" not in output and "cr3t" not in logs
