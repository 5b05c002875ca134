"""Typed settings read from environment variables and validated once, at start.

`Settings` is a pydantic-settings model. Each field names its variable (no prefix, case as
written), the rule that parses the variable's text and a one-line description
(docs/reference/configuration.md is checked against `Settings.documentation()`). A bad value
stops the start with one `ConfigError` that names the variable, the value and what was expected.
The admin panel re-validates some of the same values with the same rules (`Settings.rule(field)`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from pydantic import model_validator
from pydantic_settings import SettingsConfigDict

from appliance.core.engines.device import DEVICES
from appliance.core.ratelimit import Rate, parse_rate
from appliance.exceptions import ConfigError as ConfigError
from appliance.system.envsettings import EnvSettings, shown
from appliance.system.envsettings import env_field as _env

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ORIGIN = re.compile(r"^https?://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253})(:\d{1,5})?$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
MAX_ORIGINS = 32
ENGINES = ("faster-whisper", "openai-whisper")
COMPUTE_TYPES = ("int8", "int8_float32", "int16", "float32", "float16", "int8_float16", "auto")


def parse_size(text: str) -> int:
    """Parse `100MB`, `1GiB`, `512k` or a plain byte count into bytes."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"expected a size such as 100MB, 1GiB or 1048576, got {shown(text)}")
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.upper())
    if factor is None:
        raise ValueError(f"unknown size unit {shown(unit)} (use B, KB, MB, GB, KiB, MiB, GiB)")
    return int(float(number) * factor)


