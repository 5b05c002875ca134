"""The live core without a socket: streaming VAD, agreement, segmentation and decoding."""

from __future__ import annotations

import asyncio
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import pytest
from faster_whisper.vad import get_vad_model

from appliance.core.engines import create_engine
from appliance.core.engines.base import LoadedModel
from appliance.core.live.decoder import Decoder, Hypothesis
from appliance.core.live.session import (
    Agreement,
    LiveConfig,
    LiveSession,
    LiveTranscriber,
    pcm_to_float,
)
from appliance.core.live.vad import WINDOW, StreamingVad
from appliance.core.model_manager import ModelManager
from tests.conftest import JFK_TEXT


def read_pcm(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        return w.readframes(w.getnframes())


def normalize(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c in " '").split())


def wer(reference: str, hypothesis: str) -> float:
    return float(jiwer.wer(normalize(reference), normalize(hypothesis)))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedModel]:
    engine = create_engine("faster-whisper", compute_type="int8", cpu_threads=1, workers=1)
    manager = ModelManager(engine, tmp_path_factory.mktemp("models"))
    path = manager.locate("tiny.en")
    assert path is not None
    loaded = engine.load(path)
    yield loaded
    loaded.close()


def test_streaming_vad_matches_whole_file(jfk_wav: Path) -> None:
    audio = pcm_to_float(read_pcm(jfk_wav))
    audio = audio[: audio.size // WINDOW * WINDOW]
    whole = np.asarray(get_vad_model()(audio)).reshape(-1)
    vad = StreamingVad()
    pieces = [vad(audio[i : i + 3200]) for i in range(0, audio.size, 3200)]  # 200 ms frames
    streamed = np.concatenate(pieces)
    assert streamed.shape == whole.shape
    assert np.allclose(streamed, whole, atol=1e-5)
    assert (whole > 0.5).mean() > 0.5  # mostly speech


def test_agreement_commits_only_what_two_hypotheses_share() -> None:
    agreement = Agreement()
    assert agreement.update("And so") == ("", "And so")
    assert agreement.update("And so am I") == ("And so", "am I")
    # a later hypothesis that changes its mind about the tail keeps the committed words
    assert agreement.update("And so my fellow") == ("And so", "my fellow")
    assert agreement.update("And so my fellow Americans.") == ("And so my fellow", "Americans.")
    assert agreement.update("and so, my fellow Americans") == ("And so my fellow Americans", "")
    agreement.reset()
    assert agreement.update("Ask not") == ("", "Ask not")


def run_core(core: LiveTranscriber, pcm: bytes, frame: int = 6400) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for i in range(0, len(pcm), frame):
        messages += core.feed(pcm_to_float(pcm[i : i + frame]))
        while core.has_work():
            messages += core.step()
    core.close()
    while core.has_work():
        messages += core.step()
    return messages


def test_jfk_partials_then_finals(model: LoadedModel, jfk_wav: Path) -> None:
    pcm = bytes(16000) + read_pcm(jfk_wav) + bytes(32000)
    core = LiveTranscriber(Decoder(model, language="en", task="transcribe"))
    messages = run_core(core, pcm)
    partials = [m for m in messages if m["type"] == "partial"]
    finals = [m for m in messages if m["type"] == "final"]
    assert partials and finals
    # partials come while the utterance is still open, before its final
    first_final = messages.index(finals[0])
    assert any(messages.index(p) < first_final for p in partials)
    text = " ".join(f["text"] for f in finals)
    assert wer(JFK_TEXT, text) <= 0.15, text
    assert [f["utterance"] for f in finals] == sorted({f["utterance"] for f in finals})
    for final in finals:
        assert final["start"] < final["speech_end"] <= final["end"]
        assert final["words"], final
        assert final["start"] - 0.01 <= final["words"][0]["start"] <= final["words"][-1]["end"]
        assert final["words"][-1]["end"] <= final["end"] + 0.5
        assert final["processing_ms"] >= 0
    transcript = core.transcript()
    assert transcript.text == text
    assert transcript.duration == pytest.approx(len(pcm) / 32000, abs=0.01)
    assert core.timings()["decodes"] >= len(finals)


class ClippedFinals:
    """A decoder whose partials agree on words and whose finals come back empty (Whisper
    dropping a clipped word, the no-speech filter)."""

    language = "en"

    def __init__(self) -> None:
        self.finals = 0

    def decode(self, audio: Any, *, final: bool, words: bool | None = None, **_: Any) -> Any:
        if final:
            self.finals += 1
            return Hypothesis("", language="en")
        return Hypothesis("Ask not what", language="en")


def test_final_keeps_the_words_partials_promised(jfk_wav: Path) -> None:
    decoder = ClippedFinals()
    core = LiveTranscriber(decoder, LiveConfig(sentence_commits=False))  # type: ignore[arg-type]
    messages = run_core(core, bytes(16000) + read_pcm(jfk_wav) + bytes(32000))
    finals = [m for m in messages if m["type"] == "final"]
    assert finals and decoder.finals
    for final in finals:
        stable = [
            m["stable"]
            for m in messages[: messages.index(final)]
            if m["type"] == "partial" and m["utterance"] == final["utterance"]
        ]
        promised = stable[-1] if stable else ""
        assert final["text"].split()[: len(promised.split())] == promised.split(), final
    assert any(f["text"] == "Ask not what" for f in finals)
    # an empty speculation that lost promised words is not reused: the final is decoded
    assert not any(f["speculative"] for f in finals if f["text"])


def test_silence_produces_nothing(model: LoadedModel) -> None:
    core = LiveTranscriber(Decoder(model, language="en", task="transcribe"))
    noise = (np.random.default_rng(0).normal(0, 30, 16000 * 5)).astype("<i2").tobytes()
    messages = run_core(core, bytes(32000 * 3) + noise)
    assert [m for m in messages if m["type"] in ("partial", "final")] == []
    assert core.transcript().text == ""


def test_long_speech_is_split_at_max_utterance(model: LoadedModel, clips: Path) -> None:
    # three LibriVox utterances back to back, without pauses: longer than max_utterance
    pcm = b"".join(
        read_pcm(p)[: 16000 * 2 * 5] for p in sorted((clips / "librivox").glob("*.wav"))[:3]
    )
    config = LiveConfig(max_utterance_seconds=6.0, silence_seconds=2.0)
    core = LiveTranscriber(Decoder(model, language="en", task="transcribe"), config)
    finals = [m for m in run_core(core, pcm + bytes(16000 * 2 * 3)) if m["type"] == "final"]
    assert any(f["reason"] == "max_length" for f in finals)
    assert all(f["end"] - f["start"] <= 6.0 + 0.01 for f in finals)


async def test_session_skips_partials_when_behind_but_never_audio(
    model: LoadedModel, jfk_wav: Path
) -> None:
    """All audio at once: far behind real time, so no partials, `lag` reported, finals whole."""
    messages: list[dict[str, Any]] = []
    core = LiveTranscriber(Decoder(model, language="en", task="transcribe"))
    session = LiveSession(core, messages.append, max_lag_seconds=1.0)
    runner = asyncio.create_task(session.run())
    pcm = bytes(16000) + read_pcm(jfk_wav) + bytes(32000)
    for i in range(0, len(pcm), 6400):
        session.feed(pcm[i : i + 6400])
    session.stop()
    await asyncio.wait_for(runner, 120)
    kinds = [m["type"] for m in messages]
    assert "lag" in kinds
    assert kinds.index("lag") < kinds.index("final")
    assert "partial" not in kinds[: kinds.index("lag") + 1]
    text = " ".join(m["text"] for m in messages if m["type"] == "final")
    assert wer(JFK_TEXT, text) <= 0.15, text
    assert core.position * 2 == len(pcm)  # every sample reached the transcriber


class OpaqueModel:
    """An engine model that is not faster-whisper: the decoder must use `transcribe`."""

    decodes_in_batches = False

    def __init__(self, inner: LoadedModel) -> None:
        self.inner = inner

    @property
    def is_multilingual(self) -> bool:
        return self.inner.is_multilingual

    def transcribe(self, audio: Any, options: Any) -> Any:
        return self.inner.transcribe(audio, options)

    def close(self) -> None:
        pass


def test_other_engines_go_through_transcribe(model: LoadedModel, jfk_wav: Path) -> None:
    audio = pcm_to_float(read_pcm(jfk_wav))
    generic = Decoder(OpaqueModel(model), language=None, task="transcribe")
    fast = Decoder(model, language=None, task="transcribe")
    assert fast.fast and not generic.fast
    final = generic.decode(audio, final=True)
    assert wer(JFK_TEXT, final.text) <= 0.15, final.text
    assert final.words and final.language == "en"
    assert wer(final.text, fast.decode(audio, final=True).text) <= 0.15
    partial = generic.decode(audio[: 16000 * 3], final=False)
    assert partial.text and not partial.words
