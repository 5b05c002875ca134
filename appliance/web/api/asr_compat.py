"""The whisper-asr-webservice API (`POST /asr`, `POST /detect-language`), for Bazarr and friends.

Same paths, query parameters, multipart field (`audio_file`), status codes, content types and
bodies as ahmetoner/whisper-asr-webservice with its faster-whisper engine: `/asr` answers
`text/plain` whatever the `output` (txt, vtt, srt, tsv, or its JSON), with `Asr-Engine` and
`Content-Disposition` headers; `/detect-language` answers JSON with the language's name, code
and probability. Invalid query values are refused with 422 as FastAPI does there (the body is
our error JSON plus FastAPI's `detail` list).

`encode=false` means the body is raw 16 kHz mono s16le PCM (what Bazarr sends): it is given a
WAV header and then goes the same way as any upload. Every request is a job on the shared
queue (same engines, limits, API keys and rate limits) and lands in the history with source
`asr`.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import tempfile
import wave
from collections.abc import Generator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

from faster_whisper.utils import format_timestamp
from pydantic import BaseModel, Field
from quart import Blueprint, Response, jsonify, request
from quart_schema import (
    DataSource,
    document_querystring,
    document_request,
    document_response,
    tag,
)

from appliance.core import audio
from appliance.core.engines.base import SAMPLE_RATE, Transcript
from appliance.web.api.options import build_options, parse_language, parse_speakers
from appliance.web.api.submit import raise_for_job, resolve_model, submit
from appliance.web.errors import APIError
from appliance.web.services import services
from appliance.web.upload import TEMP_PREFIX, Upload, receive_upload, safe_filename

blueprint = Blueprint("asr_compat", __name__)

OUTPUTS = ("txt", "vtt", "srt", "tsv", "json")
DETECT_SECONDS = 30  # whisper-asr-webservice pads or trims to 30 s before detecting
_TRUE = {"1", "true", "t", "yes", "y", "on"}  # what FastAPI (pydantic) reads as a bool
_FALSE = {"0", "false", "f", "no", "n", "off"}
_COPY_BYTES = 1024 * 1024

# whisper.tokenizer.LANGUAGES: /detect-language answers the name, Bazarr reads it
LANGUAGE_NAMES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian",
    "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian",
    "sw": "swahili", "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala",
    "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans",
    "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi",
    "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen",
    "nn": "nynorsk", "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish",
    "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy", "as": "assamese",
    "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir",
    "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}  # fmt: skip


class AsrQuery(BaseModel):
    """Query parameters of `POST /asr` (whisper-asr-webservice)."""

    encode: bool | None = Field(
        True, description="true: decode the file with FFmpeg; false: raw 16 kHz mono s16le PCM"
    )
    task: str | None = Field("transcribe", description="transcribe or translate (to English)")
    language: str | None = Field(None, description="ISO 639-1 code; empty: detect")
    initial_prompt: str | None = None
    vad_filter: bool | None = Field(False, description="Skip silence with Silero VAD")
    word_timestamps: bool | None = Field(False, description="Word timestamps (json output)")
    output: str | None = Field("txt", description="txt, vtt, srt, tsv or json")
    diarize: bool | None = Field(False, description="Label speakers (who said what)")
    num_speakers: int | None = Field(
        None, ge=1, le=20, description="Exact number of speakers, if known"
    )
    min_speakers: int | None = Field(None, ge=1, le=20, description="At least this many speakers")
    max_speakers: int | None = Field(None, ge=1, le=20, description="At most this many speakers")
    video_file: str | None = Field(
        None, description="Path of the video (Bazarr's 'pass video name'): the history's name"
    )


class DetectQuery(BaseModel):
    encode: bool | None = Field(
        True, description="true: decode the file with FFmpeg; false: raw 16 kHz mono s16le PCM"
    )
    video_file: str | None = Field(None, description="Path of the video: the history's name")


class AsrForm(BaseModel):
    audio_file: bytes = Field(description="The audio (or raw PCM with encode=false)")


class DetectedLanguage(BaseModel):
    detected_language: str = Field(description="The language's English name, e.g. english")
    language_code: str = Field(description="ISO 639-1 code, e.g. en")
    confidence: float


class _Invalid(Exception):
    """A query value FastAPI would refuse: 422 with `detail` (and our error shape)."""

    def __init__(self, loc: list[str], message: str, kind: str = "value_error") -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message
        self.kind = kind

    def response(self) -> Response:
        response = jsonify(
            {
                "detail": [{"type": self.kind, "loc": self.loc, "msg": self.message}],
                "error": {"code": "invalid_request", "message": self.message},
            }
        )
        response.status_code = 422
        return response


def _bool(name: str, default: bool) -> bool:
    value = request.args.get(name)
    if value is None:
        return default
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _Invalid(["query", name], f"{name} must be true or false, not {value!r}", "bool_parsing")


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = request.args.get(name)
    if value is None:
        return default
    if value not in allowed:
        raise _Invalid(
            ["query", name], f"{name} must be one of {', '.join(allowed)}, not {value!r}", "enum"
        )
    return value


def _language() -> str | None:
    value = request.args.get("language")
    if value is None or value.strip() == "":
        return None
    try:
        return parse_language(value)
    except APIError as exc:
        raise _Invalid(["query", "language"], exc.message, "enum") from None


async def _receive() -> Upload:
    """The `audio_file` part, streamed to the temp dir under the appliance's upload limit."""
    s = services()
    limit = s.extras.get("max_upload_size") or s.settings.max_upload_size
    try:
        return await receive_upload(request, s.settings.tmp_dir, limit, file_field="audio_file")
    except APIError as exc:
        if exc.code in ("missing_file", "unsupported_media_type"):  # FastAPI: field required
            raise _Invalid(["body", "audio_file"], exc.message, "missing") from None
        raise


