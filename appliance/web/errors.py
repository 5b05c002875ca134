"""One handler that renders errors as JSON: `{"error": {"code": ..., "message": ...}}`.

Every error of the appliance's own derives from `appliance.exceptions.ApplianceError` (status,
code, message), whatever layer raises it; `APIError` is the same class under its web name.
"""

from __future__ import annotations

import logging
from typing import get_args

from pydantic import ValidationError
from pydantic_core.core_schema import ErrorType
from quart import Quart, Response, jsonify
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from appliance.exceptions import ApplianceError

log = logging.getLogger(__name__)


# the name the web code has always raised: the root itself
APIError = ApplianceError


# pydantic's own error types; any other type is an API error code raised by a request model
_PYDANTIC_ERRORS = frozenset(get_args(ErrorType))
_MAX_PROBLEMS = 5


def validation_problems(error: Exception) -> list[tuple[tuple[str | int, ...], str, str]]:
    """(field location, error type, message) of each problem a request model found."""
    if not isinstance(error, ValidationError):
        return [((), "invalid_request", str(error))]
    problems = []
    for item in error.errors(include_url=False, include_context=False, include_input=False):
        message = item["msg"].removeprefix("Value error, ")
        problems.append((tuple(item["loc"]), item["type"], message))
    return problems[:_MAX_PROBLEMS]


def describe_validation(error: Exception) -> tuple[str, str]:
    """The API error code and a message naming each field: `language: unknown language ...`."""
    problems = validation_problems(error)
    kind = problems[0][1] if problems else "invalid_request"
    code = "invalid_request" if kind in _PYDANTIC_ERRORS else kind
    message = "; ".join(
        f"{'.'.join(str(part) for part in loc)}: {text}" if loc else text
        for loc, _kind, text in problems
    )
    return code, message or "invalid request"


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

    @app.errorhandler(RequestSchemaValidationError)  # QuerystringValidationError too
    async def _validation_error(error: RequestSchemaValidationError) -> Response:
        """A request model refused a field, query value or body: 400 naming the field."""
        code, message = describe_validation(error.validation_error)
        return error_response(400, code, message)

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        code = (error.name or "error").lower().replace(" ", "_")
        return error_response(error.code or 500, code, error.description or error.name)

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; see the server log")
