"""No text where there is no speech (issue 13, item 2): `appliance.core.engines.windowed.guard`.

A real recording with long pauses (the real clips, separated by 12-20 s of digital silence or
-40 dBFS noise, 25 s of silence at the end) is transcribed ten times each way, batched (the
default for files) and sequential, one test per run (temperature fallback samples, so one run
proves little); no segment may lie past the end of the audio or in the silent tail, and no run
of 6 words may repeat more than 3 times in a row. The guard itself is then driven with a model that
hallucinates on purpose.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from appliance.core.engines import windowed
from appliance.core.engines.base import (
    SAMPLE_RATE,
    Audio,
    LoadedModel,
    Segment,
    TranscribeOptions,
    TranscriptionInfo,
    Word,
)
from appliance.core.engines.faster_whisper_engine import FasterWhisperEngine
from appliance.core.model_manager import ModelManager
from bench.longform import assemble
from tests.wer import normalise, wer

RUNS = 10
RUN_WORDS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedModel]:
    engine = FasterWhisperEngine("int8", cpu_threads=1, workers=2)
    path = ModelManager(engine, tmp_path_factory.mktemp("models")).locate("tiny.en")
    assert path is not None
    loaded = engine.load(path)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def paused() -> tuple[Audio, str, float]:
    """About 80 s: 4 clips, two long pauses (digital silence, -40 dBFS noise), 25 s of silence
    at the end; the last speech end."""
    audio, text, spans = assemble(
        0.5, seed=7, long_pause_every=2, long_pause=(12.0, 20.0), tail_seconds=25.0, noise=0.01
    )
    return audio, text, max(end for _start, end, _text in spans)


def longest_repeat(words: list[str], size: int) -> int:
    """How many times in a row the most repeated run of `size` words occurs."""
    best = 1
    for i in range(len(words)):
        count = 1
        while words[i + count * size : i + (count + 1) * size] == words[i : i + size]:
            count += 1
        best = max(best, count)
    return best


@pytest.mark.parametrize("run", range(RUNS))
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "sequential"])
def test_no_text_past_the_end_or_in_silence(
    model: LoadedModel, paused: tuple[Audio, str, float], batched: bool, run: int
) -> None:
    audio, reference, speech_end = paused
    duration = audio.shape[0] / SAMPLE_RATE
    options = TranscribeOptions(language="en", batched=batched)
    info, segments = windowed.transcribe(model, audio, options)
    found = list(segments)
    assert info.duration == pytest.approx(duration)
    for s in found:
        assert 0 <= s.start < duration and s.end <= duration, s
        assert s.start < speech_end + 2.0, ("text in the silent tail", s)
        assert all(w.end <= duration for w in s.words)
    words = normalise(" ".join(s.text for s in found)).split()
    assert longest_repeat(words, RUN_WORDS) <= 3, words
    assert wer(reference, " ".join(s.text for s in found)) < 0.15


# --- the guard, with a model that hallucinates on purpose ------------------------------------


class Hallucinating:
    """Speech, then a loop inside a segment, then 'Good.' every second past the end."""

    is_multilingual = False
    decodes_in_batches = False

    def __init__(self, duration: float) -> None:
        self.duration = duration

    def transcribe(
        self, audio: Audio, options: TranscribeOptions
    ) -> tuple[TranscriptionInfo, Iterator[Segment]]:
        end = audio.shape[0] / SAMPLE_RATE

        def segments() -> Iterator[Segment]:
            yield Segment(0, 0.0, 4.0, " Ask not what your country can do for you.")
            loop = " and then we went home" * 8
            yield Segment(1, 4.0, 9.0, " So" + loop + ".")
            words = (Word(9.0, 9.5, " Fine.", 0.9), Word(end - 0.2, end + 0.8, " ok", 0.2))
            yield Segment(2, 9.0, end + 0.8, " Fine. ok", words=words)
            for i in range(12):
                t = end - 6 + i
                yield Segment(3 + i, t, t + 0.5, " Good.")
            yield Segment(15, end, end + 2.0, " Thank you.")
            yield Segment(16, end - 1, end - 0.5, "  ")

        return TranscriptionInfo("en", 1.0, end), segments()

    def close(self) -> None:
        pass


def test_guard_clamps_and_cuts_loops() -> None:
    audio = np.zeros(20 * SAMPLE_RATE, np.float32)
    fake: Any = Hallucinating(20.0)
    _info, segments = windowed.transcribe(fake, audio, TranscribeOptions())
    found = list(segments)
    assert [s.id for s in found] == list(range(len(found)))
    assert all(s.start < 20.0 and s.end <= 20.0 for s in found)
    assert all(w.end <= 20.0 for s in found for w in s.words)
    texts = [s.text for s in found]
    assert texts[0] == " Ask not what your country can do for you."
    assert texts[1].count("and then we went home") == 3
    assert texts[2] == " Fine. ok" and found[2].end == 20.0
    assert texts.count(" Good.") == 3  # at most 3 in a row
    assert " Thank you." not in texts  # starts at the end of the audio
    assert all(t.strip() for t in texts)


def test_guard_over_windows_keeps_times_inside() -> None:
    """The long-file path (several windows) goes through the guard too."""
    audio = np.zeros(50 * SAMPLE_RATE, np.float32)
    fake: Any = Hallucinating(50.0)
    _info, segments = windowed.transcribe(fake, audio, TranscribeOptions(), window_seconds=20)
    found = list(segments)
    assert found and all(s.end <= 50.0 for s in found)
    assert [s.id for s in found] == list(range(len(found)))
