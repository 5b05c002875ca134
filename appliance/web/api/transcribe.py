"""Seed-compatible `POST /transcribe` and the job API (`/api/jobs`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from pydantic import BaseModel, Field
from quart import Blueprint, Response, jsonify
from quart_schema import (
    DataSource,
    document_request,
    document_response,
    tag,
    validate_querystring,
)

from appliance.core import formats
from appliance.core.engines.base import TranscribeOptions
from appliance.core.jobs import Job
from appliance.web import webhooks
from appliance.web.api.options import (
    DecodingFields,
    FormModel,
    Language,
    OutputFormat,
    Task,
)
from appliance.web.api.submit import event_stream, raise_for_job, receive, resolve_model, submit
from appliance.web.errors import APIError
from appliance.web.services import services

blueprint = Blueprint("transcribe", __name__)


class TranscribeForm(DecodingFields):
    """multipart/form-data fields of a transcription request (`/transcribe`, `/api/jobs`)."""

    file: bytes | None = Field(
        None, description="The audio or video file (any format FFmpeg decodes); or `url`"
    )
    url: str | None = Field(
        None, description="Instead of `file`: an http(s) URL the appliance downloads the file from"
    )
    callback_url: str | None = Field(
        None, description="POST the signed result there when the job finishes (webhook)"
    )
    model: str | None = Field(None, description="Model name, default: the appliance default")
    language: Language = Field(None, description="ISO 639-1 code or 'auto'")
    task: Task = Field("transcribe", description="transcribe or translate (to English)")
    format: OutputFormat = Field("json", description="json, txt, srt, vtt or tsv")

    def options(self) -> TranscribeOptions:
        return self.decoding(self.language, self.task)


class ResultQuery(FormModel):
    format: OutputFormat = Field("json", description="json, txt, srt, vtt or tsv")


class JobView(BaseModel):
    id: str
    state: str = Field(description="queued, running, done, failed or cancelled")
    percent: float
    position: int | None = Field(None, description="Place in the queue while queued")
    eta_seconds: float | None
    model: str
    filename: str
    duration: float
    history_id: str | None
    error: dict[str, str] | None
    text: str | None
    callback_state: str | None = Field(
        None, description="Webhook: null, pending, delivered or failed"
    )
    callbacks: list[dict[str, object]] = Field(
        default_factory=list, description="Webhook attempts: attempt, time, status, error"
    )


class TranscriptView(BaseModel):
    id: str | None = Field(None, description="History entry id")
    text: str
    language: str
    duration: float
    model: str
    segments: list[dict[str, object]]
    words: list[dict[str, object]] | None = None
    timings: dict[str, float]


async def _form_job(source: str) -> tuple[Job, str]:
    upload, form = await receive(TranscribeForm)
    try:
        model = resolve_model(form.model)
        callback = await webhooks.callback_for(form.callback_url, services())
    except APIError:
        upload.discard()
        raise
    job = await submit(
        upload, model=model, options=form.options(), source=source, callback_url=callback
    )
    return job, form.format


def transcript_response(job: Job, fmt: str) -> Response:
    raise_for_job(job)
    if job.result is None:  # a job from before a restart whose history entry was deleted
        raise APIError(
            404, "result_not_found", "the transcript of this job was deleted from the history"
        )
    if fmt != "json":
        body = formats.render(job.result, fmt)
        return Response(body, content_type=formats.EXPORT_FORMATS[fmt])
    return jsonify(formats.job_result(job))


@blueprint.post("/transcribe")
@tag(["transcription"])
@document_request(TranscribeForm, source=DataSource.FORM_MULTIPART)  # api.validation
@document_response(TranscriptView, 200)
async def transcribe() -> Response:
    """Transcribe one file and wait for the result (seed-compatible).

    The job keeps running if the client disconnects; its result lands in the history.
    """
    job, fmt = await _form_job("upload")
    await services().jobs.wait(job)
    return transcript_response(job, fmt)


@blueprint.post("/api/jobs")
@tag(["jobs"])
@document_request(TranscribeForm, source=DataSource.FORM_MULTIPART)  # api.validation
@document_response(JobView, 202)
async def create_job() -> Response:
    """Queue a file and return at once; follow it with GET /api/jobs/{id}/events."""
    job, _fmt = await _form_job("upload")
    response = jsonify(services().jobs.snapshot(job))
    response.status_code = 202
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return response


async def _job(job_id: str) -> Job:
    job = await services().jobs.get(job_id)
    if job is None:
        hours = services().settings.job_retention_hours
        raise APIError(
            404,
            "job_not_found",
            f"no job {job_id!r} (finished jobs are kept {hours} h, JOB_RETENTION_HOURS)",
        )
    return job


@blueprint.get("/api/jobs/<job_id>")
@tag(["jobs"])
@document_response(JobView)
async def get_job(job_id: str) -> Response:
    """State, percent, queue position and ETA of a job."""
    return jsonify(services().jobs.snapshot(await _job(job_id)))


@blueprint.get("/api/jobs/<job_id>/result")
@tag(["jobs"])
@validate_querystring(ResultQuery)
@document_response(TranscriptView)
async def job_result(job_id: str, query_args: ResultQuery) -> Response:
    """The transcript of a finished job (`?format=json|txt|srt|vtt|tsv`)."""
    job = await _job(job_id)
    if not job.state.finished:
        raise APIError(409, "not_finished", f"the job is {job.state.value}")
    return transcript_response(job, query_args.format)


@blueprint.delete("/api/jobs/<job_id>")
@tag(["jobs"])
@document_response(JobView)
async def cancel_job(job_id: str) -> Response:
    """Cancel a queued or running job (a running one stops at the next segment)."""
    job = await services().jobs.cancel(job_id)
    if job is None:
        raise APIError(404, "job_not_found", f"no job {job_id!r}")
    return jsonify(services().jobs.snapshot(job))


@blueprint.get("/api/jobs/<job_id>/events")
@tag(["jobs"])
async def job_events(job_id: str) -> Response:
    """Server-sent events: one `progress` event per change, then `done`."""
    job = await _job(job_id)
    queue = services().jobs

    async def stream() -> AsyncIterator[bytes]:
        async for snapshot in queue.events(job):
            name = "done" if job.state.finished else "progress"
            yield f"event: {name}\ndata: {json.dumps(snapshot)}\n\n".encode()

    return await event_stream(stream())
