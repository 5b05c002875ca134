"""Runtime settings: changed in the admin panel, persisted in the database, env vars as defaults.

The effective values are published as the typed `Services.runtime` (`RuntimeSettings`:
`default_model`, `default_language`, `max_upload_size`, `require_api_key`, `allowed_origins`,
`live_max_sessions`, `live_max_minutes`, `default_callback_url`), where the rest of the
appliance reads them, and the history retention is applied to the running `History`. The
environment defaults are applied here, once (`FIELDS`). On a cluster's shared PostgreSQL each
node polls the table (`REFRESH_SECONDS`), so a change made on one node reaches every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from appliance.core.db import DB_ERRORS, AnyDatabase
from appliance.exceptions import ApplianceError
from appliance.system.config import (
    Settings,
    parse_language,
    parse_model_name,
    parse_origins,
    parse_size,
)
from appliance.web.services import RuntimeSettings, Services

log = logging.getLogger(__name__)

REFRESH_SECONDS = 5.0  # how soon another node's change applies here (shared database only)

MIGRATIONS = [
    """
    CREATE TABLE runtime_settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        changed REAL NOT NULL
    );
    """,
]

PG_MIGRATIONS = [
    """
    CREATE TABLE runtime_settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        changed DOUBLE PRECISION NOT NULL
    );
    """,
]

MIGRATIONS_BY_DIALECT = {"sqlite": MIGRATIONS, "postgresql": PG_MIGRATIONS}

MAX_UPLOAD_LIMIT = 10 * 1024**3


class SettingsError(ApplianceError, ValueError):
    """A runtime setting value that is refused; `field` names it (so does the message)."""

    code = "invalid_setting"

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected a size such as 100MB or a number of bytes")
    number = value if isinstance(value, int) else parse_size(value)
    if not 1024 * 1024 <= number <= MAX_UPLOAD_LIMIT:
        raise ValueError("expected a size from 1MiB to 10GiB")
    return number


def _origins(value: Any) -> list[str]:
    return list(parse_origins(value))  # the ALLOWED_ORIGINS rule; a JSON list here


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


# name -> (validator, env default); the validators are those of the variables they default to
# (Settings.rule), except where the panel bounds a value further (_size)
FIELDS: dict[str, tuple[Callable[[Any], Any], Callable[[Settings], Any]]] = {
    "default_model": (parse_model_name, lambda s: s.whisper_model),
    "default_language": (parse_language, lambda s: ""),
    "max_upload_size": (_size, lambda s: s.max_upload_size),
    "history_retention_days": (
        Settings.rule("history_retention_days"),
        lambda s: s.history_retention_days,
    ),
    "history_max_rows": (Settings.rule("history_max_rows"), lambda s: s.history_max_rows),
    "live_max_sessions": (Settings.rule("live_max_sessions"), lambda s: s.live_max_sessions),
    "live_max_minutes": (Settings.rule("live_max_minutes"), lambda s: s.live_max_minutes),
    "require_api_key": (Settings.rule("require_api_key"), lambda s: s.require_api_key),
    "allowed_origins": (_origins, lambda s: list(s.allowed_origins)),
    "default_callback_url": (_callback_url, lambda s: ""),
}


class SettingsStore:
    def __init__(self, db: AnyDatabase, services: Services) -> None:
        self.db = db
        self.services = services
        self.values: dict[str, Any] = {}
        self.overridden: set[str] = set()
        self._refresher: asyncio.Task[None] | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        return {name: default(self.services.settings) for name, (_, default) in FIELDS.items()}

    async def load(self) -> dict[str, Any]:
        await self.db.migrate("settings", MIGRATIONS_BY_DIALECT)
        values, self.overridden = await self._read()
        self._publish(values)
        return values

    async def _read(self) -> tuple[dict[str, Any], set[str]]:
        """The stored values over the defaults, and which keys are stored."""
        values, overridden = self.defaults, set()
        async with self.db.conn.execute("SELECT key, value FROM runtime_settings") as cur:
            rows = await cur.fetchall()
        for key, raw in rows:
            if key not in FIELDS:
                continue
            try:
                values[key] = FIELDS[key][0](json.loads(raw))
                overridden.add(key)
            except ValueError:
                log.warning("ignoring the stored setting %s: no longer valid", key)
        return values, overridden

    async def refresh(self) -> bool:
        """Take over what another node of a cluster changed in the shared database; True if
        anything did. Effects as in `update` (retention, warming the new default model)."""
        values, overridden = await self._read()
        if values == self.values and overridden == self.overridden:
            return False
        changed = sorted(k for k in values if values[k] != self.values.get(k))
        previous_model = self.values.get("default_model")
        self.overridden = overridden
        self._publish(values)
        log.info("runtime settings changed on another node: %s", ", ".join(changed) or "none")
        if {"history_retention_days", "history_max_rows"} & set(changed):
            await self.services.history.apply_retention()
        if values["default_model"] != previous_model:
            self.warm_up(values["default_model"])
        return True

    def start_refreshing(self, interval: float = REFRESH_SECONDS) -> None:
        """On a shared database, poll for other nodes' changes every `interval` seconds."""
        self._refresher = asyncio.create_task(self._refresh_periodically(interval))

    async def _refresh_periodically(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except DB_ERRORS as exc:  # the database is away for a moment: next round
                log.warning("cannot read the runtime settings: %s", exc)

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None

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
        self.services.settings_store = self
        self.services.runtime = RuntimeSettings.from_values(values)
        history = self.services.history
        history.retention_days = values["history_retention_days"]
        history.max_rows = values["history_max_rows"]

    def warm_up(self, name: str) -> None:
        """Load the (new) default model in the background so the next request is fast."""
        self.services.warm_up(name)

    def describe(self) -> dict[str, Any]:
        return {
            "values": self.values,
            "defaults": self.defaults,
            "overridden": sorted(self.overridden),
        }
