"""Decoding one live utterance: fast for partials, with word timings for finals.

A live utterance is short (≤ `LIVE_MAX_UTTERANCE_SECONDS`), and Whisper's encoder normally
runs on a 30 s window whatever the audio length — most of the cost of a decode. With the
faster-whisper engine the encoder is run on a shorter window instead (the utterance plus a
margin, at least `MIN_CONTEXT_SECONDS`): below ~10 s tiny models start to repeat themselves,
above it the text matched the 30 s decode on the bundled clips at about a third of the cost.
A decode that still looks degenerate (repetitive, or hitting the token limit) is redone on
the full window. Other engines go through the generic `LoadedModel.transcribe`.

Batching: every live session has its own `Decoder`, but the decoders of one faster-whisper model
share a `BatchScheduler`. A decode submitted while another session's decode of the same shape
(encoder window, beam size, prompt) is waiting is run in the same CTranslate2 `encode` +
`generate` call: one batch for several sessions instead of one call after another. Batching is
opportunistic: at most `num_workers` batches run at once (one per CTranslate2 worker, each on
its `CPU_THREADS`), a decode that finds a worker free runs at once, and only decodes that queue
behind busy workers are merged — on a CPU, a batch of two on one core takes about as long as
two decodes side by side on two cores, so batching must never take the place of parallelism.
Finals go before partials in the queue.

Context: a decode right after a sentence cut may be given the last seconds of audio before
the cut and their (already committed) text. The audio is decoded with them in front, the text
forced as the start of the output, and only what follows is returned: the words after the cut
are heard in context. Without it tiny.en hears a word after a cut differently depending on
where in the pause the cut falls (measured: "ill-disposed" → "old-sposed" at 4-5 of 11 cut
points 64 ms apart; with 3 s of context at none).

Calls are blocking; the live session runs them in a worker thread.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appliance.core.engines.base import SAMPLE_RATE, Audio, LoadedModel, TranscribeOptions, Word

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
BATCH_COLLECT_SECONDS = 0.0  # a leader's wait for others (0: batch only what already queues)
MAX_BATCH = 8
WINDOW_QUANTUM_FRAMES = 200  # windows above the minimum round up to 2 s: more batch together


@dataclass(frozen=True)
class Context:
    """What was said just before the audio to decode: its samples and their text."""

    audio: Any  # float32 16 kHz
    text: str


@dataclass
class Hypothesis:
    """What one decode of an utterance produced (times relative to the utterance start)."""

    text: str
    words: list[Word] = field(default_factory=list)
    language: str = ""
    seconds: float = 0.0
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0
    # word timings on demand, for a decode made without them (a partial that may end a
    # sentence); holds the encoder output, so drop it once used
    align: Callable[[], list[Word]] | None = field(default=None, repr=False, compare=False)


def compression_ratio(text: str) -> float:
    data = text.encode()
    return len(data) / max(1, len(zlib.compress(data)))


_SERIALS = itertools.count()


@dataclass(eq=False)  # identity: `in` on pending lists must not compare arrays
class _Request:
    """One decode waiting for a batch: padded features and what to generate."""

    features: Any  # float32 (n_mels, window)
    prompt: list[int]
    beam_size: int
    max_new: int
    suppress: tuple[int, ...]
    priority: int = 1  # 0: a final (goes first), 1: a partial
    serial: int = field(default_factory=lambda: next(_SERIALS))
    done: bool = False
    result: Any = None
    encoded: Any = None  # this request's encoder output (a batch of one)
    error: BaseException | None = None

    @property
    def key(self) -> tuple[int, int, int, tuple[int, ...]]:
        return (int(self.features.shape[-1]), self.beam_size, len(self.prompt), self.suppress)


class BatchScheduler:
    """Runs the decodes of all live sessions of one model, batching those of the same shape.

    `submit` blocks until its request is decoded. The first request in line (finals before
    partials, then by arrival) leads when a worker slot is free: it waits `collect_seconds`
    (only when other sessions exist) for more requests, takes every pending one of its shape
    (up to `max_batch`), runs one `encode` + `generate` for them all and wakes their callers.
    The others wait, or lead the next batch when a slot frees up.
    """

    def __init__(
        self,
        whisper: Any,
        *,
        collect_seconds: float = BATCH_COLLECT_SECONDS,
        max_batch: int = MAX_BATCH,
        workers: int | None = None,
    ) -> None:
        # weak: the scheduler is kept per model in a WeakKeyDictionary, and must not keep its
        # model alive after the model manager let it go
        self._whisper = weakref.ref(whisper)
        self.collect_seconds = collect_seconds
        self.max_batch = max_batch
        self.workers = max(1, workers or int(getattr(whisper.model, "num_workers", 1) or 1))
        self.clients: weakref.WeakSet[Decoder] = weakref.WeakSet()
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._active = 0
        self.batches = 0
        self.batched_requests = 0  # requests that shared their batch with another

    def submit(self, request: _Request) -> _Request:
        with self._cond:
            self._pending.append(request)
            self._cond.notify_all()
        while True:
            with self._cond:
                while request in self._pending and (
                    self._active >= self.workers or self._first() is not request
                ):
                    self._cond.wait()
                if request not in self._pending:  # another leader took it
                    while not request.done:
                        self._cond.wait()
                    return self._finish(request)
                self._active += 1
            try:
                self._collect()
                with self._cond:
                    if request not in self._pending:
                        continue  # taken meanwhile: wait for it above (slot given back below)
                    key = request.key
                    batch = [request]
                    batch += [r for r in self._pending if r is not request and r.key == key]
                    batch = batch[: self.max_batch]
                    for r in batch:
                        self._pending.remove(r)
                self._run(batch)
                return self._finish(request)
            finally:
                with self._cond:
                    self._active -= 1
                    self._cond.notify_all()

    def _first(self) -> _Request:
        """The request next in line: finals first, then the oldest."""
        return min(self._pending, key=lambda r: (r.priority, r.serial))

    def _collect(self) -> None:
        """Give the other sessions' decodes a moment to join this batch."""
        if len(self.clients) > 1 and self.collect_seconds > 0:
            time.sleep(self.collect_seconds)

    @staticmethod
    def _finish(request: _Request) -> _Request:
        if request.error is not None:
            raise request.error
        return request

    def _run(self, batch: list[_Request]) -> None:
        try:
            whisper = self._whisper()
            if whisper is None:
                raise RuntimeError("the model was unloaded")
            results, encoded = run_batch(whisper, batch)
            for r, result, enc in zip(batch, results, encoded, strict=True):
                r.result, r.encoded = result, enc
        except BaseException as exc:  # every waiter must wake, with the error
            for r in batch:
                r.error = exc
        with self._cond:
            self.batches += 1
            if len(batch) > 1:
                self.batched_requests += len(batch)
            for r in batch:
                r.done = True
            self._cond.notify_all()


