"""The admin JSON API (`/admin/api/*` and `/admin/check-updates`), called by the admin pages."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from typing import Annotated, Any, Literal

import psutil
from pydantic import BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError
from quart import Blueprint, Response, current_app, jsonify, request
from quart_schema import document_request, validate_querystring

from appliance import __version__
from appliance.core.auth import LOGIN_CSRF_COOKIE, SESSION_COOKIE, SESSION_MAX_AGE, AuthError
from appliance.core.model_manager import MAX_IMPORT_BYTES, ModelError
from appliance.system import logging_setup
from appliance.web import webhooks
from appliance.web.admin import updates
from appliance.web.admin.guard import auth, read_json, session
from appliance.web.api.options import FormModel
from appliance.web.api.validation import load, validate_json
from appliance.web.errors import APIError
from appliance.web.security import client_ip
from appliance.web.services import services
from appliance.web.settings_store import SettingsError, SettingsStore
from appliance.web.upload import receive_upload

log = logging.getLogger(__name__)
# nested in the guarded /admin blueprint by `appliance.web.admin.init_app`
blueprint = Blueprint("api", __name__)

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_ID = re.compile(r"^[0-9a-f]{32}$")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class LoginBody(BaseModel):
    password: str = Field(min_length=1, description="The admin password")
    next: str | None = Field(None, description="Where to go after logging in (an /admin page)")


class PasswordBody(BaseModel):
    current: str = Field(description="The current admin password")
    new: str = Field(description="The new password (strength: appliance.core.auth)")


def _key_name(value: object) -> object:
    if not isinstance(value, str):
        return value
    name = value.strip()
    if not name:
        raise PydanticCustomError("invalid_name", "give the key a name (who or what uses it)")
    if len(name) > 80 or any(ord(c) < 32 or c in "<>\"'`" for c in name):
        raise PydanticCustomError("invalid_name", "a key name is at most 80 plain characters")
    return name


class KeyBody(BaseModel):
    name: Annotated[str, BeforeValidator(_key_name)] = Field(
        description="Who or what uses the key: at most 80 plain characters"
    )


def _log_level(value: object) -> object:
    level = value.strip().upper() if isinstance(value, str) else value
    if level not in LOG_LEVELS:
        raise PydanticCustomError("invalid_level", f"level is one of {', '.join(LOG_LEVELS)}")
    return level


class LogsQuery(FormModel):
    level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_log_level)
    ] = Field("INFO", description="The lowest level shown: DEBUG, INFO, WARNING, ERROR or CRITICAL")
    lines: Annotated[int, Field(ge=1, le=2000)] = Field(
        200, description="How many of the newest lines"
    )


def _auth_error(exc: AuthError) -> APIError:
    return APIError(exc.status, exc.code, exc.message)


def _secure_request() -> bool:
    forwarded = request.headers.get("X-Forwarded-Proto", "").lower()
    return request.scheme == "https" or forwarded == "https"


def _store() -> SettingsStore:
    return services().settings_store


def _model_name(name: str) -> str:
    if not _MODEL_NAME.match(name) or ".." in name:
        raise APIError(400, "invalid_name", "a model name is letters, digits, '.', '_' and '-'")
    return name


def _model_error(exc: ModelError) -> APIError:
    return APIError(exc.status, exc.code, exc.message)


# --- login / logout / password -------------------------------------------------------------
@blueprint.post("/api/login")
@document_request(LoginBody)
async def login() -> Response:
    """Log in with the admin password (login CSRF: double-submit cookie; throttled per IP)."""
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    header = request.headers.get("X-CSRF-Token", "")
    if not cookie or not auth().check_csrf(cookie, header):
        raise APIError(403, "csrf_failed", "missing login token: reload the login page")
    limiter = services().limiters.login
    wait = limiter.hit(f"login:{client_ip()}")
    if wait is not None:
        log.warning("login throttled for %s", client_ip())
        raise APIError(
            429,
            "too_many_attempts",
            f"too many login attempts; retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )
    # the body after the login token and the throttle: `LoginBody`, read by the bounded reader
    data = load(LoginBody, await read_json())
    password = data.password
    if not await auth().check_password(password):
        log.warning("failed admin login from %s", client_ip())
        raise APIError(401, "wrong_password", "wrong password")
    value = await auth().create_session(client_ip())
    log.info("admin logged in from %s", client_ip())
    next_url = data.next
    safe_next = (
        next_url
        if isinstance(next_url, str) and re.match(r"^/admin(/[A-Za-z0-9/_-]*)?$", next_url)
        else "/admin"
    )
    response = jsonify({"ok": True, "next": safe_next})
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=SESSION_MAX_AGE,
        path="/",
        secure=_secure_request(),
        httponly=True,
        samesite="Strict",
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/admin")
    return response


@blueprint.post("/api/logout")
async def logout() -> Response:
    await auth().end_session(session())
    response = jsonify({"ok": True})
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@blueprint.post("/api/password")
@validate_json(PasswordBody)
async def change_password(data: PasswordBody) -> Response:
    try:
        await auth().change_password(data.current, data.new, session().id_hash)
    except AuthError as exc:
        raise _auth_error(exc) from None
    return jsonify({"ok": True})


# --- status --------------------------------------------------------------------------------
@blueprint.get("/api/status")
async def status() -> Response:
    s = services()
    mem = psutil.virtual_memory()
    disk = shutil.disk_usage(s.settings.data_dir)
    running = [s.jobs.snapshot(job) for job in s.jobs.jobs.values() if job.id in s.jobs.running]
    for job in running:
        job.pop("text", None)  # transcripts stay out of the admin panel
    return jsonify(
        {
            "version": __version__,
            "uptime_seconds": round(time.time() - s.started, 1),
            "engine": s.settings.engine,
            "compute_type": s.settings.compute_type,
            "default_model": s.default_model,
            "loaded_models": [
                {"name": name, "ram_mb": round(item.ram_mb, 1), "in_use": item.users}
                for name, item in s.models.loaded.items()
            ],
            "queue": s.jobs.stats(),
            "running_jobs": running,
            "system": {
                "cpu_count": os.cpu_count(),
                "cpu_percent": psutil.cpu_percent(interval=None),
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "ram_total_mb": round(mem.total / 1024**2),
                "ram_available_mb": round(mem.available / 1024**2),
                "process_rss_mb": round(psutil.Process().memory_info().rss / 1024**2, 1),
                "disk_total_mb": round(disk.total / 1024**2),
                "disk_free_mb": round(disk.free / 1024**2),
            },
            "recent_errors": list(logging_setup.recent_errors.entries)[-20:],
        }
    )


# --- models --------------------------------------------------------------------------------
@blueprint.get("/api/models")
async def list_models() -> Response:
    s = services()
    return jsonify(
        {
            "models": s.models.status(),
            "default_model": s.default_model,
        }
    )


def _background(name: str, coro: Any) -> None:
    """A Quart background task (awaited, then cancelled, at shutdown)."""

    async def run() -> None:
        log.debug("admin task %s", name)
        await coro

    current_app.add_background_task(run)


def _known_model_name(name: str) -> str:
    """The model name of the URL, checked against the catalog (its error as an APIError)."""
    name = _model_name(name)
    try:
        services().models.check_name(name)
    except ModelError as exc:
        raise _model_error(exc) from None
    return name


def _accepted(name: str, task: str, state: str, coro: Any) -> Response:
    """Run `coro` in the background; 202 `{ok, name, state}` now."""
    _background(f"{task}-{name}", coro)
    response = jsonify({"ok": True, "name": name, "state": state})
    response.status_code = 202
    return response


@blueprint.post("/api/models/<name>/download")
async def download_model(name: str) -> Response:
    models = services().models
    name = _known_model_name(name)
    if name in models.downloads:
        raise APIError(409, "download_running", f"model {name!r} is already downloading")

    async def run() -> None:
        try:
            await models.download(name)
            log.info("downloaded model %s", name)
        except ModelError as exc:
            models.errors[name] = exc.message
            log.warning("download of %s failed: %s", name, exc.message)

    return _accepted(name, "download", "downloading", run())


@blueprint.post("/api/models/<name>/load")
async def load_model(name: str) -> Response:
    models = services().models
    name = _known_model_name(name)
    if models.locate(name) is None:
        raise APIError(409, "model_not_available", f"model {name!r} is not downloaded yet")

    async def run() -> None:
        try:
            async with models.use(name):
                pass
        except ModelError as exc:
            log.warning("loading %s failed: %s", name, exc.message)

    return _accepted(name, "load", "loading", run())


@blueprint.delete("/api/models/<name>")
async def delete_model(name: str) -> Response:
    s = services()
    name = _model_name(name)
    if name == s.default_model:
        raise APIError(409, "model_is_default", "choose another default model before deleting")
    try:
        await asyncio.to_thread(s.models.delete, name)
    except ModelError as exc:
        raise _model_error(exc) from None
    log.info("deleted model %s", name)
    return jsonify({"ok": True})


@blueprint.post("/api/models/import")
async def import_model() -> Response:
    """Upload a model archive (.tar.gz/.tar.xz/.zip) with a `name` field: air-gapped sites."""
    s = services()
    upload = await receive_upload(request, s.settings.tmp_dir, MAX_IMPORT_BYTES)
    try:
        name = _model_name((upload.get("name") or "").strip())
        assert upload.file_path is not None
        path = await asyncio.to_thread(s.models.import_model, name, upload.file_path)
    except ModelError as exc:
        raise _model_error(exc) from None
    finally:
        upload.discard()
    log.info("imported model %s", name)
    response = jsonify({"ok": True, "name": name, "path": path.name})
    response.status_code = 201
    return response


# --- settings ------------------------------------------------------------------------------
def _describe_settings() -> dict[str, Any]:
    """The runtime settings, and the webhook secret (issue 15) to verify signatures with."""
    described = _store().describe()
    hooks = webhooks.dispatcher(services())
    described["webhook"] = {
        "secret": hooks.secret if hooks is not None else None,
        "signature_header": webhooks.SIGNATURE_HEADER,
        "timestamp_header": webhooks.TIMESTAMP_HEADER,
    }
    return described


@blueprint.get("/api/settings")
async def get_settings() -> Response:
    return jsonify(_describe_settings())


@blueprint.put("/api/settings")
async def put_settings() -> Response:
    changes = await read_json()
    try:
        await _store().update(changes)
    except SettingsError as exc:
        raise APIError(exc.status, "invalid_setting", str(exc)) from None
    return jsonify(_describe_settings())


# --- logs ----------------------------------------------------------------------------------
@blueprint.get("/api/logs")
@validate_querystring(LogsQuery)
async def logs(query_args: LogsQuery) -> Response:
    level, lines = query_args.level, query_args.lines
    settings = services().settings
    entries = await asyncio.to_thread(logging_setup.tail, settings, lines=lines, level=level)
    return jsonify({"level": level, "entries": entries})


# --- API keys ------------------------------------------------------------------------------
@blueprint.get("/api/keys")
async def list_keys() -> Response:
    return jsonify({"keys": await auth().list_keys()})


@blueprint.post("/api/keys")
@validate_json(KeyBody)
async def create_key(data: KeyBody) -> Response:
    row, key = await auth().create_key(data.name)
    response = jsonify({"key": key, **row})
    response.status_code = 201
    response.headers["Cache-Control"] = "no-store"
    return response


@blueprint.delete("/api/keys/<key_id>")
async def revoke_key(key_id: str) -> Response:
    if not _KEY_ID.match(key_id):
        raise APIError(400, "invalid_id", "not a key id")
    if not await auth().revoke_key(key_id):
        raise APIError(404, "key_not_found", "no such active key")
    return jsonify({"ok": True})


# --- updates -------------------------------------------------------------------------------
@blueprint.get("/check-updates")
async def check_updates() -> Response:
    """The running version and whether the update source offers a newer release."""
    return jsonify(await updates.check(services().settings.update_source, __version__))
