"""quart-schema request models, fed from the appliance's bounded readers.

Query strings use quart-schema's own `@validate_querystring`. Bodies never reach
`request.get_json()` or `request.form` (unbounded): a JSON body is read by
`appliance.web.jsonbody` (64 KiB, 32 levels, strict UTF-8) and a multipart form by
`appliance.web.upload` (the file streamed to disk), and only then validated by the route's
model. `@validate_json` is `@validate_request` with that reader in front: it records the model
for `/openapi.json` the way quart-schema does and passes the validated model as `data`.
A refused value raises quart-schema's `RequestSchemaValidationError` (or
`QuerystringValidationError`), rendered by `appliance.web.errors` as a 400 naming the field.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from functools import wraps
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from quart import request
from quart_schema import DataSource, RequestSchemaValidationError
from quart_schema.validation import QUART_SCHEMA_REQUEST_ATTRIBUTE

from appliance.web.jsonbody import MAX_JSON_BYTES, read_json_body
from appliance.web.upload import Upload

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")


def load(model: type[M], data: object) -> M:
    """`data` as `model`, or `RequestSchemaValidationError` (a 400 naming the field)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestSchemaValidationError(exc) from None


def form_data(fields: Mapping[str, list[str]]) -> dict[str, Any]:
    """Form fields as quart-schema passes them: a repeated or `name[]` field as a list."""
    data: dict[str, Any] = {}
    for key, values in fields.items():
        if key.endswith("[]"):
            name = key.removesuffix("[]")
            earlier = data.get(name, [])
            data[name] = (earlier if isinstance(earlier, list) else [earlier]) + values
        elif key in data:  # `name[]` came first
            data[key] = [*data[key], *values]
        else:
            data[key] = values if len(values) > 1 else values[0]
    return data


def read_form(upload: Upload, model: type[M]) -> M:
    """The upload's form fields as `model`; a refused form deletes the uploaded file."""
    try:
        return load(model, form_data(upload.fields))
    except RequestSchemaValidationError:
        upload.discard()
        raise


def validate_json(
    model: type[M], *, max_bytes: int = MAX_JSON_BYTES
) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
    """quart-schema's `@validate_request(model)` with the bounded JSON reader in front."""

    def decorator(func: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        setattr(func, QUART_SCHEMA_REQUEST_ATTRIBUTE, (model, DataSource.JSON))

        @wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> R:
            body = await read_json_body(request, max_bytes=max_bytes)
            return await func(*args, data=load(model, body), **kwargs)

        return wrapper

    return decorator