def run_batch(
    whisper: Any, batch: list[_Request], encoded: Any = None
) -> tuple[list[Any], list[Any]]:
    """One CTranslate2 encode (unless `encoded` is given) + generate for requests of one
    shape; per request the generate result and its own encoder output (for word alignment)."""
    import ctranslate2

    if encoded is None:
        features = np.stack([r.features for r in batch]).astype(np.float32, copy=False)
        encoded = whisper.encode(features)
    first = batch[0]
    longest = max(r.max_new for r in batch)
    results = whisper.model.generate(
        encoded,
        [r.prompt for r in batch],
        beam_size=first.beam_size,
        max_length=min(whisper.max_length, len(first.prompt) + longest),
        return_scores=True,
        return_no_speech_prob=True,
        suppress_blank=True,
        suppress_tokens=list(first.suppress),
    )
    if len(batch) == 1:
        return list(results), [encoded]
    array = np.asarray(encoded)
    pieces = [
        ctranslate2.StorageView.from_array(np.ascontiguousarray(array[i : i + 1]))
        for i in range(len(batch))
    ]
    return list(results), pieces


_SCHEDULERS: weakref.WeakKeyDictionary[Any, BatchScheduler] = weakref.WeakKeyDictionary()
_SCHEDULERS_LOCK = threading.Lock()


