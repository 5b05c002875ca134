"""The one small interface every inference engine implements.

An engine turns a model directory into a `LoadedModel`; a loaded model turns 16 kHz mono float32
audio into segments, yielded one by one so callers can report progress and cancel between them.
Calls are blocking: callers run them in worker threads, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from appliance.exceptions import ApplianceError

SAMPLE_RATE = 16_000
Audio = npt.NDArray[np.float32]
Task = Literal["transcribe", "translate"]


@dataclass(frozen=True)
class TranscribeOptions:
    """What a caller may ask of a transcription; the defaults are Whisper's own."""

    language: str | None = None
    task: Task = "transcribe"
    word_timestamps: bool = False
    vad_filter: bool = False
    initial_prompt: str | None = None
    hotwords: str | None = None
    temperature: float | tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    beam_size: int = 5
    condition_on_previous_text: bool = True
    # Long files: VAD-chunked batched decoding (faster-whisper), spread over every core the
    # job may use — the default for files (docs/use/models.md). False: Whisper's sequential
    # decoding.
    batched: bool = True
    # speaker diarization after transcription (appliance/core/diarize.py); engines ignore these
    diarize: bool = False
    num_speakers: int | None = None
    min_speakers: int | None = None
    max_speakers: int | None = None


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    word: str
    probability: float
    speaker: str | None = None  # set by diarization


@dataclass(frozen=True)
class Segment:
    id: int
    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    compression_ratio: float = 0.0
    temperature: float = 0.0
    tokens: tuple[int, ...] = ()
    speaker: str | None = None  # set by diarization


@dataclass(frozen=True)
class TranscriptionInfo:
    language: str
    language_probability: float
    duration: float


@dataclass
class Transcript:
    """A finished transcription, as stored in history and rendered by the exporters."""

    text: str
    segments: list[Segment]
    language: str
    duration: float
    language_probability: float = 1.0
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_segments(cls, info: TranscriptionInfo, segments: list[Segment]) -> Transcript:
        text = "".join(s.text for s in segments).strip()
        return cls(text, segments, info.language, info.duration, info.language_probability)


class LoadedModel(Protocol):
    """A model in memory, ready to transcribe; safe to call from several threads at once."""

    @property
    def is_multilingual(self) -> bool: ...

    # True when `TranscribeOptions.batched` decodes in VAD-chunked batches: only the chunks'
    # features are held, so `windowed` gives such a model longer windows
    decodes_in_batches: bool

    def transcribe(
        self, audio: Audio, options: TranscribeOptions
    ) -> tuple[TranscriptionInfo, Iterator[Segment]]: ...

    def close(self) -> None: ...


class Engine(Protocol):
    """Loads models of one format into memory."""

    name: str

    def load(self, model_dir: Path) -> LoadedModel: ...


class EngineUnavailableError(ApplianceError, RuntimeError):
    """The engine's optional dependencies are not installed."""
