"""History API: list with full-text search, open, export, delete."""

from __future__ import annotations

from pydantic import BaseModel, Field
from quart import Blueprint, Response, jsonify, request
from quart_schema import document_querystring, document_response, tag

from appliance import formats
from appliance.errors import APIError
from appliance.history import SearchError
from appliance.services import services

blueprint = Blueprint("history", __name__, url_prefix="/api/history")


class HistoryQuery(BaseModel):
    q: str | None = Field(None, description="Full-text search over text and file name")
    limit: int | None = Field(20, ge=1, le=200)
    offset: int | None = Field(0, ge=0)


class HistoryPage(BaseModel):
    items: list[dict[str, object]]
    total: int
    limit: int
    offset: int


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise APIError(400, "invalid_request", f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise APIError(400, "invalid_request", f"{name} must be between {low} and {high}")
    return value


@blueprint.get("")
@tag(["history"])
@document_querystring(HistoryQuery)
@document_response(HistoryPage)
async def list_history() -> Response:
    """Newest first, paged; `q` searches text and file names."""
    limit = _int_arg("limit", 20, 1, 200)
    offset = _int_arg("offset", 0, 0, 10_000_000)
    q = request.args.get("q", "")[:200]
    try:
        items, total = await services().history.list(q, limit, offset)
    except SearchError as exc:
        raise APIError(400, "invalid_query", str(exc)) from None
    return jsonify({"items": items, "total": total, "limit": limit, "offset": offset})


@blueprint.get("/<entry_id>")
@tag(["history"])
async def get_entry(entry_id: str) -> Response:
    """One entry with its segments and timings."""
    entry = await services().history.get(entry_id)
    if entry is None:
        raise APIError(404, "not_found", f"no history entry {entry_id!r}")
    return jsonify(entry)


@blueprint.delete("/<entry_id>")
@tag(["history"])
async def delete_entry(entry_id: str) -> Response:
    """Delete one entry."""
    if not await services().history.delete(entry_id):
        raise APIError(404, "not_found", f"no history entry {entry_id!r}")
    return jsonify({"deleted": entry_id})


@blueprint.get("/<entry_id>/export")
@tag(["history"])
async def export_entry(entry_id: str) -> Response:
    """Download as txt, srt, vtt, json or tsv (`?format=`)."""
    fmt = request.args.get("format", "txt")
    if fmt not in formats.EXPORT_FORMATS:
        raise APIError(
            400, "invalid_format", f"format must be one of {', '.join(formats.EXPORT_FORMATS)}"
        )
    transcript = await services().history.transcript(entry_id)
    if transcript is None:
        raise APIError(404, "not_found", f"no history entry {entry_id!r}")
    response = Response(formats.render(transcript, fmt), content_type=formats.EXPORT_FORMATS[fmt])
    response.headers["Content-Disposition"] = f'attachment; filename="transcript-{entry_id}.{fmt}"'
    return response