def scheduler_for(whisper: Any) -> BatchScheduler:
    """The one scheduler of a faster-whisper model (created on first use)."""
    with _SCHEDULERS_LOCK:
        scheduler = _SCHEDULERS.get(whisper)
        if scheduler is None:
            scheduler = _SCHEDULERS[whisper] = BatchScheduler(whisper)
        return scheduler


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
        batching: bool = True,
    ) -> None:
        self.model = model
        self.language = language
        self.task = task
        self.final_beam_size = final_beam_size
        self.partial_beam_size = partial_beam_size
        self._whisper = _faster_whisper_model(model)
        self._tokenizers: dict[str, Any] = {}
        self.scheduler: BatchScheduler | None = None
        if batching and self._whisper is not None:
            self.scheduler = scheduler_for(self._whisper)
            self.scheduler.clients.add(self)

    @property
    def fast(self) -> bool:
        return self._whisper is not None

    def decode(
        self,
        audio: Audio,
        *,
        final: bool,
        words: bool | None = None,
        beam_size: int | None = None,
        context: Context | None = None,
    ) -> Hypothesis:
        """`final`: a final (beam search, word timings) rather than a partial (greedy, text);
        `words` and `beam_size` override those defaults (a partial with word timings, a greedy
        final when the session is under load). `context`: see the module docstring
        (faster-whisper only; other engines decode the audio alone)."""
        started = time.perf_counter()
        with_words = final if words is None else words
        beam = beam_size or (self.final_beam_size if final else self.partial_beam_size)
        if self._whisper is not None:
            hyp = self._decode_short(audio, final, with_words, beam, context)
            if final and beam < self.final_beam_size and hyp.avg_logprob < LOGPROB_THRESHOLD:
                # a greedy final (the session is under load) that looks unsure: beam search
                # is worth its cost here, a lost sentence is worse than a late one
                hyp = self._decode_short(audio, final, with_words, self.final_beam_size, context)
        else:
            hyp = self._decode_generic(audio, words=with_words, beam=beam)
        hyp.seconds = time.perf_counter() - started
        if hyp.no_speech_prob > NO_SPEECH_THRESHOLD and hyp.avg_logprob < LOGPROB_THRESHOLD:
            hyp.text, hyp.words = "", []  # Whisper's made-up text for noise
        return hyp

    # --- generic engines ---------------------------------------------------------------------
    def _decode_generic(self, audio: Audio, *, words: bool, beam: int) -> Hypothesis:
        options = TranscribeOptions(
            language=self.language,
            task="translate" if self.task == "translate" else "transcribe",
            word_timestamps=words,
            temperature=0.0,
            beam_size=beam,
            condition_on_previous_text=False,
        )
        info, segments = self.model.transcribe(audio, options)
        parts = list(segments)
        found = [w for s in parts for w in s.words]
        text = "".join(s.text for s in parts).strip()
        no_speech = min((s.no_speech_prob for s in parts), default=0.0)
        logprob = min((s.avg_logprob for s in parts), default=0.0)
        return Hypothesis(text, found, info.language, 0.0, no_speech, logprob)

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

    def _decode_short(
        self, audio: Audio, final: bool, words: bool, beam: int, context: Context | None = None
    ) -> Hypothesis:
        whisper = self._whisper
        assert whisper is not None
        lead = 0.0
        if context is not None and context.text.strip() and context.audio.size:
            lead = context.audio.size / SAMPLE_RATE
            audio = np.concatenate([context.audio, audio]).astype(np.float32, copy=False)
        features = whisper.feature_extractor(audio)
        frames = int(features.shape[-1])
        seconds = audio.size / SAMPLE_RATE
        window = window_frames(seconds)
        args = (words, beam, final, context if lead else None)
        hyp = self._generate(features, frames, window, seconds, *args)
        degenerate = (
            compression_ratio(hyp.text) > COMPRESSION_RATIO_THRESHOLD or hyp.avg_logprob < -1.5
        )
        if degenerate and not final:
            return Hypothesis("", language=hyp.language)  # skip this partial; the next may do
        if degenerate and window < FULL_CONTEXT_FRAMES:
            hyp = self._generate(features, frames, FULL_CONTEXT_FRAMES, seconds, *args)
        if lead:
            hyp.words = [
                Word(
                    max(0.0, round(w.start - lead, 2)),
                    max(0.0, round(w.end - lead, 2)),
                    w.word,
                    w.probability,
                )
                for w in hyp.words
            ]
        return hyp

    def _generate(
        self,
        features: Any,
        frames: int,
        window: int,
        seconds: float,
        words: bool,
        beam: int,
        final: bool,
        context: Context | None = None,
    ) -> Hypothesis:
        from faster_whisper.transcribe import get_suppressed_tokens, merge_punctuations

        whisper = self._whisper
        assert whisper is not None
        padded = np.zeros((features.shape[0], window), dtype=np.float32)
        used = min(frames, window)
        padded[:, :used] = features[:, :used]
        language = self.language
        encoded = None
        if language is None:
            if whisper.model.is_multilingual:
                encoded = whisper.encode(padded)
                ranked = whisper.model.detect_language(encoded)[0]
                language = str(ranked[0][0])[2:-2]
            else:
                language = "en"
        tokenizer = self._tokenizer(language)
        prefix = tokenizer.encode(" " + context.text.strip()) if context is not None else []
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps, *prefix]
        max_new = int(seconds * TOKENS_PER_SECOND) + 16
        request = _Request(
            padded,
            prompt,
            beam,
            max_new,
            tuple(get_suppressed_tokens(tokenizer, [-1])),
            priority=0 if final else 1,
        )
        if self.scheduler is not None and encoded is None:
            self.scheduler.submit(request)
        else:
            results, outputs = run_batch(whisper, [request], encoded)
            request.result, request.encoded = results[0], outputs[0]
        result = request.result
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        if prefix and tokens[: len(prefix)] == prefix:
            tokens = tokens[len(prefix) :]  # the forced context text is not this decode's
        tokens = tokens[:max_new]
        text = str(tokenizer.decode(tokens)).strip()
        avg_logprob = float(result.scores[0]) * len(tokens) / (len(tokens) + 1) if tokens else 0.0
        if len(tokens) >= max_new:
            avg_logprob = min(avg_logprob, -2.0)  # ran into the limit: most likely a loop
        encoder_output = request.encoded

        def align() -> list[Word]:
            aligned = whisper.find_alignment(tokenizer, [prefix + tokens], encoder_output, used)
            alignment, seen = [], 0
            for w in aligned[0]:
                if seen >= len(prefix):  # the words of the context text are not returned
                    alignment.append(w)
                seen += len(w["tokens"])
            merge_punctuations(alignment, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS)
            return [
                Word(
                    round(float(w["start"]), 2),
                    round(float(w["end"]), 2),
                    str(w["word"]),
                    round(float(w["probability"]), 3),
                )
                for w in alignment
                if w["word"]
            ]

        hyp = Hypothesis(
            text=text,
            language=language,
            no_speech_prob=float(result.no_speech_prob),
            avg_logprob=avg_logprob,
        )
        if tokens and words:
            hyp.words = align()
        elif tokens:
            hyp.align = align
        return hyp


def window_frames(seconds: float) -> int:
    """The encoder window for `seconds` of audio: the audio plus a margin, at least
    `MIN_CONTEXT_SECONDS`, rounded up to `WINDOW_QUANTUM_FRAMES` so that utterances of similar
    length share a shape (and a batch), at most the full 30 s."""
    window = int(max(MIN_CONTEXT_SECONDS, seconds + CONTEXT_MARGIN_SECONDS) * FRAMES_PER_SECOND)
    window = -(-window // WINDOW_QUANTUM_FRAMES) * WINDOW_QUANTUM_FRAMES
    return min(window, FULL_CONTEXT_FRAMES)


def _faster_whisper_model(model: LoadedModel) -> Any:
    """The faster-whisper `WhisperModel` behind an engine model, if that is what it is."""
    try:
        from faster_whisper import WhisperModel
    except ImportError:  # pragma: no cover - faster-whisper is a core dependency
        return None
    inner = getattr(model, "whisper", None)
    return inner if isinstance(inner, WhisperModel) else None
