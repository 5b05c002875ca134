"""OpenAI-compatible audio API: the official `openai` client works with `base_url` set here.

Same fields and response shapes as OpenAI's `/v1/audio/*`; the model `whisper-1` means the
appliance's default model, any other name one of ours.
"""

from __future__ import annotations

from pydantic import BaseModel, Field
from quart import Blueprint, Response, jsonify
from quart_schema import DataSource, document_request, document_response, tag

from appliance import formats
from appliance.api.options import build_options, parse_float
from appliance.api.submit import raise_for_job, receive, resolve_model, submit
from appliance.errors import APIError
from appliance.services import services

blueprint = Blueprint("openai", __name__, url_prefix="/v1")

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("word", "segment")


class OpenAITranscriptionForm(BaseModel):
    file: bytes = Field(description="Audio file")
    model: str = Field(description="whisper-1 (= default model) or an appliance model name")
    language: str | None = Field(None, description="ISO 639-1 input language")
    prompt: str | None = None
    response_format: str | None = Field("json", description="json, text, srt, verbose_json, vtt")
    temperature: float | None = Field(None, ge=0, le=1)
    timestamp_granularities: list[str] | None = Field(
        None, alias="timestamp_granularities[]", description="word and/or segment (verbose_json)"
    )


class OpenAITranscription(BaseModel):
    text: str


class ModelObject(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelObject]


async def _handle(task: str) -> Response:
    upload = await receive()
    try:
        fmt = (upload.get("response_format") or "json").strip()
        if fmt not in RESPONSE_FORMATS:
            raise APIError(
                400,
                "invalid_response_format",
                f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not {fmt!r}",
            )
        granularities = upload.get_all("timestamp_granularities[]") + upload.get_all(
            "timestamp_granularities"
        )
        for g in granularities:
            if g not in GRANULARITIES:
                raise APIError(400, "invalid_request", f"timestamp_granularities: unknown {g!r}")
        words = "word" in granularities
        if words and fmt != "verbose_json":
            raise APIError(
                400, "invalid_request", "timestamp_granularities needs response_format=verbose_json"
            )
        if upload.get("model") is None:
            raise APIError(400, "invalid_request", "the 'model' field is required (e.g. whisper-1)")
        requested = (upload.get("model") or "").strip()
        model = resolve_model(None if requested in ("whisper-1", "") else requested)
        options = build_options(
            language=upload.get("language") if task == "transcribe" else None,
            task=task,
            word_timestamps=words,
            prompt=upload.get("prompt"),
            temperature=parse_float("temperature", upload.get("temperature"), 0.0, 1.0),
        )
    except APIError:
        upload.discard()
        raise
    job = await submit(upload, model=model, options=options, source="api")
    await services().jobs.wait(job)
    raise_for_job(job)
    assert job.result is not None
    if fmt == "json":
        return jsonify({"text": job.result.text})
    if fmt == "text":
        return Response(job.result.text, content_type="text/plain; charset=utf-8")
    if fmt in ("srt", "vtt"):
        return Response(formats.render(job.result, fmt), content_type=formats.EXPORT_FORMATS[fmt])
    return jsonify(formats.verbose(job.result, task=task, words=words))


@blueprint.post("/audio/transcriptions")
@tag(["openai"])
@document_request(OpenAITranscriptionForm, source=DataSource.FORM_MULTIPART)
@document_response(OpenAITranscription)
async def transcriptions() -> Response:
    """OpenAI-compatible transcription."""
    return await _handle("transcribe")


@blueprint.post("/audio/translations")
@tag(["openai"])
@document_request(OpenAITranscriptionForm, source=DataSource.FORM_MULTIPART)
@document_response(OpenAITranscription)
async def translations() -> Response:
    """OpenAI-compatible translation to English."""
    return await _handle("translate")


@blueprint.get("/models")
@tag(["openai"])
@document_response(ModelList)
async def list_models() -> Response:
    """Models available on this appliance (plus the alias whisper-1)."""
    s = services()
    created = int(s.started)
    names = ["whisper-1"] + [m["name"] for m in s.models.status() if m["state"] != "not_downloaded"]
    return jsonify(
        {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": created, "owned_by": "whisper-appliance"}
                for n in names
            ],
        }
    )
