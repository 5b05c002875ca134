"""OpenAI-compatible audio API: the official `openai` client works with `base_url` set here.

Same fields and response shapes as OpenAI's `/v1/audio/*`; the model `whisper-1` means the
appliance's default model, any other name one of ours. `stream=true` on transcriptions answers
server-sent `transcript.text.delta` events as segments are decoded, then `transcript.text.done`
(OpenAI's event shapes). Extra form fields of faster-whisper servers are accepted: `hotwords`,
`vad_filter`, `word_timestamps`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, Field, model_validator
from pydantic_core import PydanticCustomError
from quart import Blueprint, Response, jsonify
from quart_schema import DataSource, document_request, document_response, tag

from appliance.core import formats
from appliance.core.engines.base import TranscribeOptions
from appliance.core.jobs import Job
from appliance.web.api.options import (
    DecodingFields,
    FormBool,
    Language,
    Temperature,
    Text,
    one_of,
)
from appliance.web.api.submit import event_stream, raise_for_job, receive, resolve_model, submit
from appliance.web.errors import APIError
from appliance.web.services import services

blueprint = Blueprint("openai", __name__, url_prefix="/v1")

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")


def _response_format(value: object) -> object:
    if value is None:
        return "json"
    if not isinstance(value, str):
        return value
    return one_of(value, value.strip() or "json", RESPONSE_FORMATS, "invalid_response_format")


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


ResponseFormat = Annotated[
    Literal["json", "text", "srt", "verbose_json", "vtt", "diarized_json"],
    BeforeValidator(_response_format),
]


class OpenAITranslationForm(DecodingFields):
    """OpenAI's `/v1/audio/translations` form, plus faster-whisper servers' extra fields."""

    file: bytes | None = Field(None, description="Audio file")
    model: str = Field(description="whisper-1 (= default model) or an appliance model name")
    prompt: Text = None
    response_format: ResponseFormat = Field(
        "json", description="json, text, srt, verbose_json, vtt or diarized_json (speakers)"
    )
    temperature: Temperature = Field(None, description="0 to 1; default: Whisper's fallback")
    timestamp_granularities: Annotated[
        list[Literal["word", "segment"]], BeforeValidator(_as_list)
    ] = Field(
        default_factory=list,
        description="`timestamp_granularities[]`: word and/or segment (verbose_json)",
    )
    hotwords: Text = Field(None, description="Extra: words to favour (faster-whisper)")
    vad_filter: FormBool = Field(False, description="Extra: skip silence with Silero VAD")
    batched: FormBool = Field(
        True, description="Extra: long files in VAD-chunked batches (default; false: sequential)"
    )
    word_timestamps: FormBool = Field(
        False, description="Extra: word timestamps (verbose_json then lists words)"
    )
    diarize: FormBool = Field(
        False, description="Extra: label speakers (implied by response_format=diarized_json)"
    )

    @model_validator(mode="after")
    def _formats(self) -> Self:
        if "word" in self.timestamp_granularities and self.response_format != "verbose_json":
            raise PydanticCustomError(
                "invalid_request",
                "timestamp_granularities: word needs response_format=verbose_json",
            )
        if self.response_format == "diarized_json":
            self.diarize = True
        return self

    @property
    def words(self) -> bool:
        return self.word_timestamps or "word" in self.timestamp_granularities

    def options(self, task: str, language: str | None = None) -> TranscribeOptions:
        return self.decoding(language, task, words=self.words, temperature=self.temperature)


class OpenAITranscriptionForm(OpenAITranslationForm):
    """OpenAI's `/v1/audio/transcriptions` form: a translation's fields, a language, streaming."""

    language: Language = Field(None, description="ISO 639-1 input language")
    stream: FormBool = Field(
        False,
        description="Server-sent transcript.text.delta events, then transcript.text.done "
        "(response_format json, text or diarized_json)",
    )

    @model_validator(mode="after")
    def _stream(self) -> Self:
        if self.stream and self.response_format not in ("json", "text", "diarized_json"):
            raise PydanticCustomError(
                "invalid_request",
                "stream: true needs response_format json, text or diarized_json, "
                f"not {self.response_format!r}",
            )
        return self


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
    form: OpenAITranslationForm
    if task == "transcribe":
        upload, spoken = await receive(OpenAITranscriptionForm)
        form, language, stream = spoken, spoken.language, spoken.stream
    else:
        upload, form = await receive(OpenAITranslationForm)
        language, stream = None, False
    fmt, words = form.response_format, form.words
    try:
        requested = form.model.strip()
        model = resolve_model(None if requested in ("whisper-1", "") else requested)
    except APIError:
        upload.discard()
        raise
    options = form.options(task, language)
    job = await submit(upload, model=model, options=options, source="api")
    if stream:
        return await _stream(job)
    await services().jobs.wait(job)
    raise_for_job(job)
    assert job.result is not None
    if fmt == "json":
        return jsonify({"text": job.result.text})
    if fmt == "text":
        return Response(job.result.text, content_type="text/plain; charset=utf-8")
    if fmt in ("srt", "vtt"):
        return Response(formats.render(job.result, fmt), content_type=formats.EXPORT_FORMATS[fmt])
    if fmt == "diarized_json":
        return jsonify(diarized(job))
    return jsonify(formats.verbose(job.result, task=task, words=words))


def _diarized_segments(job: Job) -> list[dict[str, Any]]:
    assert job.result is not None
    return [
        {
            "type": "transcript.text.segment",
            "id": f"seg_{s.id:03d}",
            "start": round(s.start, 3),
            "end": round(s.end, 3),
            "text": s.text.strip(),
            "speaker": s.speaker or "Speaker 1",
        }
        for s in job.result.segments
    ]


def diarized(job: Job) -> dict[str, Any]:
    """OpenAI's `diarized_json`: the text and its segments, each with its speaker."""
    assert job.result is not None
    return {
        "task": job.options.task,
        "duration": round(job.result.duration, 3),
        "text": job.result.text,
        "segments": _diarized_segments(job),
    }


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


