"""The long-lived parts of a running appliance, created at start and kept on the app."""

from __future__ import annotations

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
    extras: dict[str, Any] = field(default_factory=dict)


def services() -> Services:
    """The running app's services (inside a request or websocket)."""
    result: Services = current_app.extensions["appliance"]
    return result
