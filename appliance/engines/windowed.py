"""Transcribe audio of any length with memory bounded by a window, with any engine.

Both engines compute the log-mel spectrogram of everything they are given at once (with
faster-whisper about 1 GB per hour of audio, several times the audio itself), so a long
recording is given to them in windows of at most `WINDOW_SECONDS`, each cut at the quietest
moment of its last `CUT_SEARCH_SECONDS` so that a word is rarely split. Audio that fits in one
window is passed whole, exactly as before: the same call, the same result.

The windows after the first keep the language of the first (detected once, as Whisper does);
segment ids run on and timestamps are those of the whole recording.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Protocol

import numpy as np

from appliance.engines.base import (
    SAMPLE_RATE,
    Audio,
    LoadedModel,
    Segment,
    TranscribeOptions,
    TranscriptionInfo,
)

WINDOW_SECONDS = 180
CUT_SEARCH_SECONDS = 30
_CUT_FRAME = SAMPLE_RATE // 10  # the quietest 100 ms decides where a window ends


class Samples(Protocol):
    """16 kHz mono audio that can be read in pieces (`appliance.audio.PCMFile`)."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> Audio: ...


class _ArraySamples:
    def __init__(self, audio: Audio) -> None:
        self._audio = audio

    def __len__(self) -> int:
        return int(self._audio.shape[0])

    def read(self, start: int, stop: int) -> Audio:
        return self._audio[start:stop]


def transcribe(
    model: LoadedModel,
    audio: Samples | Audio,
    options: TranscribeOptions,
    *,
    window_seconds: float = WINDOW_SECONDS,
) -> tuple[TranscriptionInfo, Iterator[Segment]]:
    """`model.transcribe`, window by window when the audio is longer than one window."""
    source: Samples = _ArraySamples(audio) if isinstance(audio, np.ndarray) else audio
    total = len(source)
    window = max(SAMPLE_RATE, round(window_seconds * SAMPLE_RATE))
    if total <= window:
        return model.transcribe(source.read(0, total), options)
    stop = _cut(source, 0, window)
    info, first = model.transcribe(source.read(0, stop), options)
    whole = TranscriptionInfo(info.language, info.language_probability, total / SAMPLE_RATE)
    rest = options if options.language else replace(options, language=info.language)
    return whole, _segments(model, source, rest, first, stop, window)


def _segments(
    model: LoadedModel,
    source: Samples,
    options: TranscribeOptions,
    first: Iterator[Segment],
    first_stop: int,
    window: int,
) -> Iterator[Segment]:
    total = len(source)
    start, stop, segments = 0, first_stop, first
    next_id = 0
    while True:
        offset = start / SAMPLE_RATE
        for segment in segments:
            yield _shifted(segment, offset, next_id)
            next_id += 1
        if stop >= total:
            return
        start, stop = stop, _cut(source, stop, window)
        _info, segments = model.transcribe(source.read(start, stop), options)


def _cut(source: Samples, start: int, window: int) -> int:
    """Where the window beginning at `start` ends: the quietest 100 ms near its end."""
    total = len(source)
    end = start + window
    if end >= total:
        return total
    search = min(window // 2, CUT_SEARCH_SECONDS * SAMPLE_RATE)
    region = source.read(end - search, end)
    frames = region[: region.shape[0] // _CUT_FRAME * _CUT_FRAME].reshape(-1, _CUT_FRAME)
    if frames.shape[0] == 0:
        return end
    energy = np.einsum("ij,ij->i", frames, frames)
    quietest = int(energy.shape[0]) - 1 - int(np.argmin(energy[::-1]))  # the latest, if several
    return end - search + quietest * _CUT_FRAME + _CUT_FRAME // 2


def _shifted(segment: Segment, offset: float, index: int) -> Segment:
    if offset == 0 and segment.id == index:
        return segment
    words = tuple(
        replace(w, start=round(w.start + offset, 3), end=round(w.end + offset, 3))
        for w in segment.words
    )
    return replace(
        segment,
        id=index,
        start=round(segment.start + offset, 3),
        end=round(segment.end + offset, 3),
        words=words,
    )
