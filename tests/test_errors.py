"""One error root: any ApplianceError, from any layer, is rendered by the one handler."""

from __future__ import annotations

import pytest
from quart import Quart

from appliance.core.auth import AuthError
from appliance.core.jobs import JobStoreError
from appliance.exceptions import ApplianceError
from appliance.system.update.spool import SpoolBusy
from appliance.web.errors import APIError, register_error_handlers
from appliance.web.settings_store import SettingsError


def _app(error: Exception) -> Quart:
    app = Quart(__name__)
    register_error_handlers(app)

    @app.get("/")
    async def fail() -> str:
        raise error

    return app


@pytest.mark.parametrize(
    ("error", "status", "code", "message"),
    [
        (APIError(404, "not_found", "no such job", {"X-A": "1"}), 404, "not_found", "no such job"),
        (AuthError(401, "unauthorized", "log in first"), 401, "unauthorized", "log in first"),
        (SettingsError("default_model", "unknown model"), 400, "invalid_setting", None),
        (SpoolBusy("an update is pending"), 409, "update_pending", "an update is pending"),
    ],
)
async def test_every_layer_renders_through_the_root(
    error: ApplianceError, status: int, code: str, message: str | None
) -> None:
    response = await _app(error).test_client().get("/")
    body = await response.get_json()
    assert response.status_code == status
    assert body["error"]["code"] == code
    # the message names the field, as before
    assert body["error"]["message"] == (message or "default_model: unknown model")
    if isinstance(error, APIError) and error.headers:
        assert response.headers["X-A"] == "1"


async def test_an_error_not_meant_for_clients_stays_generic() -> None:
    response = await _app(JobStoreError("disk full at /secret/path")).test_client().get("/")
    body = await response.get_json()
    assert response.status_code == 500
    assert body["error"] == {
        "code": "internal_error",
        "message": "internal error; see the server log",
    }


def test_the_root_keeps_the_old_bases() -> None:
    assert issubclass(SettingsError, ValueError)
    assert APIError is ApplianceError
