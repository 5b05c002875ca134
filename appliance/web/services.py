"""The long-lived parts of a running appliance, created at start and kept on the app."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from quart import current_app

from appliance.core.db import Database
from appliance.core.history import History
from appliance.core.jobs import JobQueue
from appliance.core.model_manager import ModelManager
from appliance.system.config import Settings


@dataclass
class Services:
    settings: Settings
    db: Database
    history: History
    models: ModelManager
    jobs: JobQueue
    started: float = field(default_factory=time.time)
    ready: bool = False
    # one admin-panel update request at a time (admin/update_api)
    update_request_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # untyped; being replaced by the typed fields and properties here (issue 11, item 3)
    extras: dict[str, Any] = field(default_factory=dict)

    # --- runtime settings (admin panel, settings_store), the environment as defaults -----------
    @property
    def default_model(self) -> str:
        """The model used when a request names none."""
        return str(self.extras.get("default_model") or self.settings.whisper_model)

    @property
    def default_language(self) -> str | None:
        """The language used when a request names none (None: detect)."""
        language = self.extras.get("default_language")
        return str(language) if language else None

    @property
    def max_upload_size(self) -> int:
        return int(self.extras.get("max_upload_size") or self.settings.max_upload_size)


def services() -> Services:
    """The running app's services (inside a request or websocket)."""
    result: Services = current_app.extensions["appliance"]
    return result
