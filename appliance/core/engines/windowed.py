"""Transcribe audio of any length with memory bounded by a window, with any engine.

Both engines compute the log-mel spectrogram of everything they are given at once (with
faster-whisper about 1 GB per hour of audio, several times the audio itself), so a long
recording is given to them in windows of at most `WINDOW_SECONDS`, each cut at the quietest
moment of its last `CUT_SEARCH_SECONDS` so that a word is rarely split. Audio that fits in one
window is passed whole, exactly as before: the same call, the same result.

The windows after the first keep the language of the first (detected once, as Whisper does);
segment ids run on and timestamps are those of the whole recording.

Every file transcription, with any engine, leaves through `guard`: no segment starts at or
after the end of the audio and none ends beyond it (ends and word times are clamped), empty
segments are dropped, and repetition loops are cut — a run of words repeated more than
`MAX_REPEATS` times in a row inside a segment keeps its first `MAX_REPEATS`, and a segment
whose text is the same as the `MAX_REPEATS` segments before it is dropped (the hallucinated
"Good." every second over a silent tail).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Protocol

import numpy as np

from appliance.core.engines.base import (
    SAMPLE_RATE,
    Audio,
    LoadedModel,
    Segment,
    TranscribeOptions,
    TranscriptionInfo,
)

WINDOW_SECONDS = 180
# batched decoding (`TranscribeOptions.batched`) holds only the features of its chunks of speech
# (1 MB per 30 s), not the window's whole spectrogram: its windows are longer, so that a
# window's chunks fill whole batches on every core (three 180 s windows of 3 chunks each kept
# one of 2 cores idle a third of the time)
BATCHED_WINDOW_SECONDS = 600
CUT_SEARCH_SECONDS = 30
_CUT_FRAME = SAMPLE_RATE // 10  # the quietest 100 ms decides where a window ends
MAX_REPEATS = 3  # a word run or a segment text may come this many times in a row, no more
_MAX_RUN_WORDS = 12  # runs of 1 to this many words are checked


class Samples(Protocol):
    """16 kHz mono audio that can be read in pieces (`appliance.core.audio.PCMFile`)."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> Audio: ...


class ArraySamples:
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
    window_seconds: float | None = None,
) -> tuple[TranscriptionInfo, Iterator[Segment]]:
    """`model.transcribe`, window by window when the audio is longer than one window
    (`window_seconds`, by default `BATCHED_WINDOW_SECONDS` or `WINDOW_SECONDS`)."""
    source: Samples = ArraySamples(audio) if isinstance(audio, np.ndarray) else audio
    total = len(source)
    if window_seconds is None:
        batched = options.batched and model.decodes_in_batches
        window_seconds = BATCHED_WINDOW_SECONDS if batched else WINDOW_SECONDS
    window = max(SAMPLE_RATE, round(window_seconds * SAMPLE_RATE))
    if total <= window:
        info, segments = model.transcribe(source.read(0, total), options)
        return info, guard(segments, total / SAMPLE_RATE)
    stop = quiet_cut(source, 0, window)
    info, first = model.transcribe(source.read(0, stop), options)
    whole = TranscriptionInfo(info.language, info.language_probability, total / SAMPLE_RATE)
    rest = options if options.language else replace(options, language=info.language)
    return whole, guard(_segments(model, source, rest, first, stop, window), whole.duration)


def guard(segments: Iterator[Segment], duration: float) -> Iterator[Segment]:
    """No text where there is no audio, no repetition loops (see the module docstring)."""
    recent: list[str] = []  # normalised texts of the last segments kept
    index = 0
    for segment in segments:
        if segment.start >= duration:
            continue
        text = _cut_loops(segment.text)
        key = _normalised(text)
        if not key:
            continue
        if len(recent) >= MAX_REPEATS and all(r == key for r in recent[-MAX_REPEATS:]):
            continue
        recent = [*recent[-MAX_REPEATS:], key]
        words = tuple(
            replace(w, end=min(w.end, duration)) for w in segment.words if w.start < duration
        )
        if text != segment.text and len(words) > len(text.split()):
            words = words[: len(text.split())]
        end = min(segment.end, duration)
        if (text, words, end, index) != (segment.text, segment.words, segment.end, segment.id):
            segment = replace(segment, text=text, words=words, end=end, id=index)
        index += 1
        yield segment


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w' ]+", " ", text.lower()).split())


def _cut_loops(text: str) -> str:
    """The text with each run of words repeated more than MAX_REPEATS times in a row cut back
    to MAX_REPEATS (words compared without case and punctuation)."""
    words = text.split()
    keys = [_normalised(w) for w in words]
    if len(keys) <= MAX_REPEATS:
        return text
    keep = [True] * len(words)
    for size in range(1, _MAX_RUN_WORDS + 1):
        i = 0
        while i + size * (MAX_REPEATS + 1) <= len(keys):
            run = keys[i : i + size]
            count = 1
            while keys[i + count * size : i + (count + 1) * size] == run:
                count += 1
            if count > MAX_REPEATS and any(run):
                for j in range(i + MAX_REPEATS * size, i + count * size):
                    keep[j] = False
                i += count * size
            else:
                i += 1
    if all(keep):
        return text
    kept = " ".join(w for w, k in zip(words, keep, strict=True) if k)
    return (" " + kept) if text.startswith(" ") else kept


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
        start, stop = stop, quiet_cut(source, stop, window)
        _info, segments = model.transcribe(source.read(start, stop), options)


def quiet_cut(source: Samples, start: int, window: int) -> int:
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
