"""Decoding one live utterance: fast for partials, with word timings for finals.

A live utterance is short (≤ `LIVE_MAX_UTTERANCE_SECONDS`), and Whisper's encoder normally
runs on a 30 s window whatever the audio length — most of the cost of a decode. With the
faster-whisper engine the encoder is run on a shorter window instead (the utterance plus a
margin, at least `MIN_CONTEXT_SECONDS`): below ~10 s tiny models start to repeat themselves,
above it the text matched the 30 s decode on the bundled clips at about a third of the cost.
A decode that still looks degenerate (repetitive, or hitting the token limit) is redone on
the full window. Other engines go through the generic `LoadedModel.transcribe`.

Calls are blocking; the live session runs them in a worker thread.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appliance.engines.base import SAMPLE_RATE, Audio, LoadedModel, TranscribeOptions, Word

MIN_CONTEXT_SECONDS = 10.0
CONTEXT_MARGIN_SECONDS = 1.0
FULL_CONTEXT_FRAMES = 3000  # 30 s of 10 ms mel frames
FRAMES_PER_SECOND = 100
TOKENS_PER_SECOND = 10  # generous: speech is ~3-5 tokens/s; bounds runaway repetition
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.\u3002,\uff0c!\uff01?\uff1f:\uff1a\u201d)]}\u3001"
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
COMPRESSION_RATIO_THRESHOLD = 2.4


@dataclass
class Hypothesis:
    """What one decode of an utterance produced (times relative to the utterance start)."""

    text: str
    words: list[Word] = field(default_factory=list)
    language: str = ""
    seconds: float = 0.0
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0


def compression_ratio(text: str) -> float:
    data = text.encode()
    return len(data) / max(1, len(zlib.compress(data)))


class Decoder:
    """Decodes utterances with one loaded model, one call at a time per live session."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        language: str | None,
        task: str,
        final_beam_size: int = 5,
        partial_beam_size: int = 1,
    ) -> None:
        self.model = model
        self.language = language
        self.task = task
        self.final_beam_size = final_beam_size
        self.partial_beam_size = partial_beam_size
        self._whisper = _faster_whisper_model(model)
        self._tokenizers: dict[str, Any] = {}

    @property
    def fast(self) -> bool:
        return self._whisper is not None

    def decode(self, audio: Audio, *, final: bool) -> Hypothesis:
        started = time.perf_counter()
        if self._whisper is not None:
            hyp = self._decode_short(audio, final=final)
        else:
            hyp = self._decode_generic(audio, final=final)
        hyp.seconds = time.perf_counter() - started
        if hyp.no_speech_prob > NO_SPEECH_THRESHOLD and hyp.avg_logprob < LOGPROB_THRESHOLD:
            hyp.text, hyp.words = "", []  # Whisper's made-up text for noise
        return hyp

    # --- generic engines ---------------------------------------------------------------------
    def _decode_generic(self, audio: Audio, *, final: bool) -> Hypothesis:
        options = TranscribeOptions(
            language=self.language,
            task="translate" if self.task == "translate" else "transcribe",
            word_timestamps=final,
            temperature=0.0,
            beam_size=self.final_beam_size if final else self.partial_beam_size,
            condition_on_previous_text=False,
        )
        info, segments = self.model.transcribe(audio, options)
        parts = list(segments)
        words = [w for s in parts for w in s.words]
        text = "".join(s.text for s in parts).strip()
        no_speech = min((s.no_speech_prob for s in parts), default=0.0)
        logprob = min((s.avg_logprob for s in parts), default=0.0)
        return Hypothesis(text, words, info.language, 0.0, no_speech, logprob)

    # --- faster-whisper: encoder on a short window ---------------------------------------------
    def _tokenizer(self, language: str) -> Any:
        tokenizer = self._tokenizers.get(language)
        if tokenizer is None:
            from faster_whisper.tokenizer import Tokenizer

            whisper = self._whisper
            assert whisper is not None
            tokenizer = Tokenizer(
                whisper.hf_tokenizer,
                whisper.model.is_multilingual,
                task=self.task,
                language=language,
            )
            self._tokenizers[language] = tokenizer
        return tokenizer

    def _decode_short(self, audio: Audio, *, final: bool) -> Hypothesis:
        whisper = self._whisper
        assert whisper is not None
        features = whisper.feature_extractor(audio)
        frames = int(features.shape[-1])
        seconds = audio.size / SAMPLE_RATE
        window = int(max(MIN_CONTEXT_SECONDS, seconds + CONTEXT_MARGIN_SECONDS) * FRAMES_PER_SECOND)
        hyp = self._generate(features, frames, min(window, FULL_CONTEXT_FRAMES), seconds, final)
        degenerate = (
            compression_ratio(hyp.text) > COMPRESSION_RATIO_THRESHOLD or hyp.avg_logprob < -1.5
        )
        if degenerate and not final:
            return Hypothesis("", language=hyp.language)  # skip this partial; the next may do
        if degenerate and window < FULL_CONTEXT_FRAMES:
            hyp = self._generate(features, frames, FULL_CONTEXT_FRAMES, seconds, final)
        return hyp

    def _generate(
        self, features: Any, frames: int, window: int, seconds: float, final: bool
    ) -> Hypothesis:
        from faster_whisper.transcribe import get_suppressed_tokens, merge_punctuations

        whisper = self._whisper
        assert whisper is not None
        padded = np.zeros((features.shape[0], window), dtype=np.float32)
        used = min(frames, window)
        padded[:, :used] = features[:, :used]
        encoded = whisper.encode(padded)
        language = self.language
        if language is None:
            if whisper.model.is_multilingual:
                ranked = whisper.model.detect_language(encoded)[0]
                language = str(ranked[0][0])[2:-2]
            else:
                language = "en"
        tokenizer = self._tokenizer(language)
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        max_new = int(seconds * TOKENS_PER_SECOND) + 16
        result = whisper.model.generate(
            encoded,
            [prompt],
            beam_size=self.final_beam_size if final else self.partial_beam_size,
            max_length=min(whisper.max_length, len(prompt) + max_new),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        text = str(tokenizer.decode(tokens)).strip()
        avg_logprob = float(result.scores[0]) * len(tokens) / (len(tokens) + 1) if tokens else 0.0
        if len(tokens) >= max_new:
            avg_logprob = min(avg_logprob, -2.0)  # ran into the limit: most likely a loop
        words: list[Word] = []
        if final and tokens:
            alignment = whisper.find_alignment(tokenizer, [tokens], encoded, used)[0]
            merge_punctuations(alignment, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS)
            words = [
                Word(
                    round(float(w["start"]), 2),
                    round(float(w["end"]), 2),
                    str(w["word"]),
                    round(float(w["probability"]), 3),
                )
                for w in alignment
                if w["word"]
            ]
        return Hypothesis(
            text=text,
            words=words,
            language=language,
            no_speech_prob=float(result.no_speech_prob),
            avg_logprob=avg_logprob,
        )


def _faster_whisper_model(model: LoadedModel) -> Any:
    """The faster-whisper `WhisperModel` behind an engine model, if that is what it is."""
    try:
        from faster_whisper import WhisperModel
    except ImportError:  # pragma: no cover - faster-whisper is a core dependency
        return None
    inner = getattr(model, "whisper", None)
    return inner if isinstance(inner, WhisperModel) else None
