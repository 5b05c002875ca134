"""One error type raised anywhere, one handler that renders it as JSON.

Every error the API returns has the shape `{"error": {"code": ..., "message": ...}}`.
"""

from __future__ import annotations

import logging

from quart import Quart, Response, jsonify
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error meant for the client: a status, a stable code and a human message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Quart) -> None:
    @app.errorhandler(APIError)
    async def _api_error(error: APIError) -> Response:
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
