"""The admin blueprint and the guard every admin request passes: session, CSRF, body size."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from quart import Blueprint, Response, g, redirect, request

from appliance.auth import CSRF_HEADER, Auth, Session
from appliance.errors import APIError, error_response
from appliance.security import current_session, get_auth

blueprint = Blueprint("admin", __name__, url_prefix="/admin")

OPEN_ENDPOINTS = {"admin.login_page", "admin.login"}
PAGE_ENDPOINTS = {
    "admin.status_page",
    "admin.models_page",
    "admin.settings_page",
    "admin.logs_page",
    "admin.keys_page",
    "admin.updates_page",
    "admin.password_page",
}
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
MAX_JSON_BYTES = 64 * 1024


@blueprint.before_request
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
    """The request's JSON object, at most 64 KiB; 4xx JSON errors for anything else."""
    if request.mimetype != "application/json":
        raise APIError(415, "unsupported_media_type", "send application/json")
    if request.content_length is not None and request.content_length > MAX_JSON_BYTES:
        raise APIError(413, "body_too_large", "the request body is larger than 64 KiB")
    body = bytearray()
    async for chunk in request.body:
        body.extend(chunk)
        if len(body) > MAX_JSON_BYTES:
            raise APIError(413, "body_too_large", "the request body is larger than 64 KiB")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise APIError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "invalid_json", "expected a JSON object")
    return data
