"""Batched decoding of long files (issue 13, item 1): `core.engines.faster_whisper_engine`.

On a real long recording (the real clips in shuffled passes with pauses, `bench.longform`) the
batched path must transcribe as well as sequential decoding (WER within 1 point), stream its
segments batch by batch, spread each batch over the model's replicas, and decode again a chunk
whose speech was dropped. Audio of one window or less keeps the sequential path.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from faster_whisper import BatchedInferencePipeline

import appliance.core.engines.faster_whisper_engine as fw
from appliance.core.engines import windowed
from appliance.core.engines.base import SAMPLE_RATE, Audio, TranscribeOptions
from appliance.core.model_manager import ModelManager
from appliance.web.api.options import build_options
from appliance.web.errors import APIError
from bench.longform import _read, assemble
from tests.conftest import JFK_TEXT
from tests.wer import wer


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


BATCHED = TranscribeOptions(language="en", batched=True)


def text_of(model: fw.FasterWhisperModel, audio: Audio, batched: bool) -> str:
    options = TranscribeOptions(language="en", batched=batched)
    _info, segments = windowed.transcribe(model, audio, options)
    return "".join(s.text for s in segments)


def test_batched_as_good_as_sequential(
    model: fw.FasterWhisperModel, recording: tuple[Audio, str]
) -> None:
    audio, reference = recording
    batched = wer(reference, text_of(model, audio, batched=True))
    sequential = wer(reference, text_of(model, audio, batched=False))
    assert batched <= sequential + 0.01, (batched, sequential)
    assert batched < 0.08


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
    assert build_options(language=None, task=None).batched is False  # opt-in for now
    assert build_options(language=None, task=None, batched="false").batched is False
    assert build_options(language=None, task=None, batched="true").batched is True
    with pytest.raises(APIError):
        build_options(language=None, task=None, batched="maybe")
