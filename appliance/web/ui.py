"""The browser UI: the main page at `/` with the Files, Live and History panels.

Everything the page needs is served by the appliance itself (templates, ES modules, CSS): no
CDN, no build step, no inline script, so it works on an isolated LAN under a strict CSP. The
page talks to the REST API (`/api/jobs`, `/api/history`) and to `/ws/live`.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Quart, render_template

from appliance.web.api.options import LANGUAGES
from appliance.web.services import services

blueprint = Blueprint("ui", __name__)

# Shown first, by name; every other Whisper language follows by its code.
COMMON_LANGUAGES = {
    "en": "English",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "pl": "Polish",
    "sv": "Swedish",
    "da": "Danish",
    "no": "Norwegian",
    "fi": "Finnish",
    "cs": "Czech",
    "ru": "Russian",
    "uk": "Ukrainian",
    "tr": "Turkish",
    "ar": "Arabic",
    "hi": "Hindi",
    "zh": "Chinese",
    "ja": "Japanese",
    "ko": "Korean",
}


def languages() -> list[tuple[str, str]]:
    common = [(code, name) for code, name in COMMON_LANGUAGES.items() if code in LANGUAGES]
    rest = sorted((code, code) for code in LANGUAGES if code not in COMMON_LANGUAGES)
    return common + rest


def page_context() -> dict[str, Any]:
    s = services()
    default_model = s.default_model
    models = [m for m in s.models.status() if m["state"] != "not_downloaded"]
    if not any(m["name"] == default_model for m in models):
        models.insert(0, {"name": default_model, "languages": "", "description": ""})
    return {
        "models": models,
        "default_model": default_model,
        "default_language": s.default_language or "auto",
        "languages": languages(),
        "chunk_samples": s.settings.audio_chunk_size,
    }


@blueprint.get("/")
async def index() -> str:
    """The main page."""
    return await render_template("index.html", **page_context())


def init_app(app: Quart) -> None:
    app.register_blueprint(blueprint)
