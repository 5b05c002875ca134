"""The long-lived parts of a running appliance, typed, built at start and kept on the app.

`Services` is built once by `appliance.web.app.build_services` in a fixed order and stored in
`app.extensions["appliance"]`; routes read it with `services()`. The optional features
(Wyoming, the inbox, webhooks) are `None` when they are off or could not start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quart import current_app

from appliance.core.auth import Auth
from appliance.core.db import AnyDatabase
from appliance.core.history import History
from appliance.core.jobs import JobQueue
from appliance.core.model_manager import ModelManager
from appliance.core.ratelimit import RateLimiter
from appliance.system.config import Settings

if TYPE_CHECKING:
    from appliance.web.inbox import Inbox
    from appliance.web.settings_store import SettingsStore
    from appliance.web.webhooks import Dispatcher
    from appliance.web.wyoming_server import WyomingServer

log = logging.getLogger(__name__)


@dataclass
class Limiters:
    """Token buckets: transcription requests and live sessions (`api`), admin logins."""

    api: RateLimiter
    login: RateLimiter

    @classmethod
    def from_settings(cls, settings: Settings) -> Limiters:
        return cls(
            api=RateLimiter(settings.api_rate_limit),
            login=RateLimiter(settings.login_rate_limit),
        )


@dataclass
class RuntimeSettings:
    """The effective runtime settings: the admin panel's values over the environment's.

    Published by `SettingsStore` (its `FIELDS` hold the environment defaults: the one place
    they are applied) when it loads and on every change.
    """

    default_model: str
    default_language: str | None  # None: detect
    max_upload_size: int
    require_api_key: bool
    allowed_origins: tuple[str, ...]  # lower case, no trailing slash
    live_max_sessions: int
    live_max_minutes: float  # 0: no limit
    default_callback_url: str | None  # the webhook of jobs that name none

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RuntimeSettings:
        """From the store's validated values (every field present)."""
        return cls(
            default_model=str(values["default_model"]),
            default_language=str(values["default_language"]) or None,
            max_upload_size=int(values["max_upload_size"]),
            require_api_key=bool(values["require_api_key"]),
            allowed_origins=tuple(values["allowed_origins"]),
            live_max_sessions=int(values["live_max_sessions"]),
            live_max_minutes=float(values["live_max_minutes"]),
            default_callback_url=str(values["default_callback_url"]) or None,
        )


@dataclass
class Services:
    settings: Settings
    db: AnyDatabase
    history: History
    models: ModelManager
    jobs: JobQueue
    auth: Auth
    limiters: Limiters
    started: float = field(default_factory=time.time)
    ready: bool = False
    # one admin-panel update request at a time (admin/update_api)
    update_request_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # set by `settings_store` when it loads (in build_services, before anything reads them)
    settings_store: SettingsStore = field(init=False)
    runtime: RuntimeSettings = field(init=False)
    # optional features: None when off (or, for Wyoming, when its port could not be bound)
    webhooks: Dispatcher | None = None
    wyoming: WyomingServer | None = None
    inbox: Inbox | None = None
    # the latest warm-up of the default model: done when it finished (or failed)
    warming: asyncio.Future[None] | None = None

    # --- runtime settings, the environment as defaults ----------------------------------------
    @property
    def default_model(self) -> str:
        """The model used when a request names none."""
        return self.runtime.default_model

    @property
    def default_language(self) -> str | None:
        """The language used when a request names none (None: detect)."""
        return self.runtime.default_language

    @property
    def max_upload_size(self) -> int:
        return self.runtime.max_upload_size

    # --- background work ----------------------------------------------------------------------
    def warm_up(self, name: str | None = None) -> None:
        """Load the (new) default model as a Quart background task, so the next request is
        fast; `await services.warmed_up()` waits for it. Needs an app context."""
        name = name or self.default_model
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.warming = done

        async def load() -> None:
            try:
                async with self.models.use(name):
                    log.info("default model %s is ready", name)
            except Exception as exc:  # reported, and the next request retries
                log.warning("could not load the default model %s: %s", name, exc)
            finally:
                if not done.done():
                    done.set_result(None)

        current_app.add_background_task(load)

    async def warmed_up(self) -> None:
        """Wait for the latest warm-up of the default model (if any) to finish."""
        if self.warming is not None:
            await asyncio.shield(self.warming)


def services() -> Services:
    """The running app's services (inside a request or websocket)."""
    result: Services = current_app.extensions["appliance"]
    return result
