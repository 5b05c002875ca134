"""From an upload to a queued job: probe the content, check the model, submit; wait for it or
stream its events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

from pydantic import BaseModel
from quart import Response, make_response, request

from appliance.core import audio, diarize
from appliance.core.engines.base import TranscribeOptions, Transcript
from appliance.core.jobs import Job, JobStoreError, QueueFullError
from appliance.core.model_manager import ModelError
from appliance.web import outbound
from appliance.web.api.validation import read_form
from appliance.web.errors import APIError
from appliance.web.services import services
from appliance.web.upload import Upload, receive_upload

M = TypeVar("M", bound=BaseModel)


async def receive(model: type[M]) -> tuple[Upload, M]:
    """The upload (its `file` part or its `url` fetched) and its form fields as `model`."""
    s = services()
    # runtime settings (admin panel) override the env defaults: appliance.web.settings_store
    limit = s.max_upload_size
    upload = await receive_upload(request, s.settings.tmp_dir, limit, file_optional=True)
    language = s.default_language
    if language and not (upload.get("language") or "").strip():
        upload.fields["language"] = [language]
    form = read_form(upload, model)  # before fetching a `url`: a bad field costs no download
    await _fetch_url(upload, limit)
    return upload, form


async def _fetch_url(upload: Upload, limit: int) -> None:
    """Issue 15: a `url` field instead of the file part: download it like an upload."""
    url = (upload.get("url") or "").strip()
    if upload.file_path is not None:
        if url:
            upload.discard()
            raise APIError(400, "invalid_request", "send either a 'file' part or a 'url', not both")
        return
    if not url:
        raise APIError(400, "missing_file", "the form has no 'file' file part (nor a 'url' field)")
    s = services()
    policy = outbound.Policy.from_settings(s.settings)
    try:
        got = await outbound.download(url, s.settings.tmp_dir, limit, policy)
    except outbound.OutboundError as exc:
        raise APIError(exc.status, exc.code, exc.message) from None
    upload.file_path, upload.file_name, upload.file_size = got.path, got.filename, got.size


def resolve_model(name: str | None) -> str:
    s = services()
    chosen = (name or "").strip() or s.default_model
    try:
        s.models.check_name(chosen)
    except ModelError as exc:
        raise APIError(exc.status, exc.code, exc.message) from None
    if s.models.locate(chosen) is None:
        raise APIError(
            409,
            "model_not_available",
            f"model {chosen!r} is not on this appliance yet: "
            "download or import it in the admin panel",
        )
    return chosen


async def submit(
    upload: Upload,
    *,
    model: str,
    options: TranscribeOptions,
    source: str,
    callback_url: str | None = None,
) -> Job:
    """Probe the file (415 if not audio, 413 if too long) and queue it (429 if the queue is full).

    The upload's temp file belongs to the job from here on; on any refusal it is deleted.
    """
    assert upload.file_path is not None
    if options.diarize and diarize.find_weights(services().settings.data_dir) is None:
        upload.discard()
        raise APIError(
            503,
            "diarization_unavailable",
            "speaker diarization needs the speaker model: run"
            " `python -m appliance.core.diarize fetch DATA_DIR` once"
            " (see /help/use/diarization.html)",
        )
    try:
        info = await asyncio.to_thread(
            audio.probe, upload.file_path, services().settings.max_audio_duration
        )
    except audio.AudioTooLongError as exc:
        upload.discard()
        raise APIError(exc.status, exc.code, f"{upload.file_name or 'the file'}: {exc}") from None
    except audio.NotAudioError as exc:
        raise not_audio(upload, exc) from None
    job = Job(
        model=model,
        options=options,
        audio_path=upload.file_path,
        duration=info.duration,
        source=source,
        filename=upload.file_name,
        callback_url=callback_url,
    )
    try:
        return await services().jobs.submit(job)
    except QueueFullError as exc:
        raise APIError(
            429, "queue_full", str(exc), headers={"Retry-After": str(exc.retry_after)}
        ) from None
    except JobStoreError as exc:  # the database or the disk refused it: not accepted
        raise APIError(503, "job_not_stored", str(exc), headers={"Retry-After": "10"}) from None


def not_audio(upload: Upload, exc: audio.AudioRejectedError) -> APIError:
    """The 415 for a file FFmpeg cannot decode; the upload's temp file is deleted."""
    upload.discard()
    return APIError(
        415,
        "unsupported_audio",
        f"{upload.file_name or 'the file'} is not audio FFmpeg can decode: {exc}",
    )


async def run(upload: Upload, *, model: str, options: TranscribeOptions, source: str) -> Transcript:
    """Queue the upload (as `submit`), wait for it and return its transcript: the API error of
    a failed job, 404 if the transcript was deleted from the history meanwhile."""
    job = await submit(upload, model=model, options=options, source=source)
    await services().jobs.wait(job)
    raise_for_job(job)
    if job.result is None:
        raise APIError(404, "result_not_found", "the transcript was deleted from the history")
    return job.result


async def event_stream(events: AsyncIterator[bytes]) -> Response:
    """A server-sent events response: no timeout, no caching, no buffering by a proxy."""
    response = await make_response(
        events,
        200,
        {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    response.timeout = None  # type: ignore[union-attr]
    return response  # type: ignore[return-value]


def raise_for_job(job: Job) -> None:
    """Turn a failed or cancelled job into the API error the client should see."""
    if job.state.value == "cancelled":
        raise APIError(409, "cancelled", "the transcription was cancelled")
    if job.error:
        code = job.error["code"]
        status = {
            "insufficient_memory": 507,
            "model_not_available": 409,
            "audio_too_long": 413,
            "shutdown": 503,
        }.get(code, 422)
        if code in ("unsupported_audio",):
            status = 415
        raise APIError(status, code, job.error["message"])
