"""One handler that renders errors as JSON: `{"error": {"code": ..., "message": ...}}`.

Every error of the appliance's own derives from `appliance.exceptions.ApplianceError` (status,
code, message), whatever layer raises it; `APIError` is the same class under its web name.
"""

from __future__ import annotations

import logging

from quart import Quart, Response, jsonify
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from appliance.exceptions import ApplianceError

log = logging.getLogger(__name__)


# the name the web code has always raised: the root itself
APIError = ApplianceError


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Quart) -> None:
    @app.errorhandler(ApplianceError)
    async def _appliance_error(error: ApplianceError) -> Response:
        """Every error of the appliance's own, from any layer: the one place they are rendered."""
        if error.internal:
            log.error("unhandled error", exc_info=error)
            return error_response(500, "internal_error", "internal error; see the server log")
        return error_response(error.status, error.code, error.message, error.headers)

    @app.errorhandler(RequestSchemaValidationError)
    async def _validation_error(error: RequestSchemaValidationError) -> Response:
        return error_response(400, "invalid_request", str(error.validation_error))

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        code = (error.name or "error").lower().replace(" ", "_")
        return error_response(error.code or 500, code, error.description or error.name)

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; see the server log")
