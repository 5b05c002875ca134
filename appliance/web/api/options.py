"""Transcription options: each validation rule once, as a pydantic field type or validator.

The request models of every endpoint that takes options (`/transcribe` and `/api/jobs`, the
OpenAI routes, whisper-asr-webservice's `/asr`) are built from these types, so a language
code, a task, a format, a boolean form field or a speaker count is checked by the same code
everywhere, and quart-schema documents the same models in `/openapi.json`. An invalid value
raises `PydanticCustomError` with the API's error code (`invalid_language`, ...) or one of
pydantic's own; `appliance.web.errors` renders either as a 400 naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, Self

from faster_whisper.tokenizer import _LANGUAGE_CODES
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError, PydanticUseDefault

from appliance.core.engines.base import TranscribeOptions
from appliance.core.formats import EXPORT_FORMATS
from appliance.web.errors import APIError, describe_validation

LANGUAGES = frozenset(_LANGUAGE_CODES)
TASKS = ("transcribe", "translate")
FORMATS = tuple(EXPORT_FORMATS)
MAX_SPEAKERS = 20
_QUOTE_CHARS = 40  # a refused value is quoted back, cut to this length


def _quoted(value: object) -> str:
    return repr(str(value)[:_QUOTE_CHARS])


def is_blank(value: object) -> bool:
    """None is not blank: an empty (or all-space) form field or query value is."""
    return isinstance(value, str) and not value.strip()


def blank_is_default(value: object) -> object:
    """A before-validator: an empty form field or query value takes the field's default."""
    if is_blank(value):
        raise PydanticUseDefault
    return value


def _blank_to_none(value: object) -> object:
    """An empty form field or query value means "not given"."""
    return None if is_blank(value) else value


def _language(value: object) -> object:
    if not isinstance(value, str):
        return value  # None, or a type pydantic refuses with its own message
    code = value.strip().lower()
    if code in ("", "auto"):
        return None
    if code not in LANGUAGES:
        raise PydanticCustomError(
            "invalid_language",
            f"unknown language code {_quoted(value)}; use ISO 639-1 such as en, de, fr or 'auto'",
        )
    return code


def _task(value: object) -> object:
    if is_blank(value):
        raise PydanticUseDefault
    if not isinstance(value, str):
        return value
    task = value.strip().lower()
    if task not in TASKS:
        raise PydanticCustomError(
            "invalid_task", f"must be transcribe or translate, not {_quoted(value)}"
        )
    return task


def _format(value: object) -> object:
    if is_blank(value):
        raise PydanticUseDefault
    if not isinstance(value, str):
        return value
    return one_of(value, value.strip().lower(), FORMATS, "invalid_format")


def one_of(value: object, text: str, allowed: Sequence[str], code: str) -> str:
    """`text` (the normalised `value`) if it is in `allowed`, else the validation error `code`."""
    if text not in allowed:
        raise PydanticCustomError(
            code, f"must be one of {', '.join(allowed)}, not {_quoted(value)}"
        )
    return text


def _form_bool(value: object) -> object:
    """An empty field is the default; otherwise pydantic's words (true/false, 1/0, yes/no,
    on/off, t/f, y/n), as FastAPI reads them: whisper-asr-webservice's clients send those."""
    if is_blank(value):
        raise PydanticUseDefault
    return value.strip() if isinstance(value, str) else value


# ISO 639-1 code, "auto" or empty (detect); lower-cased
Language = Annotated[str | None, BeforeValidator(_language)]
Task = Annotated[Literal["transcribe", "translate"], BeforeValidator(_task)]
# an export format of a transcript (the seed's `format`, the job result, the history export)
OutputFormat = Annotated[Literal["json", "txt", "srt", "vtt", "tsv"], BeforeValidator(_format)]
FormBool = Annotated[bool, BeforeValidator(_form_bool)]
Text = Annotated[str | None, BeforeValidator(_blank_to_none)]
Temperature = Annotated[
    Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None,
    BeforeValidator(_blank_to_none),
]
SpeakerCount = Annotated[
    Annotated[int, Field(ge=1, le=MAX_SPEAKERS)] | None, BeforeValidator(_blank_to_none)
]


def _one(adapter: TypeAdapter[Any], value: object) -> Any:
    """One value checked by a field type outside a request model: `APIError` 400 if refused."""
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        code, message = describe_validation(exc)
        raise APIError(400, code, message) from None


