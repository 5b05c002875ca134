"""Batched decoding of long files (issue 13, item 1): `core.engines.faster_whisper_engine`.

On a real long recording (the real clips in shuffled passes with pauses, `bench.longform`) the
batched path must transcribe as well as sequential decoding (WER within 1 point), stream its
segments batch by batch, spread each batch over the model's replicas, and decode again a chunk
whose speech was dropped. Audio of one window or less keeps the sequential path.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from typing import Any

import jiwer
import numpy as np
import pytest
from faster_whisper import BatchedInferencePipeline

import appliance.core.engines.faster_whisper_engine as fw
from appliance.core.engines import windowed
from appliance.core.engines.base import SAMPLE_RATE, Audio, TranscribeOptions
from appliance.core.model_manager import ModelManager
from appliance.web.api.options import build_options
from appliance.web.errors import APIError
from bench.common import clips
from bench.longform import _read, assemble
from tests.conftest import JFK_TEXT
from tests.wer import normalise, wer


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fw.FasterWhisperModel]:
    engine = fw.FasterWhisperEngine("int8", cpu_threads=1, workers=2)
    path = ModelManager(engine, tmp_path_factory.mktemp("models")).locate("tiny.en")
    assert path is not None
    loaded = engine.load(path)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def recording() -> tuple[Audio, str]:
    """About 2.5 minutes of real speech with pauses, and its reference."""
    audio, text, _spans = assemble(2.5, seed=3, tail_seconds=5.0)
    return audio, text


@pytest.fixture(scope="module")
def three_times() -> tuple[Audio, list[str]]:
    """The clips played three times with half a second between them (two minutes, as
    `tests/test_openai_streaming.py`'s `long_wav`), and their sentences. Batched decoding
    used to lose JFK's "ask" in the third pass: Silero VAD scored the soft word after a pause
    under its threshold and the pause was cut out with it."""
    speech = [(_read(c.path), c.reference) for c in clips()] * 3
    gap = np.zeros(SAMPLE_RATE // 2, np.float32)
    audio = np.concatenate([part for a, _t in speech for part in (a, gap)])
    return audio, [t for _a, t in speech]


def sentence_hits(sentences: list[str], hypothesis: str) -> list[float]:
    """For each reference sentence, the share of its words the hypothesis has in place
    (aligned, punctuation and case ignored): a lost sentence scores about 0."""
    words = [normalise(s).split() for s in sentences]
    result = jiwer.process_words(" ".join(" ".join(w) for w in words), normalise(hypothesis))
    hit = [False] * sum(len(w) for w in words)
    for chunk in result.alignments[0]:
        if chunk.type == "equal":
            hit[chunk.ref_start_idx : chunk.ref_end_idx] = [True] * (
                chunk.ref_end_idx - chunk.ref_start_idx
            )
    shares, at = [], 0
    for w in words:
        shares.append(sum(hit[at : at + len(w)]) / len(w))
        at += len(w)
    return shares


BATCHED = TranscribeOptions(language="en", batched=True)


def text_of(model: fw.FasterWhisperModel, audio: Audio, batched: bool) -> str:
    options = TranscribeOptions(language="en", batched=batched)
    _info, segments = windowed.transcribe(model, audio, options)
    return "".join(s.text for s in segments)


def test_batched_as_good_as_sequential(
    model: fw.FasterWhisperModel, recording: tuple[Audio, str]
) -> None:
    audio, reference = recording
    text = text_of(model, audio, batched=True)
    batched = wer(reference, text)
    sequential = wer(reference, text_of(model, audio, batched=False))
    assert batched <= sequential + 0.01, (batched, sequential)
    assert batched < 0.08
    sentences = [t for _s, _e, t in assemble(2.5, seed=3, tail_seconds=5.0)[2]]
    assert min(sentence_hits(sentences, text)) >= 0.6, text  # every sentence is there


def test_every_sentence_of_the_clips_played_three_times(
    model: fw.FasterWhisperModel, three_times: tuple[Audio, list[str]]
) -> None:
    audio, sentences = three_times
    options = build_options(language=None, task=None)  # what a request gets by default
    _info, segments = windowed.transcribe(model, audio, options)
    found = list(segments)
    text = "".join(s.text for s in found)
    assert min(sentence_hits(sentences, text)) >= 0.6, text
    assert normalise(text).count("ask not what your country can do for you") == 3, text
    assert all(s.end <= audio.shape[0] / SAMPLE_RATE for s in found)


def test_short_pauses_stay_in_the_audio_decoded(
    three_times: tuple[Audio, list[str]],
) -> None:
    """Only pauses of `KEEP_PAUSE_SECONDS` or more are cut out; chunks fill the kept audio
    without a gap and end in a pause."""
    audio, _sentences = three_times
    spans, chunks = fw.speech_plan(audio)
    assert len(spans) == 1  # no pause of 2 s: all of the speech, pauses included
    assert spans[0]["start"] < SAMPLE_RATE and spans[0]["end"] > audio.shape[0] - SAMPLE_RATE
    kept = sum(s["end"] - s["start"] for s in spans) / SAMPLE_RATE
    assert chunks[0]["start"] == 0 and chunks[-1]["end"] == pytest.approx(kept)
    assert all(a["end"] == b["start"] for a, b in itertools.pairwise(chunks))
    assert all(0 < c["end"] - c["start"] <= fw.CHUNK_SECONDS for c in chunks)
    assert all(c["end"] - c["start"] >= fw.MIN_CHUNK_SECONDS for c in chunks[:-1])
    # a long pause is cut out: 12-20 s of silence between clips, 25 s at the end
    paused, _text, said = assemble(
        0.5, seed=7, long_pause_every=2, long_pause=(12.0, 20.0), tail_seconds=25.0
    )
    spans, _chunks = fw.speech_plan(paused)
    assert len(spans) >= 2
    assert spans[-1]["end"] < paused.shape[0] - 20 * SAMPLE_RATE
    for start, end, _t in said:  # and the speech is kept (the clips begin and end quietly)
        inside = sum(
            max(0, min(s["end"], end * SAMPLE_RATE) - max(s["start"], start * SAMPLE_RATE))
            for s in spans
        )
        assert inside >= 0.8 * (end - start) * SAMPLE_RATE


def test_segments_stream_batch_by_batch(
    model: fw.FasterWhisperModel, recording: tuple[Audio, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fw, "CHUNKS_PER_REPLICA", 1)  # batches of 2 chunks: several batches
    calls: list[int] = []
    original = fw._Pipeline.forward

    def counting(self: Any, features: Any, *args: Any) -> Any:
        calls.append(len(features))
        return original(self, features, *args)

    monkeypatch.setattr(fw._Pipeline, "forward", counting)
    audio, _reference = recording
    _info, segments = model.transcribe(
        audio[: 120 * SAMPLE_RATE], TranscribeOptions(language="en", batched=True)
    )
    assert calls == []  # nothing decoded before the caller asks
    first = next(segments)
    assert first.text.strip() and calls == [2]  # the first batch only
    rest = list(segments)
    assert len(calls) >= 2 and rest
    assert [s.id for s in [first, *rest]] == list(range(len(rest) + 1))


def test_batch_spread_over_replicas(
    model: fw.FasterWhisperModel, recording: tuple[Audio, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[tuple[str, int]] = []
    original = BatchedInferencePipeline.forward

    def recording_forward(self: Any, features: Any, *args: Any) -> Any:
        threads.append((threading.current_thread().name, len(features)))
        return original(self, features, *args)

    monkeypatch.setattr(BatchedInferencePipeline, "forward", recording_forward)
    audio, _reference = recording
    _info, segments = model.transcribe(
        audio[: 100 * SAMPLE_RATE], TranscribeOptions(language="en", batched=True)
    )
    assert list(segments)
    assert model.replicas == 2
    first_batch = threads[:2]
    assert len({name for name, _n in first_batch}) == 2  # two parts, two threads at once
    assert all(name.startswith("batched") for name, _n in first_batch)


def test_dropped_speech_is_decoded_again(
    model: fw.FasterWhisperModel, recording: tuple[Audio, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk whose decode stopped early (as tiny.en does now and then on a change of voice)
    is decoded again sequentially; the text comes back."""
    original = BatchedInferencePipeline.forward
    redone: list[float] = []

    def dropping(self: Any, features: Any, tokenizer: Any, metas: Any, options: Any) -> Any:
        outputs = original(self, features, tokenizer, metas, options)
        for meta, output in zip(metas, outputs, strict=True):
            if meta["offset"] == 0 and output:  # keep only the first 5 tokens of chunk 0
                output[:] = [{**output[0], "tokens": output[0]["tokens"][:5], "text": " And"}]
        return outputs

    sequential = fw._Pipeline._sequential

    def spy(self: Any, feature: Any, tokenizer: Any, meta: Any, options: Any) -> Any:
        redone.append(meta["offset"])
        return sequential(self, feature, tokenizer, meta, options)

    monkeypatch.setattr(BatchedInferencePipeline, "forward", dropping)
    monkeypatch.setattr(fw._Pipeline, "_sequential", spy)
    audio, reference = recording
    text = text_of(model, audio, batched=True)
    assert 0.0 in redone
    assert wer(reference, text) < 0.08


def test_dropped_tail_is_decoded_again(
    model: fw.FasterWhisperModel, recording: tuple[Audio, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk whose text stops early is found by its word times even when its token rate
    looks normal (the last sentence of a chunk is about a tenth of it)."""
    monkeypatch.setattr(fw, "REDO_RATE", 0.0)  # the rate guard is off: only coverage judges
    original = BatchedInferencePipeline.forward
    redone: list[float] = []

    def dropping(self: Any, features: Any, tokenizer: Any, metas: Any, options: Any) -> Any:
        outputs = original(self, features, tokenizer, metas, options)
        for meta, output in zip(metas, outputs, strict=True):
            if meta["offset"] == 0 and output:  # the words of the first 10 s only
                words = [w for s in output for w in s["words"] if w["end"] < 10.0]
                text = "".join(w["word"] for w in words)
                output[:] = [{**output[0], "words": words, "text": text, "tokens": [0] * 30}]
        return outputs

    sequential = fw._Pipeline._sequential

    def spy(self: Any, feature: Any, tokenizer: Any, meta: Any, options: Any) -> Any:
        redone.append(meta["offset"])
        return sequential(self, feature, tokenizer, meta, options)

    monkeypatch.setattr(BatchedInferencePipeline, "forward", dropping)
    monkeypatch.setattr(fw._Pipeline, "_sequential", spy)
    audio, reference = recording
    text = text_of(model, audio, batched=True)
    assert redone == [0.0]
    assert wer(reference, text) < 0.08


def test_concurrent_transcriptions_share_the_replicas(
    model: fw.FasterWhisperModel, recording: tuple[Audio, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone transcription splits each batch over both replicas; a second one started
    while the first runs gets batches for one replica and does not split them."""
    calls: list[tuple[str, int]] = []
    original = BatchedInferencePipeline.forward

    def recording_forward(self: Any, features: Any, *args: Any) -> Any:
        calls.append((threading.current_thread().name, len(features)))
        return original(self, features, *args)

    monkeypatch.setattr(BatchedInferencePipeline, "forward", recording_forward)
    audio, _reference = recording
    options = TranscribeOptions(language="en", batched=True)
    assert model.share() == 2
    _info, first = model.transcribe(audio, options)
    next(first)  # running alone: the first batch in two parts, on two threads at once
    assert len(calls) == 2 and len({name for name, _n in calls}) == 2
    calls.clear()
    _info, second = model.transcribe(audio, options)
    next(second)
    assert model.share() == 1
    assert len(calls) == 1 and calls[0][1] <= fw.CHUNKS_PER_REPLICA  # one part: one replica
    first.close()
    second.close()
    assert model.share() == 2


def test_short_audio_stays_sequential(
    model: fw.FasterWhisperModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("one window of audio must not go through the batched pipeline")

    monkeypatch.setattr(fw.FasterWhisperModel, "_transcribe_batched", fail)
    from tests.conftest import CLIPS

    audio = _read(CLIPS / "jfk.wav")
    assert wer(JFK_TEXT, text_of(model, audio, batched=True)) == 0


def test_batched_option() -> None:
    assert build_options(language=None, task=None).batched is True  # the default for files
    assert build_options(language=None, task=None, batched="false").batched is False
    assert build_options(language=None, task=None, batched="true").batched is True
    with pytest.raises(APIError):
        build_options(language=None, task=None, batched="maybe")
