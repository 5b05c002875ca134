"""History API: list with full-text search, open, export, delete, and the transcript editor's
revisions (PATCH an entry, list / read / restore revisions, conflict detection)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, StrictInt
from quart import Blueprint, Response, jsonify, request
from quart_schema import document_request, document_response, tag, validate_querystring

from appliance.core import formats
from appliance.core.history import (
    MAX_SEGMENT_TEXT,
    MAX_SEGMENTS,
    MAX_SPEAKER_LABEL,
    EditError,
    RevisionConflict,
    SearchError,
    validate_segments,
    validate_speakers,
)
from appliance.web.api.options import FormModel, OutputFormat, blank_is_default
from appliance.web.api.validation import load, validate_json
from appliance.web.errors import APIError
from appliance.web.jsonbody import read_json_body
from appliance.web.services import services

blueprint = Blueprint("history", __name__, url_prefix="/api/history")


class HistoryQuery(FormModel):
    q: Annotated[str, Field(description="Full-text search over text and file name")] = ""
    limit: Annotated[int, Field(ge=1, le=200), BeforeValidator(blank_is_default)] = 20
    offset: Annotated[int, Field(ge=0, le=10_000_000), BeforeValidator(blank_is_default)] = 0


class ExportQuery(FormModel):
    format: OutputFormat = Field("txt", description="txt, srt, vtt, json or tsv")


class HistoryPage(BaseModel):
    items: list[dict[str, object]]
    total: int
    limit: int
    offset: int


@blueprint.get("")
@tag(["history"])
@validate_querystring(HistoryQuery)
@document_response(HistoryPage)
async def list_history(query_args: HistoryQuery) -> Response:
    """Newest first, paged; `q` searches text and file names."""
    limit, offset = query_args.limit, query_args.offset
    q = query_args.q[:200]
    try:
        items, total = await services().history.list(q, limit, offset)
    except SearchError as exc:
        raise APIError(400, "invalid_query", str(exc)) from None
    return jsonify({"items": items, "total": total, "limit": limit, "offset": offset})


# An edit carries the whole transcript: up to 10,000 segments of up to 2,000 characters.
MAX_EDIT_BYTES = 4 * 1024 * 1024


class EditSegment(BaseModel):
    """The shape of one edited segment, for the schema: `validate_segments` checks them."""

    start: float = Field(ge=0, description="Seconds; start <= end <= the audio's duration")
    end: float = Field(ge=0)
    text: str = Field(max_length=MAX_SEGMENT_TEXT)
    speaker: str | None = Field(None, max_length=MAX_SPEAKER_LABEL, description="Speaker label")
    id: int | None = Field(
        None, description="The segment it comes from (its word timings are kept if unchanged)"
    )


Revision = Annotated[StrictInt, Field(ge=0, lt=1_000_000_000)]


class RestoreBody(BaseModel):
    base_revision: Revision | None = Field(
        None, description='The revision the client has (or send `If-Match: "r<n>"`)'
    )


class EditBody(RestoreBody):
    # checked against the stored entry (its duration, its segments) by the core:
    # `appliance.core.history.validate_segments` / `validate_speakers`, with their 400 / 413
    segments: Any = Field(
        description="The whole transcript, in order",
        json_schema_extra={
            "type": "array",
            "maxItems": MAX_SEGMENTS,
            "items": EditSegment.model_json_schema(),
        },
    )
    speakers: Any = Field(
        None,
        description="Speaker label -> display name (default: unchanged)",
        json_schema_extra={"type": "object", "additionalProperties": {"type": "string"}},
    )


def _not_found(entry_id: str) -> APIError:
    return APIError(404, "not_found", f"no history entry {entry_id!r}")


def _etag(revision: int) -> str:
    return f'"r{revision}"'


def _conflict(current: int) -> Response:
    response = jsonify(
        {
            "error": {
                "code": "revision_conflict",
                "message": (
                    f"this entry was changed elsewhere: it is now at revision {current}; "
                    "reload it and apply your edit again"
                ),
                "current_revision": current,
            }
        }
    )
    response.status_code = 409
    response.headers["ETag"] = _etag(current)
    return response


def _base_revision(body: RestoreBody) -> int | None:
    """`base_revision` from the body, or from an `If-Match: "r<n>"` header."""
    if body.base_revision is None:
        match = re.fullmatch(r'\s*(?:W/)?"r(\d{1,9})"\s*', request.headers.get("If-Match", ""))
        return int(match.group(1)) if match else None
    return body.base_revision


async def _entry_json(entry_id: str) -> Response:
    entry = await services().history.get(entry_id)
    if entry is None:
        raise _not_found(entry_id)
    response = jsonify(entry)
    response.headers["ETag"] = _etag(int(entry["revision"]))
    return response


@blueprint.get("/<entry_id>")
@tag(["history"])
async def get_entry(entry_id: str) -> Response:
    """One entry with its segments (latest revision), timings, `revision` and `speakers`
    (label -> name); `ETag: "r<revision>"`."""
    return await _entry_json(entry_id)


@blueprint.patch("/<entry_id>")
@tag(["history"])
@validate_json(EditBody, max_bytes=MAX_EDIT_BYTES)
async def edit_entry(entry_id: str, data: EditBody) -> Response:
    """Save an edit as a new revision: the whole list of segments plus speaker names.

    `base_revision` (or `If-Match`) is the revision the edit was made on: when another edit
    was saved since, `409 revision_conflict` with `current_revision`, and nothing is changed.
    """
    history = services().history
    base = _base_revision(data)
    if base is None:
        raise APIError(
            428,
            "base_revision_required",
            "send base_revision (the revision you edited) or an If-Match ETag",
        )
    entry = await history.get(entry_id)
    if entry is None:
        raise _not_found(entry_id)
    if base != entry["revision"]:
        return _conflict(int(entry["revision"]))
    try:
        segments = validate_segments(data.segments, entry["segments"], entry["duration"])
        speakers = validate_speakers(
            data.speakers if "speakers" in data.model_fields_set else entry["speakers"]
        )
    except EditError as exc:
        raise APIError(exc.status, exc.code, exc.message) from None
    try:
        saved = await history.save_revision(entry_id, base, segments, speakers)
    except RevisionConflict as exc:
        return _conflict(exc.current)
    if saved is None:
        raise _not_found(entry_id)
    return await _entry_json(entry_id)


@blueprint.get("/<entry_id>/revisions")
@tag(["history"])
async def list_revisions(entry_id: str) -> Response:
    """Every revision of an entry, oldest first: 0 is the original transcript."""
    revisions = await services().history.revisions(entry_id)
    if revisions is None:
        raise _not_found(entry_id)
    return jsonify({"revisions": revisions})


def _revision_number(n: str) -> int:
    # a plain <n>, not <int:n>: quart-schema's OpenAPI path of `<a>/x/<int:b>` is wrong
    if not n.isascii() or not n.isdigit() or len(n) > 9:
        raise APIError(404, "not_found", f"no revision {n[:20]!r}: revisions are numbers")
    return int(n)


@blueprint.get("/<entry_id>/revisions/<n>")
@tag(["history"])
async def get_revision(entry_id: str, n: str) -> Response:
    """One revision with its text, segments and speaker names."""
    revision = await services().history.revision(entry_id, _revision_number(n))
    if revision is None:
        raise APIError(404, "not_found", f"no revision {n} of history entry {entry_id!r}")
    return jsonify(revision)


@blueprint.post("/<entry_id>/revisions/<n>/restore")
@tag(["history"])
@document_request(RestoreBody)
async def restore_revision(entry_id: str, n: str) -> Response:
    """Make revision `n` the latest again, saved as a new revision (nothing is lost).

    Optional JSON body `{"base_revision": m}` (or `If-Match`): 409 if the entry has moved on.
    """
    body: dict[str, object] = {}
    if request.content_length != 0 and (
        request.mimetype or request.content_length or "Transfer-Encoding" in request.headers
    ):
        body = await read_json_body(request)
    base = _base_revision(load(RestoreBody, body))
    number = _revision_number(n)
    try:
        restored = await services().history.restore(entry_id, number, base)
    except RevisionConflict as exc:
        return _conflict(exc.current)
    if restored is None:
        raise APIError(404, "not_found", f"no revision {n} of history entry {entry_id!r}")
    return await _entry_json(entry_id)


@blueprint.delete("/<entry_id>")
@tag(["history"])
async def delete_entry(entry_id: str) -> Response:
    """Delete one entry."""
    if not await services().history.delete(entry_id):
        raise APIError(404, "not_found", f"no history entry {entry_id!r}")
    return jsonify({"deleted": entry_id})


@blueprint.get("/<entry_id>/export")
@tag(["history"])
@validate_querystring(ExportQuery)
async def export_entry(entry_id: str, query_args: ExportQuery) -> Response:
    """Download the latest revision as txt, srt, vtt, json or tsv (`?format=`)."""
    fmt = query_args.format
    history = services().history
    transcript = await history.transcript(entry_id)
    if transcript is None:
        raise _not_found(entry_id)
    names = await history.speaker_names(entry_id)
    response = Response(
        formats.render(transcript, fmt, names), content_type=formats.EXPORT_FORMATS[fmt]
    )
    response.headers["Content-Disposition"] = f'attachment; filename="transcript-{entry_id}.{fmt}"'
    return response
