"""Settings from environment variables: every variable parsed, bad values named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.system.config import ConfigError, Settings, parse_size

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100MB", 100_000_000),
        ("1GiB", 1024**3),
        ("1048576", 1_048_576),
        ("512k", 512 * 1024),
        ("1.5GB", 1_500_000_000),
        (" 10 MiB ", 10 * 1024**2),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_defaults_match_the_seed() -> None:
    s = Settings.from_env({})
    assert s.https_port == 5001
    assert s.whisper_model == "tiny.en"
    assert s.max_upload_size == 100_000_000
    assert s.engine == "faster-whisper"
    assert s.compute_type == "int8"
    assert s.cpu_threads == 1
    assert s.workers >= 1


def test_every_variable_is_read() -> None:
    env = {
        "WHISPER_MODEL": "base",
        "MAX_UPLOAD_SIZE": "1GiB",
        "DEBUG_MODE": "true",
        "HTTPS_PORT": "8443",
        "HTTP_REDIRECT": "yes",
        "HTTP_PORT": "8080",
        "SSL_CERT_PATH": "/etc/c.pem",
        "SSL_KEY_PATH": "/etc/k.pem",
        "WORKER_PROCESSES": "3",
        "MODEL_CACHE_SIZE": "2",
        "AUDIO_CHUNK_SIZE": "4000",
        "DATA_DIR": "/srv/wa",
        "BIND_ADDRESS": "::",
        "HTTPS_ENABLED": "1",
        "ENGINE": "openai-whisper",
        "COMPUTE_TYPE": "float32",
        "CPU_THREADS": "2",
        "ALLOWED_ORIGINS": "https://a.example, https://b.example",
    }
    s = Settings.from_env(env)
    assert (s.whisper_model, s.max_upload_size, s.debug_mode) == ("base", 1024**3, True)
    assert (s.https_port, s.http_redirect, s.http_port) == (8443, True, 8080)
    assert (s.ssl_cert_path, s.ssl_key_path) == (Path("/etc/c.pem"), Path("/etc/k.pem"))
    assert (s.workers, s.model_cache_size, s.audio_chunk_size) == (3, 2, 4000)
    assert (s.data_dir, s.bind_address, s.https_enabled) == (Path("/srv/wa"), "::", True)
    assert (s.engine, s.compute_type, s.cpu_threads) == ("openai-whisper", "float32", 2)
    assert s.allowed_origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HTTPS_PORT", "abc"),
        ("HTTPS_PORT", "70000"),
        ("HTTPS_PORT", ""),
        ("MAX_UPLOAD_SIZE", "lots"),
        ("MAX_UPLOAD_SIZE", "10XB"),
        ("DEBUG_MODE", "maybe"),
        ("ENGINE", "whisper.cpp"),
        ("COMPUTE_TYPE", "int4"),
        ("WORKER_PROCESSES", "-1"),
        ("MODEL_CACHE_SIZE", "0"),
        ("AUDIO_CHUNK_SIZE", "99999999"),
        ("WHISPER_MODEL", "../../etc/passwd"),
        ("WHISPER_MODEL", ""),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: "):
        Settings.from_env({name: value})


def test_inconsistent_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="SSL_CERT_PATH and SSL_KEY_PATH"):
        Settings.from_env({"SSL_CERT_PATH": "/x.pem"})
    with pytest.raises(ConfigError, match="HTTP_REDIRECT"):
        Settings.from_env({"HTTP_REDIRECT": "true", "HTTPS_ENABLED": "false"})


def test_cli_reports_config_errors(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "appliance", "serve"],
        env={"HTTPS_PORT": "nope", "DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "configuration error: HTTPS_PORT" in result.stderr


def test_readme_documents_every_variable() -> None:
    """The table lives in the README or, since the docs site, in its configuration reference."""
    pages = [ROOT / "README.md", ROOT / "docs" / "reference" / "configuration.md"]
    text = "\n".join(p.read_text() for p in pages if p.exists())
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", text, flags=re.MULTILINE))
    names = {row[0] for row in Settings.documentation()}
    assert names <= documented, f"missing in README: {sorted(names - documented)}"