def parse_bool(value: object) -> bool:
    """`true/false`, `1/0`, `yes/no`, `on/off` (any case) or empty (false); a JSON boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"expected true or false, got {shown(value)}")


def int_range(low: int, high: int) -> Callable[[object], int]:
    """A whole number from `low` to `high`, as text or a (JSON) number."""

    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"expected a whole number from {low} to {high}, got {shown(value)}")
        try:
            number = int(value.strip()) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(f"expected a whole number, got {shown(value)}") from None
        if not low <= number <= high:
            raise ValueError(f"expected a number from {low} to {high}, got {number}")
        return number

    return parse


def _number(value: object, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {expected}, got {shown(value)}")
    try:
        return float(value.strip()) if isinstance(value, str) else float(value)
    except ValueError:
        raise ValueError(f"expected {expected}, got {shown(value)}") from None


def minutes(high: int) -> Callable[[object], float]:
    """Minutes from 0 to `high`; fractions allowed (0.5 = 30 s), whole values stay ints."""

    def parse(value: object) -> float:
        number = _number(value, "minutes such as 60 or 0.5")
        if not 0 <= number <= high:  # also refuses nan and inf
            raise ValueError(f"expected minutes from 0 to {high}, got {shown(value)}")
        return int(number) if number.is_integer() else number

    return parse


def seconds(low: float, high: float) -> Callable[[object], float]:
    """Seconds from `low` to `high`; fractions allowed (0.5)."""

    def parse(value: object) -> float:
        number = _number(value, "seconds such as 10 or 0.5")
        if not low <= number <= high:  # also refuses nan and inf
            raise ValueError(f"expected seconds from {low:g} to {high:g}, got {shown(value)}")
        return int(number) if number.is_integer() else number

    return parse


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {shown(text)}")
        return value

    return parse


def _path(text: str) -> Path:
    if not text.strip():
        raise ValueError("expected a directory such as /var/lib/whisper-appliance, got ''")
    return Path(text.strip()).expanduser()


def _host(text: str) -> str:
    """An IP address or a host name to listen on; empty = every address."""
    value = text.strip()
    try:
        if value:
            ipaddress.ip_address(value)
        return value
    except ValueError:
        if _HOSTNAME.match(value):
            return value
    raise ValueError(
        f"expected an IP address such as 0.0.0.0 or ::, or a host name, got {shown(text)}"
    )


def _http_url(text: str) -> str:
    value = text.strip()
    try:
        parts = urlsplit(value)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and " " not in value
    except ValueError:  # such as an unclosed [IPv6 literal
        valid = False
    if not valid:
        raise ValueError(
            f"expected an http(s) URL such as https://huggingface.co, got {shown(text)}"
        )
    return value


def _database_url(text: str) -> str:
    """Empty (the embedded SQLite file) or a libpq URL `postgresql://user:password@host/db`;
    a refusal never repeats the URL (it may hold a password)."""
    value = text.strip()
    if not value:
        return ""
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(
            "expected empty (SQLite in DATA_DIR) or a URL such as"
            " postgresql://whisper:password@db.lan:5432/whisper"
        )
    from psycopg.conninfo import conninfo_to_dict  # only when one is set

    try:
        info = conninfo_to_dict(value)
    except Exception:  # psycopg.ProgrammingError and friends: the message below
        raise ValueError("not a valid PostgreSQL URL (check quoting and the port)") from None
    for port in str(info.get("port") or "5432").split(","):  # libpq: one per host
        if not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError("not a valid PostgreSQL URL: the port must be 1-65535")
    return value


def _optional_path(text: str) -> Path | None:
    return Path(text).expanduser() if text.strip() else None


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(text: str) -> tuple[Network, ...]:
    networks = []
    for item in _csv(text):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"expected IP addresses or networks such as 10.0.0.2 or 192.168.1.0/24, "
                f"got {shown(item)}"
            ) from None
    return tuple(networks)


WATCH_FORMATS = ("txt", "srt", "vtt", "tsv", "json")


def _watch_formats(text: str) -> tuple[str, ...]:
    values = tuple(dict.fromkeys(item.lower() for item in _csv(text)))
    unknown = [v for v in values if v not in WATCH_FORMATS]
    if unknown or not values:
        raise ValueError(f"expected a comma list of {', '.join(WATCH_FORMATS)}, got {shown(text)}")
    return values


def parse_language(value: object) -> str:
    """A Whisper language code (en, de, haw, ...), or empty/`auto` for detection ("")."""
    if not isinstance(value, str):
        raise ValueError("expected a language code such as en or de, or empty for auto")
    code = value.strip().lower()
    if code in ("", "auto"):
        return ""
    from faster_whisper.tokenizer import _LANGUAGE_CODES  # only when one is set

    if code not in _LANGUAGE_CODES:
        raise ValueError(f"expected a language code such as en or de, or empty, got {shown(value)}")
    return code


def parse_model_name(value: object) -> str:
    """A model name such as tiny.en, base or an imported one (no paths)."""
    text = value.strip() if isinstance(value, str) else ""
    if not _MODEL_NAME.fullmatch(text):
        raise ValueError(f"expected a model name such as tiny.en or base, got {shown(value)}")
    return text


def parse_origins(value: object) -> tuple[str, ...]:
    """Browser origins (scheme://host[:port]) as a comma/space list or a JSON list; lower case,
    no trailing slash, sorted and without repeats."""
    if isinstance(value, str):
        value = [v for v in re.split(r"[\s,]+", value) if v]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of origins such as https://intranet.example:8443")
    if len(value) > MAX_ORIGINS:
        raise ValueError(f"at most {MAX_ORIGINS} origins")
    origins = set()
    for item in value:
        origin = item.strip().rstrip("/")
        if not _ORIGIN.match(origin):
            raise ValueError(f"not an origin (scheme://host[:port]): {shown(origin)}")
        origins.add(origin.lower())
    return tuple(sorted(origins))


def _default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class Settings(EnvSettings):
    """The appliance's configuration; build it with `Settings.from_env()` (immutable)."""

    model_config = SettingsConfigDict(frozen=True)

    data_dir: Path = _env(
        "DATA_DIR",
        _path,
        Path("/var/lib/whisper-appliance"),
        "Database, models, certificates, logs, temp uploads",
    )
    bind_address: str = _env("BIND_ADDRESS", _host, "0.0.0.0", "Address to listen on")  # noqa: S104
    https_port: int = _env("HTTPS_PORT", int_range(1, 65535), 5001, "Port of the main listener")
    https_enabled: bool = _env(
        "HTTPS_ENABLED",
        parse_bool,
        True,
        "Serve TLS; set false behind a reverse proxy or in tests",
    )
    http_redirect: bool = _env(
        "HTTP_REDIRECT",
        parse_bool,
        False,
        "Also listen on HTTP_PORT and redirect plain HTTP to HTTPS",
    )
    http_port: int = _env(
        "HTTP_PORT", int_range(1, 65535), 80, "Port of the HTTP redirect listener"
    )
    ssl_cert_path: Path | None = _env(
        "SSL_CERT_PATH", _optional_path, None, "Custom certificate (PEM); empty = generated CA"
    )
    ssl_key_path: Path | None = _env(
        "SSL_KEY_PATH", _optional_path, None, "Key of the custom certificate (PEM)"
    )
    ssl_ca_path: Path | None = _env(
        "SSL_CA_PATH",
        _optional_path,
        None,
        "CA certificate (PEM) that issued SSL_CERT_PATH, offered at /ca.crt and /trust"
        " (a cluster's CA); empty = none with a custom certificate",
    )
    whisper_model: str = _env(
        "WHISPER_MODEL", parse_model_name, "tiny.en", "Default model, warmed up at start"
    )
    engine: str = _env("ENGINE", _choice(ENGINES), "faster-whisper", "Inference engine")
    compute_type: str = _env(
        "COMPUTE_TYPE",
        _choice(COMPUTE_TYPES),
        "int8",
        "CTranslate2 compute type (faster-whisper) on the CPU",
    )
    device: str = _env(
        "DEVICE",
        _choice(DEVICES),
        "auto",
        "Where faster-whisper runs: auto (a CUDA GPU if one is visible, else the CPU), cpu, cuda",
    )
    cuda_compute_type: str = _env(
        "CUDA_COMPUTE_TYPE",
        _choice(COMPUTE_TYPES),
        "float16",
        "CTranslate2 compute type on a CUDA GPU (COMPUTE_TYPE applies on the CPU)",
    )
    cpu_threads: int = _env("CPU_THREADS", int_range(1, 256), 1, "CPU threads per inference worker")
    worker_processes: int = _env(
        "WORKER_PROCESSES",
        int_range(0, 64),
        0,
        "Parallel inference workers (0 = one per core; on a GPU, 2 model replicas)",
    )
    model_cache_size: int = _env(
        "MODEL_CACHE_SIZE",
        int_range(1, 16),
        1,
        "Models kept loaded at once (least recently used leaves)",
    )
    model_idle_timeout: int = _env(
        "MODEL_IDLE_TIMEOUT",
        int_range(0, 30 * 24 * 3600),
        3600,
        "Seconds a loaded model may stay unused before it is unloaded (the default model too; "
        "reloaded on the next request; 0 = never)",
    )
    max_upload_size: int = _env(
        "MAX_UPLOAD_SIZE", parse_size, 100 * 1000**2, "Largest accepted upload (100MB, 1GiB, bytes)"
    )
    max_audio_duration: int = _env(
        "MAX_AUDIO_DURATION",
        int_range(1, 7 * 24 * 3600),
        4 * 3600,
        "Longest audio accepted for transcription, in seconds (14400 = 4 h); longer gets 413",
    )
    max_queue: int = _env(
        "MAX_QUEUE", int_range(1, 10000), 32, "Jobs waiting at most; more get 429"
    )
    audio_chunk_size: int = _env(
        "AUDIO_CHUNK_SIZE",
        int_range(1600, 4000),
        3200,
        "Live audio frame, in 16 kHz samples (3200 = 200 ms)",
    )
    debug_mode: bool = _env("DEBUG_MODE", parse_bool, False, "Debug logging")
    model_hub_url: str = _env(
        "MODEL_HUB_URL", _http_url, "https://huggingface.co", "Where models are downloaded from"
    )
    history_retention_days: int = _env(
        "HISTORY_RETENTION_DAYS",
        int_range(0, 36500),
        0,
        "Delete history older than this (0 = keep)",
    )
    history_max_rows: int = _env(
        "HISTORY_MAX_ROWS",
        int_range(0, 10_000_000),
        0,
        "Keep at most this many entries (0 = no limit)",
    )
    job_retention_hours: int = _env(
        "JOB_RETENTION_HOURS",
        int_range(1, 8760),
        24,
        "Hours a finished job stays queryable at /api/jobs/{id}; then its row is pruned",
    )
    allowed_origins: tuple[str, ...] = _env(
        "ALLOWED_ORIGINS",
        parse_origins,
        (),
        "Extra browser origins allowed for CORS and /ws/live (comma list)",
    )
    trusted_proxies: tuple[Network, ...] = _env(
        "TRUSTED_PROXIES",
        _networks,
        (),
        "Reverse proxies whose X-Forwarded-For names the client, for rate limits and logs "
        "(comma list of IPs/networks)",
    )
    # --- security (issue 6): defaults of the runtime settings the admin panel can change ---
    require_api_key: bool = _env(
        "REQUIRE_API_KEY",
        parse_bool,
        False,
        "Require an API key (or an admin session) for /transcribe, /v1, /api and /ws/live",
    )
    api_rate_limit: Rate = _env(
        "API_RATE_LIMIT",
        parse_rate,
        Rate(120, 60.0),
        "Transcription requests per client IP or API key (120/minute; 0 = off)",
    )
    login_rate_limit: Rate = _env(
        "LOGIN_RATE_LIMIT",
        parse_rate,
        Rate(5, 60.0),
        "Admin login attempts per client IP (5/minute)",
    )
    live_max_sessions: int = _env(
        "LIVE_MAX_SESSIONS",
        int_range(0, 256),
        4,
        "Live speech sessions at once (0 = no limit)",
    )
    live_max_minutes: int | float = _env(
        "LIVE_MAX_MINUTES",
        minutes(1440),
        60,
        "Longest live speech session in minutes of wall-clock time from connecting "
        "(0 = no limit; fractions allowed)",
    )
    # --- live speech (issue 5): limits of one /ws/live connection and its segmentation ---
    live_max_frame_bytes: int = _env(
        "LIVE_MAX_FRAME_BYTES",
        int_range(3200, 1024 * 1024),
        32000,
        "Largest live audio frame in bytes (32000 = 1 s of 16 kHz PCM); larger closes 1009",
    )
    live_max_bytes_per_second: int = _env(
        "LIVE_MAX_BYTES_PER_SECOND",
        int_range(32000, 10_000_000),
        64000,
        "Live audio bytes per second per connection (2x real time); more closes 1008",
    )
    live_idle_timeout: int = _env(
        "LIVE_IDLE_TIMEOUT",
        int_range(1, 3600),
        30,
        "Seconds without audio before a live connection is closed (pings do not count)",
    )
    live_max_utterance_seconds: int = _env(
        "LIVE_MAX_UTTERANCE_SECONDS",
        int_range(5, 28),
        15,
        "Longest live utterance: a final is forced after this many seconds of speech",
    )
    live_silence_ms: int = _env(
        "LIVE_SILENCE_MS",
        int_range(200, 3000),
        500,
        "Silence (ms) that ends a live utterance and triggers its final text",
    )
    live_sentence_commits: bool = _env(
        "LIVE_SENTENCE_COMMITS",
        parse_bool,
        True,
        "Live finals per sentence as soon as two decodes agree on it (else at pauses only)",
    )
    live_batch_decodes: bool = _env(
        "LIVE_BATCH_DECODES",
        parse_bool,
        True,
        "Decode the live sessions of one model together, in one batch per engine call",
    )
    update_source: str = _env(
        "UPDATE_SOURCE",
        str.strip,
        "",
        "Release manifest for update checks: an https URL, a JSON file or a directory",
    )
    # --- Wyoming (issue 14): Home Assistant speech-to-text over TCP (web/wyoming_server.py)
    wyoming_enabled: bool = _env(
        "WYOMING_ENABLED",
        parse_bool,
        False,
        "Serve the Wyoming protocol (Home Assistant) on WYOMING_PORT; true on the appliance",
    )
    wyoming_port: int = _env(
        "WYOMING_PORT", int_range(1, 65535), 10300, "TCP port of the Wyoming server"
    )
    wyoming_allowed_networks: tuple[Network, ...] = _env(
        "WYOMING_ALLOWED_NETWORKS",
        _networks,
        tuple(
            ipaddress.ip_network(n)
            for n in (
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "169.254.0.0/16",
                "127.0.0.0/8",
                "fc00::/7",
                "fe80::/10",
                "::1/128",
            )
        ),
        "Wyoming clients allowed (no authentication in Wyoming); others are disconnected "
        "(comma list of IPs/networks)",
    )
    wyoming_zeroconf: bool = _env(
        "WYOMING_ZEROCONF",
        parse_bool,
        True,
        "Announce the Wyoming server over mDNS (_wyoming._tcp) for Home Assistant discovery",
    )
    wyoming_max_connections: int = _env(
        "WYOMING_MAX_CONNECTIONS",
        int_range(1, 1024),
        8,
        "Wyoming connections at once; more are refused",
    )
    wyoming_idle_timeout: int = _env(
        "WYOMING_IDLE_TIMEOUT",
        int_range(1, 3600),
        30,
        "Seconds a Wyoming connection may stay without events (without audio inside a request)",
    )
    # --- cluster (issue 16): shared state on PostgreSQL ---
    database_url: str = _env(
        "DATABASE_URL",
        _database_url,
        "",
        "PostgreSQL URL shared by the appliances of a cluster (history, keys, sessions, settings,"
        " job queue); empty = the SQLite file in DATA_DIR",
    )
    job_lease_seconds: float = _env(
        "JOB_LEASE_SECONDS",
        seconds(2, 3600),
        30,
        "On PostgreSQL: a running job's lease, renewed by its node every third of it; a job"
        " whose node stopped renewing (it died) is taken over by another node when it expires",
    )
    # --- monitoring (issue 14): GET /metrics ---
    metrics_token: str = _env(
        "METRICS_TOKEN",
        str.strip,
        "",
        "Bearer token that may read /metrics (besides API keys); set, /metrics needs a token",
    )
    metrics_allowed_networks: tuple[Network, ...] = _env(
        "METRICS_ALLOWED_NETWORKS",
        _networks,
        (),
        "Client addresses allowed to read /metrics (comma list of IPs/networks; empty = any)",
    )
    # --- outbound requests (issue 15): webhooks and URL input, appliance/web/outbound.py ---
    outbound_allow_private: bool = _env(
        "OUTBOUND_ALLOW_PRIVATE",
        parse_bool,
        True,
        "Webhooks and URL input may reach private (RFC 1918, ULA) addresses; false = public only",
    )
    outbound_allowed_networks: tuple[Network, ...] = _env(
        "OUTBOUND_ALLOWED_NETWORKS",
        _networks,
        (),
        "Addresses webhooks and URL input may reach although refused by default (loopback, "
        "link-local, this appliance's own; comma list of IPs/networks)",
    )
    webhook_max_attempts: int = _env(
        "WEBHOOK_MAX_ATTEMPTS", int_range(1, 10), 5, "Delivery attempts of a job's webhook"
    )
    webhook_retry_seconds: int | float = _env(
        "WEBHOOK_RETRY_SECONDS",
        seconds(0.01, 3600),
        10,
        "Wait before the 2nd webhook attempt; doubled before each next one (10, 20, 40, 80 s)",
    )
    # --- inbox (issue 15): a watched folder, appliance/web/inbox.py; the inbox_share role shares it
    watch_dir: Path | None = _env(
        "WATCH_DIR",
        _optional_path,
        None,
        "Folder watched for audio files, transcribed into its done/ (failed/ with the reason); "
        "empty = off",
    )
    watch_model: str = _env(
        "WATCH_MODEL",
        lambda t: parse_model_name(t) if t.strip() else "",
        "",
        "Model for WATCH_DIR files; empty = the default model",
    )
    watch_language: str = _env(
        "WATCH_LANGUAGE",
        parse_language,
        "",
        "Language of WATCH_DIR files (en, de, ...); empty = detected per file",
    )
    watch_formats: tuple[str, ...] = _env(
        "WATCH_FORMATS",
        _watch_formats,
        ("txt", "srt"),
        "Results written for each WATCH_DIR file (comma list of txt, srt, vtt, tsv, json)",
    )
    watch_diarize: bool = _env(
        "WATCH_DIARIZE",
        parse_bool,
        False,
        "Label speakers in WATCH_DIR results (needs the speaker model, see Who said what)",
    )
    watch_settle_seconds: int | float = _env(
        "WATCH_SETTLE_SECONDS",
        seconds(0.1, 3600),
        10,
        "A WATCH_DIR file is taken once its size and time stayed unchanged this long (copy done)",
    )
    watch_poll_seconds: int | float = _env(
        "WATCH_POLL_SECONDS",
        seconds(0.05, 60),
        2,
        "How often WATCH_DIR is scanned, in seconds",
    )

    @property
    def workers(self) -> int:
        return self.worker_processes or _default_workers()

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def jobs_dir(self) -> Path:
        """Audio of accepted jobs, kept until the job finishes (survives restarts)."""
        return self.data_dir / "jobs"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "appliance.db"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every variable of `env` (default: os.environ); `overrides` are field values
        set in code (tests), given as values, not text. Raises ConfigError naming the bad
        variables."""
        return cls.load(env, **overrides)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.ssl_cert_path is None) != (self.ssl_key_path is None):
            raise ConfigError("SSL_CERT_PATH and SSL_KEY_PATH must be set together")
        if self.http_redirect and not self.https_enabled:
            raise ConfigError("HTTP_REDIRECT: needs HTTPS_ENABLED=true (nothing to redirect to)")
        if self.http_redirect and self.http_port == self.https_port:
            raise ConfigError("HTTP_PORT: must differ from HTTPS_PORT")
        return self
