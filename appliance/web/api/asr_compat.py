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
    RequestSchemaValidationError,
    document_request,
    document_response,
    tag,
    validate_querystring,
)

from appliance.core import audio
from appliance.core.engines.base import SAMPLE_RATE, Transcript
from appliance.web.api.options import (
    FormBool,
    FormModel,
    Language,
    OutputFormat,
    SpeakerFields,
    Task,
    Text,
    build_options,
    parse_language,
)
from appliance.web.api.submit import not_audio, resolve_model, run
from appliance.web.errors import APIError, describe_validation, validation_problems
from appliance.web.services import services
from appliance.web.upload import TEMP_PREFIX, Upload, receive_upload, safe_filename

blueprint = Blueprint("asr_compat", __name__)

DETECT_SECONDS = 30  # whisper-asr-webservice pads or trims to 30 s before detecting
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


class DetectQuery(FormModel):
    """Query parameters of `POST /detect-language` (whisper-asr-webservice)."""

    encode: FormBool = Field(
        True, description="true: decode the file with FFmpeg; false: raw 16 kHz mono s16le PCM"
    )
    video_file: str | None = Field(
        None, description="Path of the video (Bazarr's 'pass video name'): the history's name"
    )


class AsrQuery(DetectQuery, SpeakerFields):
    """Query parameters of `POST /asr` (whisper-asr-webservice)."""

    task: Task = Field("transcribe", description="transcribe or translate (to English)")
    language: Language = Field(None, description="ISO 639-1 code; empty: detect")
    initial_prompt: Text = None
    vad_filter: FormBool = Field(False, description="Skip silence with Silero VAD")
    word_timestamps: FormBool = Field(False, description="Word timestamps (json output)")
    output: OutputFormat = Field("txt", description="txt, vtt, srt, tsv or json")


class AsrForm(BaseModel):
    audio_file: bytes = Field(description="The audio (or raw PCM with encode=false)")


class DetectedLanguage(BaseModel):
    detected_language: str = Field(description="The language's English name, e.g. english")
    language_code: str = Field(description="ISO 639-1 code, e.g. en")
    confidence: float


class _Invalid(Exception):
    """A body FastAPI would refuse (no `audio_file` part): 422 with `detail` (and our error
    shape). Query values are refused by the `AsrQuery` / `DetectQuery` models (below)."""

    def __init__(self, loc: list[str | int], message: str, kind: str = "value_error") -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message
        self.kind = kind

    def response(self) -> Response:
        return _fastapi_error([(self.kind, self.loc, self.message)], self.message)


def _fastapi_error(detail: list[tuple[str, list[str | int], str]], message: str) -> Response:
    response = jsonify(
        {
            "detail": [{"type": kind, "loc": loc, "msg": msg} for kind, loc, msg in detail],
            "error": {"code": "invalid_request", "message": message},
        }
    )
    response.status_code = 422
    return response


@blueprint.errorhandler(RequestSchemaValidationError)
async def _invalid_query(error: RequestSchemaValidationError) -> Response:
    """A query value the models refuse: FastAPI's 422 with `detail` (and our error shape)."""
    problems = validation_problems(error.validation_error)
    _code, message = describe_validation(error.validation_error)
    return _fastapi_error([(kind, ["query", *loc], text) for loc, kind, text in problems], message)


async def _receive() -> Upload:
    """The `audio_file` part, streamed to the temp dir under the appliance's upload limit."""
    s = services()
    limit = s.max_upload_size
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
        raise not_audio(upload, exc) from None
    except (OSError, struct.error, wave.Error) as exc:
        upload.discard()
        raise APIError(413, "file_too_large", f"cannot convert the audio: {exc}") from None
    upload.discard()
    upload.file_path = path


def _name_from_video(upload: Upload, query: DetectQuery) -> None:
    """Bazarr's `video_file` (the film's path, when "pass video name" is on) names the entry."""
    video = (query.video_file or "").strip()
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
@validate_querystring(AsrQuery)
@document_request(AsrForm, source=DataSource.FORM_MULTIPART)
async def asr(query_args: AsrQuery) -> Response:
    """Transcribe like whisper-asr-webservice's `/asr` (Bazarr's Whisper provider).

    The body is `text/plain` for every `output`; the JSON output is `{language, segments,
    text}` with faster-whisper's segment fields.
    """
    query = query_args
    try:
        upload = await _receive()
    except _Invalid as exc:
        return exc.response()
    attachment = upload.file_name or "audio"
    _name_from_video(upload, query)
    language = query.language
    try:
        if language is None:  # the appliance's default language (admin settings), if any
            language = parse_language(services().default_language)
        options = build_options(
            language=language,
            task=query.task,
            word_timestamps=query.word_timestamps,
            vad_filter=query.vad_filter,
            prompt=query.initial_prompt,
            **query.speakers(),
        )
        model = resolve_model(None)
        await _prepare_audio(upload, encode=query.encode)
    except APIError:
        upload.discard()
        raise
    result = await run(upload, model=model, options=options, source="asr")
    output = query.output
    body = render(result, output, language)
    response = Response(body, content_type="text/plain; charset=utf-8")
    response.headers["Asr-Engine"] = _engine_name()
    filename = quote(attachment)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}.{output}"'
    return response


@blueprint.post("/detect-language")
@tag(["whisper-asr-webservice"])
@validate_querystring(DetectQuery)
@document_request(AsrForm, source=DataSource.FORM_MULTIPART)
@document_response(DetectedLanguage)
async def detect_language(query_args: DetectQuery) -> Response:
    """Detect the spoken language from the first 30 s, like whisper-asr-webservice."""
    try:
        upload = await _receive()
    except _Invalid as exc:
        return exc.response()
    _name_from_video(upload, query_args)
    try:
        model = resolve_model(None)
        await _prepare_audio(upload, encode=query_args.encode, seconds=DETECT_SECONDS)
        # only the language matters: greedy decoding, no temperature fallback (cheaper)
        options = build_options(language=None, task="transcribe", temperature=0.0, beam_size=1)
    except APIError:
        upload.discard()
        raise
    result = await run(upload, model=model, options=options, source="asr")
    code = result.language
    return jsonify(
        {
            "detected_language": LANGUAGE_NAMES.get(code, code),
            "language_code": code,
            "confidence": result.language_probability,
        }
    )
