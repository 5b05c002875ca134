"""The updater's settings: where things are and how to drive the service (UPDATER_* variables,
then the command line)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from appliance.system.update import spool as update_spool
from appliance.system.update.release import DEFAULT_KEY_DIR
from appliance.system.update.releases import DEFAULT_ROOT


def _default_python() -> str:
    if Path("/usr/bin/python3").exists():
        return "/usr/bin/python3"
    return str(getattr(sys, "_base_executable", sys.executable))


@dataclass
class Config:
    """Where things are and how to drive the service; `from_env` reads UPDATER_* variables."""

    root: Path = DEFAULT_ROOT
    data_dir: Path = Path("/var/lib/whisper-appliance")
    key_dir: Path = DEFAULT_KEY_DIR
    restart_command: str = "systemctl restart whisper-appliance"
    stop_command: str = "systemctl stop whisper-appliance"
    url: str = "https://127.0.0.1:5001"
    keep: int = 3
    health_timeout: float = 180.0
    command_timeout: float = 300.0
    python: str = field(default_factory=_default_python)
    clip: Path | None = None
    expect: str | None = None
    api_key: str | None = None
    # False when the URL was derived from the service's own listener settings
    verify_tls: bool = True
    spool: Path | None = None  # default: DATA_DIR/update-requests

    @property
    def spool_dir(self) -> Path:
        return self.spool or update_spool.spool_dir(self.data_dir)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        cfg = cls()
        paths = {
            "UPDATER_ROOT": "root",
            "UPDATER_KEY_DIR": "key_dir",
            "UPDATER_CLIP": "clip",
            "UPDATER_SPOOL": "spool",
        }
        for var, attr in paths.items():
            if env.get(var):
                setattr(cfg, attr, Path(env[var]))
        data_dir = env.get("UPDATER_DATA_DIR") or env.get("DATA_DIR")
        if data_dir:
            cfg.data_dir = Path(data_dir)
        for var, attr in (
            ("UPDATER_RESTART_COMMAND", "restart_command"),
            ("UPDATER_STOP_COMMAND", "stop_command"),
            ("UPDATER_URL", "url"),
            ("UPDATER_PYTHON", "python"),
            ("UPDATER_EXPECT", "expect"),
        ):
            if var in env:
                setattr(cfg, attr, env[var])
        if "UPDATER_URL" not in env and (env.get("HTTPS_PORT") or env.get("HTTPS_ENABLED")):
            # the unit reads the service's env file: talk to the service where it listens
            cfg.url, cfg.verify_tls = service_url(env), False
        if env.get("UPDATER_KEEP"):
            cfg.keep = int(env["UPDATER_KEEP"])
        if env.get("UPDATER_HEALTH_TIMEOUT"):
            cfg.health_timeout = float(env["UPDATER_HEALTH_TIMEOUT"])
        if env.get("UPDATER_API_KEY_FILE"):
            cfg.api_key = Path(env["UPDATER_API_KEY_FILE"]).read_text().strip()
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
