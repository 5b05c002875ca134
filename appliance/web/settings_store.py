"""Runtime settings: changed in the admin panel, persisted in the database, env vars as defaults.

The effective values are published in `services().extras` under the names below, where the
rest of the appliance reads them (`default_model`, `default_language`, `max_upload_size`,
`require_api_key`, `allowed_origins`, `live_max_sessions`, `live_max_minutes`,
`default_callback_url`), and the history retention is applied to the running `History`. Read
the first three through the typed `Services.default_model`, `.default_language` and
`.max_upload_size` (the environment is their default there, once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from appliance.core.db import Database
from appliance.exceptions import ApplianceError
from appliance.system.config import Settings, parse_bool, parse_size
from appliance.web.services import Services

log = logging.getLogger(__name__)

MIGRATIONS = [
    """
    CREATE TABLE runtime_settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        changed REAL NOT NULL
    );
    """,
]

MAX_UPLOAD_LIMIT = 10 * 1024**3
_LANGUAGE = re.compile(r"^[a-z]{2,3}$|^haw$|^yue$")
_ORIGIN = re.compile(r"^https?://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253})(:\d{1,5})?$")


class SettingsError(ApplianceError, ValueError):
    """A runtime setting value that is refused; `field` names it (so does the message)."""

    code = "invalid_setting"

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


def _int(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"expected a whole number from {low} to {high}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"expected a whole number from {low} to {high}") from None
        if not low <= number <= high:
            raise ValueError(f"expected a whole number from {low} to {high}, got {number}")
        return number

    return check


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return parse_bool(value)
    raise ValueError("expected true or false")


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected a size such as 100MB or a number of bytes")
    number = value if isinstance(value, int) else parse_size(value)
    if not 1024 * 1024 <= number <= MAX_UPLOAD_LIMIT:
        raise ValueError("expected a size from 1MiB to 10GiB")
    return number


def _language(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a language code such as en or de, or empty for auto")
    code = value.strip().lower()
    if code in ("", "auto"):
        return ""
    if not _LANGUAGE.match(code):
        raise ValueError(f"expected a language code such as en or de, got {value[:40]!r}")
    return code


def _origins(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [v for v in re.split(r"[\s,]+", value) if v]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of origins such as https://intranet.example:8443")
    if len(value) > 32:
        raise ValueError("at most 32 origins")
    out = []
    for origin in value:
        origin = origin.strip().rstrip("/")
        if not _ORIGIN.match(origin):
            raise ValueError(f"not an origin (scheme://host[:port]): {origin[:80]!r}")
        out.append(origin.lower())
    return sorted(set(out))


def _callback_url(value: Any) -> str:
    """Issue 15: the default webhook of new jobs (empty = none); addresses are checked when
    it is used (appliance.web.outbound), the form here."""
    if not isinstance(value, str):
        raise ValueError("expected an http(s) URL, or empty for none")
    url = value.strip()
    if not url:
        return ""
    from appliance.web.outbound import OutboundError, check_url

    try:
        check_url(url, "default_callback_url")
    except OutboundError as exc:
        raise ValueError(exc.message) from None
    return url


def _model(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise ValueError("expected a model name such as tiny.en or base")
    return value


# name -> (validator, env default)
FIELDS: dict[str, tuple[Callable[[Any], Any], Callable[[Settings], Any]]] = {
    "default_model": (_model, lambda s: s.whisper_model),
    "default_language": (_language, lambda s: ""),
    "max_upload_size": (_size, lambda s: s.max_upload_size),
    "history_retention_days": (_int(0, 36500), lambda s: s.history_retention_days),
    "history_max_rows": (_int(0, 10_000_000), lambda s: s.history_max_rows),
    "live_max_sessions": (_int(0, 256), lambda s: s.live_max_sessions),
    "live_max_minutes": (_int(0, 1440), lambda s: s.live_max_minutes),
    "require_api_key": (_bool, lambda s: s.require_api_key),
    "allowed_origins": (_origins, lambda s: sorted(o.lower() for o in s.allowed_origins)),
    "default_callback_url": (_callback_url, lambda s: ""),
}


class SettingsStore:
    def __init__(self, db: Database, services: Services) -> None:
        self.db = db
        self.services = services
        self.values: dict[str, Any] = {}
        self.overridden: set[str] = set()

    @property
    def defaults(self) -> dict[str, Any]:
        return {name: default(self.services.settings) for name, (_, default) in FIELDS.items()}

    async def load(self) -> dict[str, Any]:
        await self.db.migrate("settings", MIGRATIONS)
        values = self.defaults
        async with self.db.conn.execute("SELECT key, value FROM runtime_settings") as cur:
            rows = await cur.fetchall()
        for key, raw in rows:
            if key not in FIELDS:
                continue
            try:
                values[key] = FIELDS[key][0](json.loads(raw))
                self.overridden.add(key)
            except ValueError:
                log.warning("ignoring the stored setting %s: no longer valid", key)
        self._publish(values)
        return values

    def validate(self, changes: Any) -> dict[str, Any]:
        if not isinstance(changes, dict):
            raise SettingsError("settings", "expected a JSON object of setting: value")
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in FIELDS:
                raise SettingsError(str(key)[:64], "unknown setting")
            try:
                clean[key] = FIELDS[key][0](value)
            except ValueError as exc:
                raise SettingsError(key, str(exc)) from None
        if "default_model" in clean:
            name = clean["default_model"]
            models = self.services.models
            try:
                models.check_name(name)
            except Exception:
                raise SettingsError("default_model", f"unknown model {name!r}", 404) from None
            if models.locate(name) is None:
                raise SettingsError(
                    "default_model",
                    f"model {name!r} is not on this appliance: download or import it first",
                    409,
                )
        return clean

    async def update(self, changes: Any) -> dict[str, Any]:
        """Validate every change first, then store them all; returns the effective values."""
        clean = self.validate(changes)
        now = time.time()
        defaults = self.defaults
        for key, value in clean.items():
            if value == defaults[key]:
                await self.db.conn.execute("DELETE FROM runtime_settings WHERE key = ?", (key,))
                self.overridden.discard(key)
            else:
                await self.db.conn.execute(
                    "INSERT INTO runtime_settings (key, value, changed) VALUES (?, ?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value,"
                    " changed = excluded.changed",
                    (key, json.dumps(value), now),
                )
                self.overridden.add(key)
        await self.db.conn.commit()
        previous_model = self.values.get("default_model")
        values = {**self.values, **clean}
        self._publish(values)
        log.info("runtime settings changed: %s", ", ".join(sorted(clean)) or "none")
        if "history_retention_days" in clean or "history_max_rows" in clean:
            await self.services.history.apply_retention()
        if values["default_model"] != previous_model:
            self.warm_up(values["default_model"])
        return values

    def _publish(self, values: dict[str, Any]) -> None:
        self.values = values
        extras = self.services.extras
        for key, value in values.items():
            extras[key] = value
        extras["allowed_origins"] = tuple(values["allowed_origins"])
        history = self.services.history
        history.retention_days = values["history_retention_days"]
        history.max_rows = values["history_max_rows"]

    def warm_up(self, name: str) -> None:
        """Load the (new) default model in the background so the next request is fast."""

        async def load() -> None:
            try:
                async with self.services.models.use(name):
                    log.info("default model %s is ready", name)
            except Exception as exc:  # reported, and the next request retries
                log.warning("could not load the default model %s: %s", name, exc)

        self.services.extras["settings_warm_up"] = asyncio.get_running_loop().create_task(load())

    def describe(self) -> dict[str, Any]:
        return {
            "values": self.values,
            "defaults": self.defaults,
            "overridden": sorted(self.overridden),
        }
