"""Settings (pydantic-settings) against bad environments: every variable's bad values, from
empty to hostile, stop the start with one ConfigError that names the variable; good values at
the edges of each range are taken; the admin panel re-validates with the same rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.core.ratelimit import Rate
from appliance.system.config import ConfigError, Settings
from appliance.web.settings_store import FIELDS

VARIABLES = [row[0] for row in Settings.documentation()]

INTS = {
    "HTTPS_PORT": (1, 65535),
    "HTTP_PORT": (1, 65535),
    "CPU_THREADS": (1, 256),
    "WORKER_PROCESSES": (0, 64),
    "MODEL_CACHE_SIZE": (1, 16),
    "MODEL_IDLE_TIMEOUT": (0, 30 * 24 * 3600),
    "MAX_AUDIO_DURATION": (1, 7 * 24 * 3600),
    "MAX_QUEUE": (1, 10000),
    "AUDIO_CHUNK_SIZE": (1600, 4000),
    "HISTORY_RETENTION_DAYS": (0, 36500),
    "HISTORY_MAX_ROWS": (0, 10_000_000),
    "JOB_RETENTION_HOURS": (1, 8760),
    "LIVE_MAX_SESSIONS": (0, 256),
    "LIVE_MAX_FRAME_BYTES": (3200, 1024 * 1024),
    "LIVE_MAX_BYTES_PER_SECOND": (32000, 10_000_000),
    "LIVE_IDLE_TIMEOUT": (1, 3600),
    "LIVE_MAX_UTTERANCE_SECONDS": (5, 28),
    "LIVE_SILENCE_MS": (200, 3000),
    "WYOMING_PORT": (1, 65535),
    "WYOMING_MAX_CONNECTIONS": (1, 1024),
    "WYOMING_IDLE_TIMEOUT": (1, 3600),
    "WEBHOOK_MAX_ATTEMPTS": (1, 10),
}
NUMBERS = {
    "LIVE_MAX_MINUTES": (0, 1440),
    "WEBHOOK_RETRY_SECONDS": (0.01, 3600),
    "WATCH_SETTLE_SECONDS": (0.1, 3600),
    "WATCH_POLL_SECONDS": (0.05, 60),
    "JOB_LEASE_SECONDS": (2, 3600),
}
BOOLS = [
    "HTTPS_ENABLED",
    "HTTP_REDIRECT",
    "DEBUG_MODE",
    "REQUIRE_API_KEY",
    "LIVE_SENTENCE_COMMITS",
    "LIVE_BATCH_DECODES",
    "WYOMING_ENABLED",
    "WYOMING_ZEROCONF",
    "OUTBOUND_ALLOW_PRIVATE",
    "WATCH_DIARIZE",
]
NETWORKS = [
    "TRUSTED_PROXIES",
    "WYOMING_ALLOWED_NETWORKS",
    "METRICS_ALLOWED_NETWORKS",
    "OUTBOUND_ALLOWED_NETWORKS",
]
OTHERS: dict[str, list[str]] = {
    "DATA_DIR": ["", "   "],
    "BIND_ADDRESS": ["not an address", "http://0.0.0.0", "a..b", "-host", "host:80"],
    "SSL_CERT_PATH": [],
    "SSL_KEY_PATH": [],
    "SSL_CA_PATH": [],
    "WHISPER_MODEL": ["", "../../etc/passwd", "a/b", "tiny en", "x" * 65, ".hidden"],
    "ENGINE": ["", "whisper.cpp", "Faster-Whisper"],
    "COMPUTE_TYPE": ["", "int4", "INT8"],
    "CUDA_COMPUTE_TYPE": ["", "int4", "bfloat"],
    "DEVICE": ["", "gpu", "tpu", "cuda:0"],
    "MAX_UPLOAD_SIZE": ["", "lots", "10XB", "-1", "1e9", "1 G B", "0x100"],
    "MODEL_HUB_URL": ["", "huggingface.co", "ftp://example.org", "javascript:alert(1)", "http://"],
    "ALLOWED_ORIGINS": [
        "javascript:alert(1)",
        "*",
        "https://a.example/path",
        ",".join(f"https://h{i}.example" for i in range(33)),
    ],
    "API_RATE_LIMIT": ["", "lots", "-1/minute", "10/fortnight", "1.5/minute"],
    "LOGIN_RATE_LIMIT": ["", "lots", "5/eon"],
    "UPDATE_SOURCE": [],
    "METRICS_TOKEN": [],
    "DATABASE_URL": [
        "mysql://u:p@db/x",
        "sqlite:///var/lib/x.db",
        "db.lan:5432",
        "postgresql://u:p@db/x?nosuchoption=1",
        "postgresql://u:p@db:notaport/x",
        "postgresql://u:p@db:70000/x",
    ],
    "WATCH_DIR": [],
    "WATCH_MODEL": ["../x", "a b", "-x"],
    "WATCH_LANGUAGE": ["english", "xx", "../", "en-US"],
    "WATCH_FORMATS": ["", " , ", "pdf", "txt,exe"],
}
# values no variable takes: control characters (NUL, new line, escape) and a huge one
HOSTILE = ["a\x00b", "5001\n", "\x1b[31mred", "1" * 100_000 + "x"]


def _bad_values() -> list[tuple[str, str]]:
    cases: list[tuple[str, str]] = []
    for name, (low, high) in INTS.items():
        for value in ["", " ", "abc", "1.5", "1e3", "0x10", "nan", str(low - 1), str(high + 1)]:
            cases.append((name, value))
    for name, (low, high) in NUMBERS.items():
        for value in ["", "abc", "nan", "inf", "-inf", str(low - 1), str(high + 1), "1,5"]:
            cases.append((name, value))
    for name in BOOLS:
        cases += [(name, v) for v in ["maybe", "2", "truee", "y", "-1", "falsch"]]
    for name in NETWORKS:
        cases += [(name, v) for v in ["zz", "10.0.0.0/33", "300.1.1.1", "10.0.0.1,,nope"]]
    for name, values in OTHERS.items():
        cases += [(name, v) for v in values]
    for name in VARIABLES:
        cases += [(name, v) for v in HOSTILE]
    return cases


def test_the_tables_cover_every_variable() -> None:
    covered = set(INTS) | set(NUMBERS) | set(BOOLS) | set(NETWORKS) | set(OTHERS)
    assert covered == set(VARIABLES)
    # every variable's text goes through a rule (none is taken as it is)
    assert all(callable(Settings.rule(field)) for field in Settings.model_fields)


@pytest.mark.parametrize(("name", "value"), _bad_values())
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    message = str(caught.value)
    assert message.startswith(f"{name}: "), message
    # one readable line, not pydantic's dump, and a hostile value is not repeated in full
    assert "\n" not in message and "validation error" not in message
    assert "pydantic" not in message and len(message) < 400


@pytest.mark.parametrize(("name", "bounds"), list(INTS.items()) + list(NUMBERS.items()))
def test_the_edges_of_each_range_are_taken(name: str, bounds: tuple[float, float]) -> None:
    field = next(f for f in Settings.model_fields if Settings.variable(f) == name)
    for edge in bounds:
        text = f" {edge} "
        assert getattr(Settings.from_env({name: text}), field) == edge


@pytest.mark.parametrize("name", BOOLS)
def test_booleans_as_before(name: str) -> None:
    field = next(f for f in Settings.model_fields if Settings.variable(f) == name)
    extra = {"HTTPS_ENABLED": "true"} if name == "HTTP_REDIRECT" else {}
    for text in ["1", "true", "TRUE", " yes ", "on"]:
        assert getattr(Settings.from_env({name: text, **extra}), field) is True
    for text in ["0", "false", "No", "off", ""]:
        assert getattr(Settings.from_env({name: text}), field) is False


def test_several_bad_variables_are_named_together() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"HTTPS_PORT": "0", "MAX_QUEUE": "none", "DEBUG_MODE": "maybe"})
    message = str(caught.value)
    for name in ("HTTPS_PORT: ", "MAX_QUEUE: ", "DEBUG_MODE: "):
        assert name in message


def test_cross_field_checks_name_their_variables() -> None:
    with pytest.raises(ConfigError, match=r"^SSL_CERT_PATH and SSL_KEY_PATH must be set together"):
        Settings.from_env({"SSL_KEY_PATH": "/k.pem"})
    with pytest.raises(ConfigError, match=r"^HTTP_PORT: must differ from HTTPS_PORT"):
        Settings.from_env({"HTTP_REDIRECT": "on", "HTTP_PORT": "5001"})
    settings = Settings.from_env({"SSL_CERT_PATH": "", "SSL_KEY_PATH": ""})  # empty = generated
    assert settings.ssl_cert_path is None and settings.ssl_key_path is None


def test_values_as_before() -> None:
    s = Settings.from_env(
        {
            "API_RATE_LIMIT": "10/second",
            "TRUSTED_PROXIES": "10.0.0.2, 192.168.1.0/24,::1",
            "ALLOWED_ORIGINS": "https://B.example/, https://a.example:8443 https://b.example",
            "WATCH_FORMATS": "SRT,txt,srt",
            "WATCH_LANGUAGE": "DE",
            "WATCH_MODEL": "",
            "DATA_DIR": "~/wa",
            "BIND_ADDRESS": " appliance.lan ",
            "LIVE_MAX_MINUTES": "0.5",
        }
    )
    assert s.api_rate_limit == Rate(10, 1.0)
    assert [str(n) for n in s.trusted_proxies] == ["10.0.0.2/32", "192.168.1.0/24", "::1/128"]
    assert s.allowed_origins == ("https://a.example:8443", "https://b.example")
    assert (s.watch_formats, s.watch_language, s.watch_model) == (("srt", "txt"), "de", "")
    assert s.data_dir == Path("~/wa").expanduser() and s.bind_address == "appliance.lan"
    assert s.live_max_minutes == 0.5


def test_names_are_exact_and_only_the_environment_is_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("HTTPS_PORT=1234\n")  # not read: systemd passes the env
    monkeypatch.setenv("https_port", "7000")  # other case: not this variable
    monkeypatch.setenv("WA_HTTPS_PORT", "7001")  # no prefix
    monkeypatch.delenv("HTTPS_PORT", raising=False)
    assert Settings.from_env().https_port == 5001
    monkeypatch.setenv("HTTPS_PORT", "8443")
    assert Settings.from_env().https_port == 8443
    assert Settings().https_port == 8443  # plain pydantic-settings construction, too
    assert Settings.from_env({}).https_port == 5001  # a given mapping replaces os.environ


def test_values_set_in_code_win_and_are_only_type_checked() -> None:
    s = Settings.from_env({"WYOMING_PORT": "10300"}, wyoming_port=0, max_upload_size=5)
    assert (s.wyoming_port, s.max_upload_size) == (0, 5)  # tests use a free port, tiny limits
    with pytest.raises(ConfigError, match=r"^DATA_DIR: "):
        Settings.from_env({}, data_dir=5)


def test_settings_are_immutable() -> None:
    s = Settings.from_env({})
    with pytest.raises(ValueError, match="frozen"):
        s.https_port = 1  # type: ignore[misc]
    assert s.model_copy(update={"https_port": 1}).https_port == 1
    assert s.https_port == 5001


def test_documentation_rows_as_before() -> None:
    rows = {name: (default, doc) for name, default, doc in Settings.documentation()}
    assert rows["MAX_UPLOAD_SIZE"][0] == "100000000"
    assert rows["HTTPS_ENABLED"][0] == "true" and rows["SSL_CERT_PATH"][0] == ""
    assert rows["WATCH_FORMATS"][0] == "txt,srt"
    assert rows["API_RATE_LIMIT"][0] == "120/minute"
    assert all(doc for (doc,) in ((d,) for _, d in rows.values()))
    assert Settings.model_fields["https_port"].description == rows["HTTPS_PORT"][1]


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("history_retention_days", "history_retention_days"),
        ("history_max_rows", "history_max_rows"),
        ("live_max_sessions", "live_max_sessions"),
        ("live_max_minutes", "live_max_minutes"),
        ("require_api_key", "require_api_key"),
        ("default_model", "whisper_model"),
        ("default_language", "watch_language"),
        ("allowed_origins", "allowed_origins"),
    ],
)
def test_the_admin_panel_validates_with_the_same_rules(key: str, field: str) -> None:
    panel, rule = FIELDS[key][0], Settings.rule(field)
    samples: list[object] = ["7", "-1", "abc", "", "yes", "de", "xx", "https://a.example", "*"]
    samples += [7, 0, 10**9, 0.5, True, None, [], ["https://a.example"]]
    for value in samples:
        try:
            expected: object = rule(value)
        except ValueError:
            with pytest.raises(ValueError):
                panel(value)
        else:
            got = panel(value)
            assert (list(got) if isinstance(got, list) else got) == (
                list(expected) if isinstance(expected, tuple) else expected
            )


def test_the_service_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATA_DIR": str(tmp_path),
        "MAX_UPLOAD_SIZE": "lots",
        "TRUSTED_PROXIES": "10.0.0.0/33",
    }
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "configuration error" in line]
    assert len(lines) == 1, result.stderr
    assert "MAX_UPLOAD_SIZE: " in lines[0] and "TRUSTED_PROXIES: " in lines[0]
    assert "Traceback" not in result.stderr