_LANGUAGE: TypeAdapter[str | None] = TypeAdapter(Language)
_TASK: TypeAdapter[str] = TypeAdapter(Task)
_BOOL: TypeAdapter[bool] = TypeAdapter(FormBool)


def parse_language(value: object) -> str | None:
    """The `Language` rule for callers without a request model (live speech)."""
    result: str | None = _one(_LANGUAGE, value)
    return result


def parse_task(value: object) -> str:
    """The `Task` rule for callers without a request model (live speech)."""
    if value is None or is_blank(value):
        return "transcribe"
    result: str = _one(_TASK, value)
    return result


def _flag(value: bool | str) -> bool:
    result: bool = False if is_blank(value) else _one(_BOOL, value)
    return result


class FormModel(BaseModel):
    """Form fields or query values: unknown names are ignored (clients send extras)."""

    model_config = ConfigDict(extra="ignore", frozen=False)


class SpeakerFields(FormModel):
    """`diarize`, `num_speakers`, `min_speakers`, `max_speakers`: who said what."""

    diarize: FormBool = Field(False, description="Label speakers (who said what)")
    num_speakers: SpeakerCount = Field(None, description="Exact number of speakers, if known")
    min_speakers: SpeakerCount = Field(None, description="At least this many speakers")
    max_speakers: SpeakerCount = Field(None, description="At most this many speakers")

    @model_validator(mode="after")
    def _speakers(self) -> Self:
        low, high = self.min_speakers, self.max_speakers
        if low is not None and high is not None and low > high:
            raise PydanticCustomError(
                "invalid_request", "max_speakers: must not be below min_speakers"
            )
        if any(n is not None for n in (self.num_speakers, low, high)):
            self.diarize = True  # asking for a number of speakers asks for diarization
        return self

    def speakers(self) -> dict[str, Any]:
        return {
            "diarize": self.diarize,
            "num_speakers": self.num_speakers,
            "min_speakers": self.min_speakers,
            "max_speakers": self.max_speakers,
        }


class DecodingFields(SpeakerFields):
    """The decoding fields `/transcribe`, `/api/jobs` and OpenAI's `/v1/audio/*` share (those
    forms may describe them in their own words), and the engine options they make."""

    word_timestamps: FormBool = Field(False, description="Include word timestamps")
    vad_filter: FormBool = Field(False, description="Skip silence with Silero VAD")
    batched: FormBool = Field(
        True, description="Long files: batched VAD-chunked decoding (default; false: sequential)"
    )
    prompt: Text = Field(None, description="Initial prompt (names, spelling)")
    hotwords: Text = Field(None, description="Words to favour")

    def decoding(
        self,
        language: str | None,
        task: str,
        *,
        words: bool | None = None,
        temperature: float | None = None,
    ) -> TranscribeOptions:
        """The engine options; `words` (word timestamps) defaults to the field."""
        return build_options(
            language=language,
            task=task,
            word_timestamps=self.word_timestamps if words is None else words,
            vad_filter=self.vad_filter,
            batched=self.batched,
            prompt=self.prompt,
            hotwords=self.hotwords,
            temperature=temperature,
            **self.speakers(),
        )


def build_options(
    *,
    language: str | None,
    task: str | None,
    word_timestamps: bool = False,
    vad_filter: bool = False,
    prompt: str | None = None,
    hotwords: str | None = None,
    temperature: float | None = None,
    beam_size: int = 5,
    diarize: bool = False,
    num_speakers: int | None = None,
    min_speakers: int | None = None,
    max_speakers: int | None = None,
    batched: bool | str = True,
) -> TranscribeOptions:
    """Values of a request model -> the engine's options (raw ones are checked by the same
    rules: `APIError` 400). `batched` (the default) decodes long files in VAD-chunked batches
    over every core, false with Whisper's sequential decoding (docs/use/models.md); no
    temperature means Whisper's fallback schedule."""
    temp: float | tuple[float, ...] = (
        (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if temperature is None else temperature
    )
    return TranscribeOptions(
        language=parse_language(language),
        task="translate" if parse_task(task) == "translate" else "transcribe",
        word_timestamps=word_timestamps,
        vad_filter=vad_filter,
        initial_prompt=(prompt or None),
        hotwords=(hotwords or None),
        temperature=temp,
        beam_size=beam_size,
        diarize=diarize,
        num_speakers=num_speakers,
        min_speakers=min_speakers,
        max_speakers=max_speakers,
        batched=_flag(batched),
    )
