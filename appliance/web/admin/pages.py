"""The admin pages: server-rendered shells; each loads its ES module from /static/admin/."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from quart import Blueprint, current_app, g, make_response, redirect, render_template, request
from quart.typing import ResponseReturnValue

from appliance import __version__
from appliance.core.auth import LOGIN_CSRF_COOKIE
from appliance.web.security import current_session
from appliance.web.services import services

# nested in the guarded /admin blueprint by `appliance.web.admin.init_app`
blueprint = Blueprint("pages", __name__)

NAV = (
    ("status", "/admin", "Status"),
    ("models", "/admin/models", "Models"),
    ("settings", "/admin/settings", "Settings"),
    ("keys", "/admin/keys", "API keys"),
    ("logs", "/admin/logs", "Logs"),
    ("updates", "/admin/updates", "Updates"),
    ("password", "/admin/password", "Password"),
)


def context(page: str, title: str, **extra: Any) -> dict[str, Any]:
    """What the admin layout needs (also used by the public /trust page)."""
    static = current_app.static_folder
    app_css = static is not None and (Path(static) / "css" / "app.css").is_file()
    values: dict[str, Any] = {
        "page": page,
        "title": title,
        "nav": (),
        "csrf": "",
        "version": __version__,
        "app_css": app_css,
    }
    return {**values, **extra}


async def _page(name: str, title: str) -> str:
    return await render_template(
        f"admin/{name}.html", **context(name, title, nav=NAV, csrf=g.admin_session.csrf)
    )


@blueprint.get("/login")
async def login_page() -> ResponseReturnValue:
    if await current_session() is not None:  # logged in already
        return redirect("/admin", 303)
    token = secrets.token_urlsafe(24)
    first = services().auth.password_file.is_file()
    html = await render_template(
        "admin/login.html",
        **context(
            "login",
            "Log in",
            csrf=token,
            first_login=first,
            password_file=str(services().auth.password_file),
        ),
    )
    response = await make_response(html)
    response.set_cookie(
        LOGIN_CSRF_COOKIE,
        token,
        path="/admin",
        secure=request.scheme == "https",
        httponly=True,
        samesite="Strict",
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@blueprint.get("")
@blueprint.get("/")
async def status_page() -> str:
    return await _page("status", "Status")


@blueprint.get("/models")
async def models_page() -> str:
    return await _page("models", "Models")


@blueprint.get("/settings")
async def settings_page() -> str:
    return await _page("settings", "Settings")


@blueprint.get("/keys")
async def keys_page() -> str:
    return await _page("keys", "API keys")


@blueprint.get("/logs")
async def logs_page() -> str:
    return await _page("logs", "Logs")


@blueprint.get("/updates")
async def updates_page() -> str:
    return await _page("updates", "Updates")


@blueprint.get("/password")
async def password_page() -> str:
    return await _page("password", "Change password")
