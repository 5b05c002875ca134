"""Live at conversation speed (issue 13): sentence commits, batched decodes, degradation.

Functional checks only, on real speech with the bundled tiny.en — no timing assertions (the
latency targets are measured by `bench/liveload.py`).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import pytest

from appliance.core.engines import create_engine
from appliance.core.engines.base import LoadedModel
from appliance.core.live.decoder import BatchScheduler, Context, Decoder, Hypothesis
from appliance.core.live.session import LiveConfig, LiveSession, LiveTranscriber, pcm_to_float
from appliance.core.model_manager import ModelManager
from tests.conftest import JFK_TEXT

LIBRIVOX = sorted((Path(__file__).resolve().parent.parent / ".cache/clips/librivox").glob("*.wav"))


def read_pcm(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        return w.readframes(w.getnframes())


def trim(pcm: bytes) -> bytes:
    """The clip without its leading and trailing silence (20 ms frames under 1 % RMS)."""
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    frames = audio[: audio.size // 320 * 320].reshape(-1, 320)
    loud = np.flatnonzero(np.sqrt((frames**2).mean(axis=1)) > 0.01)
    return pcm[max(0, loud[0] - 2) * 640 : (loud[-1] + 3) * 640]


def normalize(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c in " '").split())


def wer(reference: str, hypothesis: str) -> float:
    return float(jiwer.wer(normalize(reference), normalize(hypothesis)))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedModel]:
    engine = create_engine("faster-whisper", compute_type="int8", cpu_threads=1, workers=2)
    manager = ModelManager(engine, tmp_path_factory.mktemp("models"))
    path = manager.locate("tiny.en")
    assert path is not None
    loaded = engine.load(path)
    yield loaded
    loaded.close()


def conversation(clips: Path) -> tuple[bytes, str]:
    """JFK and three LibriVox clips back to back with 0.25 s gaps: one long turn."""
    paths = [clips / "jfk.wav", *LIBRIVOX[:3]]
    gap = bytes(int(0.25 * 16000) * 2)
    pcm = bytes(16000) + b"".join(trim(read_pcm(p)) + gap for p in paths)
    references = [JFK_TEXT] + [p.with_suffix(".txt").read_text().strip() for p in LIBRIVOX[:3]]
    return pcm, " ".join(references)


def test_long_turn_gets_sentence_finals_before_it_ends(model: LoadedModel, clips: Path) -> None:
    pcm, reference = conversation(clips)
    # no pause is long enough to close the utterance, nor is it long enough to be cut
    config = LiveConfig(silence_seconds=2.0, max_utterance_seconds=28.0)
    core = LiveTranscriber(Decoder(model, language="en", task="transcribe"), config)
    streaming: list[dict[str, Any]] = []
    for i in range(0, len(pcm), 3200):
        streaming += core.feed(pcm_to_float(pcm[i : i + 3200]))
        while core.has_work():
            streaming += core.step()
    before_end = [m for m in streaming if m["type"] == "final"]
    assert before_end, "no final before the end of the turn"
    assert {m["reason"] for m in before_end} == {"sentence"}
    core.close()
    messages = list(streaming)
    while core.has_work():
        messages += core.step()
    finals = [m for m in messages if m["type"] == "final"]
    assert len(finals) > len(before_end)  # the rest of the turn at its end
    indices = [f["utterance"] for f in finals]
    assert indices == sorted(set(indices))  # in order, one final per utterance
    for previous, final in itertools.pairwise(finals):
        if previous["reason"] == "sentence":  # the rest goes on from the cut: nothing twice
            assert final["start"] == previous["end"]
    for final in before_end:
        assert final["text"].rstrip().endswith((".", "?", "!"))
        assert final["start"] < final["speech_end"] <= final["end"]
        assert final["words"] and final["words"][-1]["end"] <= final["end"] + 0.01
    text = " ".join(f["text"] for f in finals)
    assert wer(reference, text) <= 0.2, text
    assert core.transcript().text == text
    assert core.timings()["sentence_finals"] == len(before_end)


def test_sentence_commits_lose_and_repeat_no_word_at_the_cut(
    model: LoadedModel, clips: Path
) -> None:
    """Each sentence final is decoded (beam search, word timings) from the audio up to the
    cut, and the rest from the cut on: aligned against the reference, no word next to a cut is
    missing or there twice. The agreement wait is no backlog: committing does not raise lag."""
    pcm, reference = conversation(clips)
    config = LiveConfig(silence_seconds=2.0, max_utterance_seconds=28.0)
    core = LiveTranscriber(Decoder(model, language="en", task="transcribe"), config)
    messages: list[dict[str, Any]] = []
    lags: list[float] = []
    for i in range(0, len(pcm), 3200):
        messages += core.feed(pcm_to_float(pcm[i : i + 3200]))
        while core.has_work():
            queued = len(core.closed)
            messages += core.step()
            if len(core.closed) > queued:  # a sentence was just committed: its final is due
                lags.append(core.lag_seconds())
                assert core.utterance is not None  # the rest, heard after the sentence's end
                context = core.utterance.context
                assert context is not None and context.text.rstrip().endswith((".", "?", "!"))
                assert 0 < context.audio.size <= 3 * 16000
    core.close()
    while core.has_work():
        messages += core.step()
    assert lags and max(lags) == 0.0
    finals = [m for m in messages if m["type"] == "final"]
    assert any(f["reason"] == "sentence" for f in finals)
    for final in finals:  # finals carry word timings, inside their own audio
        assert final["words"], final
        assert final["start"] - 0.01 <= final["words"][0]["start"]
        assert final["words"][-1]["end"] <= final["end"] + 0.01
    texts = [normalize(f["text"]).split() for f in finals]
    cuts, hypothesis = [], []
    for words in texts[:-1]:
        hypothesis += words
        cuts.append(len(hypothesis))  # hypothesis index of the first word after the cut
    hypothesis += texts[-1]
    out = jiwer.process_words(normalize(reference), " ".join(hypothesis))
    bad_hyp, bad_ref = set(), set()  # hypothesis words inserted; ref positions deleted at
    for chunk in out.alignments[0]:
        if chunk.type == "insert":
            bad_hyp.update(range(chunk.hyp_start_idx, chunk.hyp_end_idx))
        elif chunk.type == "delete":
            bad_ref.update(range(chunk.ref_start_idx, chunk.ref_end_idx))
    ref_at = {}  # hypothesis index -> reference index, for the matched words
    for chunk in out.alignments[0]:
        if chunk.type in ("equal", "substitute"):
            for k in range(chunk.hyp_end_idx - chunk.hyp_start_idx):
                ref_at[chunk.hyp_start_idx + k] = chunk.ref_start_idx + k
    for cut in cuts:
        assert not bad_hyp & {cut - 1, cut}, (cut, hypothesis[cut - 2 : cut + 2])
        if cut - 1 in ref_at and cut in ref_at:
            # the words either side of the cut follow each other in the reference
            assert ref_at[cut] == ref_at[cut - 1] + 1, (cut, hypothesis[cut - 2 : cut + 2])
    assert wer(reference, " ".join(hypothesis)) <= 0.15  # hyphens and "Mr." count here


def test_degraded_sentence_final_is_the_agreed_decode(model: LoadedModel, clips: Path) -> None:
    """Under load a sentence's final costs no decode more: it is the agreed decode's text."""
    pcm, reference = conversation(clips)
    config = LiveConfig(silence_seconds=2.0, max_utterance_seconds=28.0)
    core = LiveTranscriber(Decoder(model, language="en", task="transcribe"), config)
    core.degraded = True
    messages: list[dict[str, Any]] = []
    for i in range(0, len(pcm), 3200):
        messages += core.feed(pcm_to_float(pcm[i : i + 3200]))
        while core.has_work():
            messages += core.step()
    sentences = [m for m in messages if m["type"] == "final" and m["reason"] == "sentence"]
    assert sentences
    for final in sentences:
        assert final["speculative"]  # reused, not decoded again
        assert final["processing_ms"] == 0
        assert final["text"].rstrip().endswith((".", "?", "!"))
        assert final["words"] and final["words"][-1]["end"] <= final["end"] + 0.01
    assert core.degraded_decodes >= len(sentences)
    core.close()
    while core.has_work():
        messages += core.step()
    text = " ".join(m["text"] for m in messages if m["type"] == "final")
    assert wer(reference, text) <= 0.2, text


def test_decode_after_a_cut_hears_the_sentence_before(model: LoadedModel, clips: Path) -> None:
    """Given the seconds before a cut (audio + text), a decode returns only the words after
    it, timed from its own start, the same wherever in the pause the cut falls: without the
    context tiny.en hears "ill-disposed" as "old-sposed" from some cut points."""
    pcm, _ = conversation(clips)
    audio = pcm_to_float(pcm)
    decoder = Decoder(model, language="en", task="transcribe", batching=False)
    rate = 16000
    start = 11 * rate  # "And Mr. John Dashwood ... for them. He was not an ill-disposed ..."
    whole = decoder.decode(audio[start : 26 * rate], final=True)
    names = [normalize(w.word) for w in whole.words]
    k = names.index("them")
    assert names[k + 1 : k + 4] == ["he", "was", "not"]
    gap_from = start + int(whole.words[k].end * rate)
    gap_to = start + int(whole.words[k + 1].start * rate)
    texts = set()
    for cut in np.linspace(gap_from, gap_to, 5).astype(int):
        before = [w for w in whole.words[: k + 1] if start + w.start * rate >= cut - 3 * rate]
        context = Context(
            audio[start + int(before[0].start * rate) : cut], "".join(w.word for w in before)
        )
        hyp = decoder.decode(audio[cut : 26 * rate], final=True, context=context)
        assert normalize(hyp.text).startswith("he was not an ill"), hyp.text
        assert "them" not in normalize(hyp.text)  # the context is not returned
        onset = (start + whole.words[k + 1].start * rate - cut) / rate  # "He", from the cut
        assert hyp.words[0].word.strip() == "He"
        assert abs(hyp.words[0].start - onset) <= 0.3
        texts.add(normalize(hyp.text))
    assert len(texts) == 1, texts


def test_sentence_commits_can_be_turned_off(model: LoadedModel, clips: Path) -> None:
    pcm, _ = conversation(clips)
    config = LiveConfig(silence_seconds=2.0, max_utterance_seconds=28.0, sentence_commits=False)
    core = LiveTranscriber(Decoder(model, language="en", task="transcribe"), config)
    messages: list[dict[str, Any]] = []
    for i in range(0, len(pcm), 6400):
        messages += core.feed(pcm_to_float(pcm[i : i + 6400]))
        while core.has_work():
            messages += core.step()
    assert not [m for m in messages if m["type"] == "final"]


class GatheringScheduler(BatchScheduler):
    """Collects until `size` requests wait, so the batch is deterministic in a test."""

    def __init__(self, whisper: Any, size: int) -> None:
        super().__init__(whisper, workers=1)
        self.size = size

    def _collect(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: len(self._pending) >= self.size, timeout=60)


@pytest.mark.parametrize("final", [False, True])
def test_batched_decodes_equal_one_by_one(model: LoadedModel, clips: Path, final: bool) -> None:
    # clips under 9 s: one encoder window (10 s), so one shape, one batch
    audios = [pcm_to_float(read_pcm(p)) for p in LIBRIVOX[:4]]
    alone = Decoder(model, language="en", task="transcribe", batching=False)
    assert alone.scheduler is None
    expected = [alone.decode(a, final=final) for a in audios]
    decoders = [Decoder(model, language="en", task="transcribe") for _ in audios]
    assert len({id(d.scheduler) for d in decoders}) == 1  # one scheduler per model
    scheduler = GatheringScheduler(model.whisper, len(audios))  # type: ignore[attr-defined]
    for decoder in decoders:
        decoder.scheduler = scheduler
        scheduler.clients.add(decoder)
    results: list[Hypothesis | None] = [None] * len(audios)

    def decode(i: int) -> None:
        results[i] = decoders[i].decode(audios[i], final=final)

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(audios))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert scheduler.batches == 1 and scheduler.batched_requests == len(audios)
    for want, got in zip(expected, results, strict=True):
        assert got is not None
        assert got.text == want.text
        assert [w.word for w in got.words] == [w.word for w in want.words]
        if final:
            assert got.words
            for a, b in zip(got.words, want.words, strict=True):
                assert (a.start, a.end) == pytest.approx((b.start, b.end), abs=0.02)


class NoModel:
    """Not a model: every batch fails."""


def test_batch_errors_reach_every_caller(model: LoadedModel, jfk_wav: Path) -> None:
    decoder = Decoder(model, language="en", task="transcribe")
    assert decoder.scheduler is not None
    no_model = NoModel()  # the scheduler holds its model weakly: keep it alive here
    broken = BatchScheduler(no_model, workers=1)
    decoder.scheduler = broken
    with pytest.raises(AttributeError):
        decoder.decode(pcm_to_float(read_pcm(jfk_wav)), final=False)
    assert broken._active == 0 and not broken._pending  # the slot is given back


async def test_degradation_engages_under_backlog(model: LoadedModel, clips: Path) -> None:
    """All the audio at once: far behind, so finals go greedy before `lag`; text still right."""
    pcm, reference = conversation(clips)
    messages: list[dict[str, Any]] = []
    core = LiveTranscriber(Decoder(model, language="en", task="transcribe"))
    session = LiveSession(core, messages.append, max_lag_seconds=1.0, degrade_lag_seconds=0.5)
    runner = asyncio.create_task(session.run())
    for i in range(0, len(pcm), 6400):
        session.feed(pcm[i : i + 6400])
    session.stop()
    await asyncio.wait_for(runner, 300)
    assert core.degraded_decodes > 0
    assert core.timings()["degraded_decodes"] == core.degraded_decodes
    text = " ".join(m["text"] for m in messages if m["type"] == "final")
    assert wer(reference, text) <= 0.25, text
    assert core.position * 2 == len(pcm)  # every sample reached the transcriber


def test_degraded_flag_follows_lag_with_a_hold(model: LoadedModel) -> None:
    core = LiveTranscriber(Decoder(model, language="en", task="transcribe"))
    session = LiveSession(core, lambda m: None, degrade_lag_seconds=0.5, degrade_hold_seconds=60)
    session._degrade(0.1)
    assert not core.degraded
    session._degrade(0.8)
    assert core.degraded
    session._degrade(0.0)
    assert core.degraded  # held: no flip-flop with every decode
    session.degrade_hold = 0.0
    session._degraded_until = 0.0
    session._degrade(0.0)
    assert not core.degraded
    # degraded: finals are planned greedy, and counted
    core.degraded = True
    assert core._beam() == 1 and core.degraded_decodes == 1
    core.degraded = False
    assert core._beam() is None
