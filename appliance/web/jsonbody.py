"""The one JSON reader for untrusted input: bounded in size and in nesting depth.

`json.loads` recurses once per nesting level, so a few kilobytes of `[[[[…` raise
`RecursionError` (an unhandled 500, or 1011 on a WebSocket). Every request body and WebSocket
text frame that carries JSON goes through here instead: the size is checked first, then the
nesting depth by a linear scan that skips string contents, and only then is the text parsed.

- `parse_json(data)` -> any JSON value, or `JSONInputError` (status, code, message);
- `parse_json_object(data)` -> a `dict`, refusing any other top level;
- `read_json_body(request)` -> the request body's JSON object, streamed with a byte cap; raises
  `APIError` (415 not JSON, 413 too large, 400 malformed / too deep / not an object).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

from quart import Request

from appliance.exceptions import ApplianceError
from appliance.web.errors import APIError

MAX_JSON_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32

# A JSON string (possibly unterminated: no closing quote) or one bracket. Possessive
# quantifiers keep it linear on hostile input such as `"\"\"\"…` without a closing quote.
_TOKEN = re.compile(r'"(?:[^"\\]++|\\.)*+"?|[\[\]{}]', re.DOTALL)


class JSONInputError(ApplianceError, ValueError):
    """JSON input refused: an HTTP status, a stable error code and a message for the client."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _invalid(message: str = "the body is not valid JSON") -> NoReturn:
    raise JSONInputError(400, "invalid_json", message)


def _refuse_constant(name: str) -> NoReturn:
    _invalid(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _invalid(f"the number {text[:20]} is out of range")
    return value


def check_depth(text: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse text whose brackets (outside strings) nest deeper than `max_depth`.

    Errs on the side of refusing: text that would fail to parse anyway may be refused here
    with a different message, but nothing `json.loads` accepts is refused below the limit.
    """
    depth = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        first = token[0]
        if first in "[{":
            depth += 1
            if depth > max_depth:
                raise JSONInputError(
                    400, "invalid_json", f"JSON nested deeper than {max_depth} levels"
                )
        elif first in "]}":
            depth -= 1
            if depth < 0:
                _invalid()
        elif len(token) < 2 or not token.endswith('"') or _escaped_end(token):
            _invalid()  # an unterminated string: the parser would stop there anyway


def _escaped_end(token: str) -> bool:
    """Whether the last quote of `token` is escaped (an odd run of backslashes before it)."""
    body = token[1:-1]
    run = len(body) - len(body.rstrip("\\"))
    return run % 2 == 1


def parse_json(
    data: bytes | bytearray | str,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """Parse untrusted JSON text; `JSONInputError` for anything too large, deep or malformed."""
    if len(data) > max_bytes:
        raise JSONInputError(413, "body_too_large", f"the JSON is larger than {max_bytes} bytes")
    if isinstance(data, str):
        text = data
    else:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            _invalid("the JSON is not valid UTF-8")
        if len(text) > max_bytes:  # pragma: no cover - UTF-8 never has more chars than bytes
            raise JSONInputError(413, "body_too_large", "the JSON is too large")
    check_depth(text, max_depth)
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except JSONInputError:
        raise
    except (ValueError, RecursionError):
        _invalid()
    try:
        # `"\ud800"` is valid JSON but no text: SQLite, logs and UTF-8 output would fail on it
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        _invalid("the JSON holds a lone surrogate (\\ud800-\\udfff) that is not text")
    return value


def parse_json_object(
    data: bytes | bytearray | str,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> dict[str, Any]:
    """`parse_json`, requiring an object at the top level."""
    value = parse_json(data, max_bytes=max_bytes, max_depth=max_depth)
    if not isinstance(value, dict):
        _invalid("expected a JSON object")
    return value


async def read_json_body(
    request: Request,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> dict[str, Any]:
    """The request body as a JSON object: `application/json`, at most `max_bytes`, streamed
    (a chunked body is cut off as soon as it passes the limit). `APIError` 4xx otherwise."""
    if request.mimetype != "application/json":
        raise APIError(415, "unsupported_media_type", "send application/json")
    too_large = APIError(
        413, "body_too_large", f"the request body is larger than {max_bytes // 1024} KiB"
    )
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.body:
        body.extend(chunk)
        if len(body) > max_bytes:
            raise too_large
    try:
        return parse_json_object(body, max_bytes=max_bytes, max_depth=max_depth)
    except JSONInputError as exc:
        raise APIError(exc.status, exc.code, exc.message) from None
