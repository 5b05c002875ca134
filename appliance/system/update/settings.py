"""The updater's settings: UPDATER_* variables, then the command line.

They share `appliance.system.envsettings.EnvSettings` with the service's settings, so a bad value
stops with one `ConfigError` that names the variable (`UPDATER_KEEP: ...`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from appliance.exceptions import ConfigError
from appliance.system.envsettings import EnvSettings, env_field
from appliance.system.update import spool as update_spool
from appliance.system.update.release import DEFAULT_KEY_DIR
from appliance.system.update.releases import DEFAULT_ROOT


def _default_python() -> str:
    if Path("/usr/bin/python3").exists():
        return "/usr/bin/python3"
    return str(getattr(sys, "_base_executable", sys.executable))


class Config(EnvSettings):
    """Where things are and how to drive the service; `from_env` reads UPDATER_* variables.

    Built in code (`Config(root=...)`), it takes exactly what it is given; the command line
    changes it afterwards (assignments are validated too). An empty variable counts as unset.
    """

    model_config = SettingsConfigDict(validate_assignment=True, env_ignore_empty=True)
    code_reads_environ: ClassVar[bool] = False  # built in code: only what it is given

    root: Path = env_field("UPDATER_ROOT", None, DEFAULT_ROOT, "Install root of the releases")
    data_dir: Path = Field(
        Path("/var/lib/whisper-appliance"),
        validation_alias=AliasChoices("UPDATER_DATA_DIR", "DATA_DIR"),
        description="The service's data directory (its database is backed up before a switch)",
    )
    key_dir: Path = env_field(
        "UPDATER_KEY_DIR", None, DEFAULT_KEY_DIR, "Public keys a release must be signed with"
    )
    restart_command: str = env_field(
        "UPDATER_RESTART_COMMAND",
        None,
        "systemctl restart whisper-appliance",
        "Command that (re)starts the service",
    )
    stop_command: str = env_field(
        "UPDATER_STOP_COMMAND",
        None,
        "systemctl stop whisper-appliance",
        "Command that stops the service",
    )
    url: str = env_field(
        "UPDATER_URL",
        None,
        "https://127.0.0.1:5001",
        "The service's base URL for the health check (default: from its HTTPS_* settings)",
    )
    keep: Annotated[int, Field(ge=1, le=100)] = env_field(
        "UPDATER_KEEP", None, 3, "Releases kept, the current one included"
    )
    health_timeout: Annotated[float, Field(gt=0, le=86400, allow_inf_nan=False)] = env_field(
        "UPDATER_HEALTH_TIMEOUT", None, 180.0, "Seconds to wait for the new release's /health"
    )
    command_timeout: float = 300.0
    python: str = Field(
        default_factory=_default_python,
        validation_alias="UPDATER_PYTHON",
        description="Python that makes a release's virtual environment",
    )
    clip: Path | None = env_field(
        "UPDATER_CLIP", None, None, "Audio of the test transcription (default: 1 s of silence)"
    )
    expect: str | None = env_field(
        "UPDATER_EXPECT", None, None, "Words the test transcription must contain"
    )
    api_key_file: Path | None = env_field(
        "UPDATER_API_KEY_FILE",
        None,
        None,
        "File holding an API key for the test transcription (REQUIRE_API_KEY on)",
    )
    api_key: str | None = None
    # False when the URL was derived from the service's own listener settings
    verify_tls: bool = True
    spool: Path | None = env_field(
        "UPDATER_SPOOL", None, None, "Where run-request looks (default: DATA_DIR/update-requests)"
    )

    @property
    def spool_dir(self) -> Path:
        return self.spool or update_spool.spool_dir(self.data_dir)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        cfg = cls.load(env)
        if not env.get("UPDATER_URL") and (env.get("HTTPS_PORT") or env.get("HTTPS_ENABLED")):
            # the unit reads the service's env file: talk to the service where it listens
            cfg.url, cfg.verify_tls = service_url(env), False
        if cfg.api_key_file is not None:
            try:
                cfg.api_key = cfg.api_key_file.read_text().strip()
            except (OSError, UnicodeError) as exc:
                raise ConfigError(f"UPDATER_API_KEY_FILE: cannot read it: {exc}") from None
        return cfg


def service_url(env: Mapping[str, str]) -> str:
    """The service's own base URL from its listener settings (HTTPS_*, BIND_ADDRESS)."""
    https = env.get("HTTPS_ENABLED", "true").strip().lower() not in ("false", "0", "no", "off")
    port = env.get("HTTPS_PORT", "").strip() or "5001"
    bind = env.get("BIND_ADDRESS", "").strip()
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)  # noqa: S104
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if https else 'http'}://{host}:{port}"
