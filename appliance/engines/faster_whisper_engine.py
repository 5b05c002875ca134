"""faster-whisper (CTranslate2) engine — the default: int8 on CPU, one thread per worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.engines.base import (
    Audio,
    Segment,
    TranscribeOptions,
    TranscriptionInfo,
    Word,
)


class FasterWhisperModel:
    def __init__(self, model_dir: Path, compute_type: str, cpu_threads: int, workers: int) -> None:
        from faster_whisper import WhisperModel

        # num_workers lets `workers` threads transcribe with this one model at the same time.
        self._model = WhisperModel(
            str(model_dir),
            device="cpu",
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=workers,
            local_files_only=True,
        )

    @property
    def whisper(self) -> Any:
        """The faster-whisper `WhisperModel`, for callers that drive its lower-level API
        (live speech encodes short windows and decodes them itself)."""
        return self._model

    @property
    def is_multilingual(self) -> bool:
        return bool(self._model.model.is_multilingual)

    def transcribe(
        self, audio: Audio, options: TranscribeOptions
    ) -> tuple[TranscriptionInfo, Iterator[Segment]]:
        segments, info = self._model.transcribe(
            audio,
            language=options.language,
            task=options.task,
            word_timestamps=options.word_timestamps,
            vad_filter=options.vad_filter,
            initial_prompt=options.initial_prompt,
            hotwords=options.hotwords,
            temperature=options.temperature,
            beam_size=options.beam_size,
            condition_on_previous_text=options.condition_on_previous_text,
        )
        result = TranscriptionInfo(info.language, float(info.language_probability), info.duration)
        return result, (_segment(s) for s in segments)

    def close(self) -> None:
        self._model.model.unload_model()


def _segment(s: object) -> Segment:
    words = tuple(
        Word(float(w.start), float(w.end), w.word, float(w.probability))
        for w in (getattr(s, "words", None) or ())
    )
    return Segment(
        id=int(s.id) - 1,  # type: ignore[attr-defined]
        start=float(s.start),  # type: ignore[attr-defined]
        end=float(s.end),  # type: ignore[attr-defined]
        text=str(s.text),  # type: ignore[attr-defined]
        words=words,
        avg_logprob=float(s.avg_logprob),  # type: ignore[attr-defined]
        no_speech_prob=float(s.no_speech_prob),  # type: ignore[attr-defined]
        compression_ratio=float(s.compression_ratio),  # type: ignore[attr-defined]
        temperature=float(s.temperature or 0.0),  # type: ignore[attr-defined]
        tokens=tuple(s.tokens),  # type: ignore[attr-defined]
    )


class FasterWhisperEngine:
    name = "faster-whisper"

    def __init__(self, compute_type: str = "int8", cpu_threads: int = 1, workers: int = 1) -> None:
        self.compute_type = compute_type
        self.cpu_threads = cpu_threads
        self.workers = workers

    def load(self, model_dir: Path) -> FasterWhisperModel:
        return FasterWhisperModel(model_dir, self.compute_type, self.cpu_threads, self.workers)