async def _changed(event: asyncio.Event) -> None:
    """Wait for the job's next change (a segment, the end); wake up now and then regardless."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=15)


async def _stream(job: Job) -> Response:
    """`transcript.text.delta` per decoded segment, then `transcript.text.done`.

    The response starts with the first segment (or the end of the job): a job that fails
    before any text (audio FFmpeg cannot decode after all, a model that does not fit) still
    answers its 4xx/5xx JSON error. The deltas concatenate to the done event's text; a job
    that fails later ends the stream with an `error` event (the openai client raises it).
    """
    while not (job.segments or job.done.is_set()):
        await _changed(job.changed)
    if job.done.is_set():
        raise_for_job(job)

    async def events() -> AsyncIterator[bytes]:
        seen, started, held = 0, False, ""
        while True:
            changed, finished = job.changed, job.done.is_set()
            segments = job.segments[seen:]
            seen += len(segments)
            new = "".join(s.text for s in segments)
            if not started:  # the text never starts with a space ...
                new = new.lstrip()
                started = bool(new)
            held += new
            delta = held.rstrip()  # ... nor ends with one: spaces wait for what follows
            if delta:
                held = held[len(delta) :]
                yield _sse({"type": "transcript.text.delta", "delta": delta})
            if finished:
                break
            await _changed(changed)
        if job.state.value == "done" and job.result is not None:
            if job.options.diarize:  # speakers are known once the whole recording is heard
                for segment in _diarized_segments(job):
                    yield _sse(segment)
            yield _sse({"type": "transcript.text.done", "text": job.result.text})
            return
        try:
            raise_for_job(job)
            code, message = "result_not_found", "the transcript was deleted from the history"
        except APIError as exc:
            code, message = exc.code, exc.message
        yield _sse({"type": "error", "error": {"code": code, "message": message}})

    return await event_stream(events())


@blueprint.post("/audio/transcriptions")
@tag(["openai"])
@document_request(OpenAITranscriptionForm, source=DataSource.FORM_MULTIPART)
@document_response(OpenAITranscription)
async def transcriptions() -> Response:
    """OpenAI-compatible transcription."""
    return await _handle("transcribe")


@blueprint.post("/audio/translations")
@tag(["openai"])
@document_request(OpenAITranslationForm, source=DataSource.FORM_MULTIPART)
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
