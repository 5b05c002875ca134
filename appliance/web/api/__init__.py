"""HTTP API blueprints, one module per concern."""

from __future__ import annotations

from quart import Quart

from appliance.web.api import asr_compat, history_api, openai_compat, system, transcribe


def register(app: Quart) -> None:
    for module in (system, transcribe, openai_compat, history_api, asr_compat):
        app.register_blueprint(module.blueprint)