def _pcm_to_wav(source: Path, tmp_dir: Path, max_bytes: int | None = None) -> Path:
    """Raw s16le 16 kHz mono PCM (up to `max_bytes`) as a WAV file next to the uploads."""
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=tmp_dir)
    target = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, wave.open(out, "wb") as wav, source.open("rb") as src:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(SAMPLE_RATE)
            left = source.stat().st_size if max_bytes is None else max_bytes
            left -= left % 2  # a trailing odd byte is half a sample
            while left > 0 and (chunk := src.read(min(_COPY_BYTES, left))):
                chunk = chunk[: len(chunk) - len(chunk) % 2]
                wav.writeframesraw(chunk)
                left -= len(chunk)
                if len(chunk) < 2:
                    break
    except (OSError, struct.error, wave.Error):
        target.unlink(missing_ok=True)
        raise
    return target


def _first_seconds_wav(source: Path, tmp_dir: Path, seconds: float) -> Path:
    """The first `seconds` of any audio file, decoded to a 16 kHz mono WAV."""
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=tmp_dir)
    target = Path(name)
    limit = round(seconds * SAMPLE_RATE)
    written = 0
    try:
        with os.fdopen(fd, "wb") as out, wave.open(out, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(SAMPLE_RATE)
            blocks = cast(Generator[Any, None, None], audio._pcm16_blocks(source, None))
            try:
                for block in blocks:
                    piece = block[: limit - written]
                    wav.writeframesraw(piece.astype("<i2", copy=False).tobytes())
                    written += piece.shape[0]
                    if written >= limit:
                        break
            finally:
                blocks.close()
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


async def _prepare_audio(upload: Upload, *, encode: bool, seconds: float | None = None) -> None:
    """Give raw PCM a WAV header, or keep only the first `seconds`; the upload owns the result."""
    if encode and seconds is None:
        return
    assert upload.file_path is not None
    tmp_dir = services().settings.tmp_dir
    try:
        if encode:
            assert seconds is not None
            path = await asyncio.to_thread(_first_seconds_wav, upload.file_path, tmp_dir, seconds)
        else:
            max_bytes = None if seconds is None else round(seconds * SAMPLE_RATE) * 2
            path = await asyncio.to_thread(_pcm_to_wav, upload.file_path, tmp_dir, max_bytes)
    except audio.AudioRejectedError as exc:
        upload.discard()
        raise APIError(
            415,
            "unsupported_audio",
            f"{upload.file_name or 'the file'} is not audio FFmpeg can decode: {exc}",
        ) from None
    except (OSError, struct.error, wave.Error) as exc:
        upload.discard()
        raise APIError(413, "file_too_large", f"cannot convert the audio: {exc}") from None
    upload.discard()
    upload.file_path = path


def _name_from_video(upload: Upload) -> None:
    """Bazarr's `video_file` (the film's path, when "pass video name" is on) names the entry."""
    video = (request.args.get("video_file") or "").strip()
    if video:
        upload.file_name = safe_filename(video)


def _engine_name() -> str:
    """The `Asr-Engine` header: whisper-asr-webservice's name for the engine."""
    return str(services().settings.engine).replace("-", "_")


# --- the outputs, byte for byte as whisper-asr-webservice's writers (app/utils.py) ---------
def _ts(seconds: float, *, srt: bool = False) -> str:
    marker = "," if srt else "."
    return str(format_timestamp(max(0.0, seconds), always_include_hours=srt, decimal_marker=marker))


def render(t: Transcript, output: str, language: str | None) -> str:
    segments = t.segments
    if output == "txt":
        return "".join(f"{_who(s)}{s.text.strip()}\n" for s in segments)
    if output == "vtt":
        return "WEBVTT\n\n" + "".join(
            f"{_ts(s.start)} --> {_ts(s.end)}\n{_voice(s)}{s.text.strip().replace('-->', '->')}\n\n"
            for s in segments
        )
    if output == "srt":
        return "".join(
            f"{i}\n{_ts(s.start, srt=True)} --> {_ts(s.end, srt=True)}\n"
            f"{_who(s)}{s.text.strip().replace('-->', '->')}\n\n"
            for i, s in enumerate(segments, start=1)
        )
    if output == "tsv":
        lines = "".join(
            f"{round(1000 * s.start)}\t{round(1000 * s.end)}\t"
            f"{s.text.strip().replace(chr(9), ' ')}\n"
            for s in segments
        )
        return "start\tend\ttext\n" + lines
    return json.dumps(
        {
            "language": language or t.language,
            "segments": [_segment_json(s) for s in segments],
            "text": "".join(s.text for s in segments),
        }
    )


def _segment_json(s: Any) -> dict[str, Any]:
    """A faster-whisper `Segment` as `dataclasses.asdict` writes it."""
    return {
        "id": s.id + 1,  # faster-whisper counts segments from 1
        "seek": round(s.start * 100),
        "start": s.start,
        "end": s.end,
        "text": s.text,
        "tokens": list(s.tokens),
        "avg_logprob": s.avg_logprob,
        "compression_ratio": s.compression_ratio,
        "no_speech_prob": s.no_speech_prob,
        "words": [
            {"start": w.start, "end": w.end, "word": w.word, "probability": w.probability}
            for w in s.words
        ]
        if s.words
        else None,
        "temperature": s.temperature,
        **({"speaker": s.speaker} if s.speaker else {}),
    }


def _who(s: Any) -> str:
    return f"[{s.speaker}] " if s.speaker else ""


def _voice(s: Any) -> str:
    return f"<v {s.speaker}>" if s.speaker else ""


@blueprint.post("/asr")
@tag(["whisper-asr-webservice"])
@document_querystring(AsrQuery)
@document_request(AsrForm, source=DataSource.FORM_MULTIPART)
async def asr() -> Response:
    """Transcribe like whisper-asr-webservice's `/asr` (Bazarr's Whisper provider).

    The body is `text/plain` for every `output`; the JSON output is `{language, segments,
    text}` with faster-whisper's segment fields.
    """
    try:
        encode = _bool("encode", True)
        task = _choice("task", "transcribe", ("transcribe", "translate"))
        language = _language()
        output = _choice("output", "txt", OUTPUTS)
        vad_filter = _bool("vad_filter", False)
        word_timestamps = _bool("word_timestamps", False)
        upload = await _receive()
    except _Invalid as exc:
        return exc.response()
    attachment = upload.file_name or "audio"
    _name_from_video(upload)
    try:
        if language is None:  # the appliance's default language (admin settings), if any
            language = parse_language(services().extras.get("default_language"))
        options = build_options(
            language=language,
            task=task,
            word_timestamps=word_timestamps,
            vad_filter=vad_filter,
            prompt=request.args.get("initial_prompt"),
            **parse_speakers(request.args.get),
        )
        model = resolve_model(None)
        await _prepare_audio(upload, encode=encode)
    except APIError:
        upload.discard()
        raise
    job = await submit(upload, model=model, options=options, source="asr")
    await services().jobs.wait(job)
    raise_for_job(job)
    if job.result is None:
        raise APIError(404, "result_not_found", "the transcript was deleted from the history")
    body = render(job.result, output, language)
    response = Response(body, content_type="text/plain; charset=utf-8")
    response.headers["Asr-Engine"] = _engine_name()
    filename = quote(attachment)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}.{output}"'
    return response


@blueprint.post("/detect-language")
@tag(["whisper-asr-webservice"])
@document_querystring(DetectQuery)
@document_request(AsrForm, source=DataSource.FORM_MULTIPART)
@document_response(DetectedLanguage)
async def detect_language() -> Response:
    """Detect the spoken language from the first 30 s, like whisper-asr-webservice."""
    try:
        encode = _bool("encode", True)
        upload = await _receive()
    except _Invalid as exc:
        return exc.response()
    _name_from_video(upload)
    try:
        model = resolve_model(None)
        await _prepare_audio(upload, encode=encode, seconds=DETECT_SECONDS)
        # only the language matters: greedy decoding, no temperature fallback (cheaper)
        options = build_options(language=None, task="transcribe", temperature=0.0, beam_size=1)
    except APIError:
        upload.discard()
        raise
    job = await submit(upload, model=model, options=options, source="asr")
    await services().jobs.wait(job)
    raise_for_job(job)
    if job.result is None:
        raise APIError(404, "result_not_found", "the transcript was deleted from the history")
    code = job.result.language
    return jsonify(
        {
            "detected_language": LANGUAGE_NAMES.get(code, code),
            "language_code": code,
            "confidence": job.result.language_probability,
        }
    )
