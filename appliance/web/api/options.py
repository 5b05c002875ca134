"""Validation of transcription options shared by every endpoint (form fields -> options)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from faster_whisper.tokenizer import _LANGUAGE_CODES

from appliance.core.engines.base import TranscribeOptions
from appliance.web.errors import APIError

LANGUAGES = frozenset(_LANGUAGE_CODES)
TASKS = ("transcribe", "translate")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_language(value: str | None) -> str | None:
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    code = value.strip().lower()
    if code not in LANGUAGES:
        raise APIError(
            400,
            "invalid_language",
            f"unknown language code {value!r}; use ISO 639-1 such as en, de, fr or 'auto'",
        )
    return code


def parse_task(value: str | None) -> str:
    task = (value or "transcribe").strip().lower()
    if task not in TASKS:
        raise APIError(400, "invalid_task", f"task must be transcribe or translate, not {value!r}")
    return task


def parse_bool(name: str, value: str | None, default: bool = False) -> bool:
    if value is None:
        return default
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise APIError(400, "invalid_request", f"{name} must be true or false, not {value!r}")


def parse_float(name: str, value: str | None, low: float, high: float) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise APIError(400, "invalid_request", f"{name} must be a number, not {value!r}") from None
    if not low <= number <= high:
        raise APIError(400, "invalid_request", f"{name} must be between {low} and {high}")
    return number


def parse_int(name: str, value: str | None, low: int, high: int, default: int) -> int:
    if value is None or value.strip() == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise APIError(
            400, "invalid_request", f"{name} must be a whole number, not {value!r}"
        ) from None
    if not low <= number <= high:
        raise APIError(400, "invalid_request", f"{name} must be between {low} and {high}")
    return number


MAX_SPEAKERS = 20


def parse_speakers(get: Callable[[str], str | None]) -> dict[str, Any]:
    """`diarize`, `num_speakers`, `min_speakers`, `max_speakers` (form fields or query args)."""
    values: dict[str, Any] = {"diarize": parse_bool("diarize", get("diarize"))}
    for name in ("num_speakers", "min_speakers", "max_speakers"):
        raw = get(name)
        values[name] = (
            None if raw is None or not raw.strip() else parse_int(name, raw, 1, MAX_SPEAKERS, 1)
        )
    low, high = values["min_speakers"], values["max_speakers"]
    if low is not None and high is not None and low > high:
        raise APIError(400, "invalid_request", "min_speakers must not exceed max_speakers")
    if not values["diarize"] and any(values[n] is not None for n in values if n != "diarize"):
        values["diarize"] = True  # asking for a number of speakers asks for diarization
    return values


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
    batched: str | None = None,
) -> TranscribeOptions:
    """`batched` is the raw form field: true decodes long files in VAD-chunked batches over
    every core, false (the default) with Whisper's sequential decoding (README, "Models")."""
    lang = parse_language(language)
    chosen_task = parse_task(task)
    temp: float | tuple[float, ...] = (
        (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if temperature is None else temperature
    )
    return TranscribeOptions(
        language=lang,
        task="translate" if chosen_task == "translate" else "transcribe",
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
        batched=parse_bool("batched", batched, default=False),
    )
