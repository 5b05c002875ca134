"""The admin blueprint and the guard every admin request passes: session, CSRF, body size.

`make_blueprint()` builds a new `/admin` blueprint (one per app) whose guard also runs for the
blueprints nested in it (`pages`, `api`, `update_api`: see `appliance.web.admin.init_app`)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from quart import Blueprint, Response, g, redirect, request

from appliance.core.auth import CSRF_HEADER, Auth, Session
from appliance.web.errors import error_response
from appliance.web.jsonbody import read_json_body
from appliance.web.security import current_session, get_auth

OPEN_ENDPOINTS = {"admin.pages.login_page", "admin.api.login"}
PAGE_ENDPOINTS = {
    "admin.pages.status_page",
    "admin.pages.models_page",
    "admin.pages.settings_page",
    "admin.pages.logs_page",
    "admin.pages.keys_page",
    "admin.pages.updates_page",
    "admin.pages.password_page",
}
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
MAX_JSON_BYTES = 64 * 1024


def make_blueprint() -> Blueprint:
    """A new guarded `/admin` blueprint, for one app."""
    blueprint = Blueprint("admin", __name__, url_prefix="/admin")
    blueprint.before_request(guard)
    return blueprint


async def guard() -> Response | None:
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    session = await current_session()
    if session is None:
        if request.endpoint in PAGE_ENDPOINTS and request.method == "GET":
            return redirect(f"/admin/login?next={quote(request.path)}", 303)  # type: ignore[return-value]
        return error_response(401, "login_required", "log in to the admin panel first")
    if request.method in UNSAFE_METHODS and not Auth.check_csrf(
        session.csrf, request.headers.get(CSRF_HEADER)
    ):
        return error_response(
            403, "csrf_failed", f"missing or wrong {CSRF_HEADER}: reload the page and retry"
        )
    return None


def session() -> Session:
    """The logged-in session (the guard ran)."""
    result: Session = g.admin_session
    return result


def auth() -> Auth:
    return get_auth()


async def read_json() -> dict[str, Any]:
    """The request's JSON object, at most 64 KiB and 32 levels deep; 4xx JSON errors otherwise."""
    return await read_json_body(request, max_bytes=MAX_JSON_BYTES)
