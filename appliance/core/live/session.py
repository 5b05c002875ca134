"""Live transcription without a socket: VAD segmentation, re-decoding, agreement, back-pressure.

`LiveTranscriber` is the core. Audio goes in with `feed` (16 kHz float32, with the wall time
it arrived); Silero VAD opens an utterance at speech and closes it after `silence_seconds` of
silence or at `max_utterance_seconds`. While an utterance grows it is re-decoded (greedy, no
word timings) into `partial` messages; a closed one is decoded with beam search and word
timings into a `final`. Work is planned per slot (`plan`), decoded outside the lock (`decode`,
blocking) and applied (`complete`):

- slot `main`: the oldest closed utterance (finals never wait behind partials), else a
  *speculative final* once the speaker has paused `speculate_after_seconds`: if the pause
  lasts until the utterance closes, that decode is the final, so the final arrives about when
  the silence is confirmed instead of one decode later;
- slot `partial`: a partial when enough new audio came in — skipped while finals are behind
  (`lag_seconds`) or audio waits: audio is never dropped, partials are what gives way.

Sentence commits (the local-agreement policy of whisper_streaming): partials and speculations
are decoded with word timings; when two successive decodes of the open utterance agree on a
prefix that ends a sentence and the newer one has words after it, the utterance is cut after
it: the sentence is closed (reason `sentence`) and decoded like any final (beam search, word
timings), and the utterance goes on from the cut as a new one, whose final decodes are given
the last `context_seconds` before the cut (audio and text, `decoder.Context`). Long
conversational turns, whose pauses are too short to close an utterance, thus get their finals
sentence by sentence instead of at the `max_utterance` cut.

Degrading under load: when finals fall `degrade_lag_seconds` behind (before `lag`), the
session sets `degraded` for a while: finals are decoded greedily instead of with beam search,
a sentence commit's final is its agreed decode (no decode more) and partials come half as
often.

`step` runs one planned decode synchronously (tests). `LiveSession` drives a transcriber from
asyncio: `feed` is called by whoever receives audio; `run` feeds the VAD and decodes in worker
threads (so speech ends are seen while a decode runs) and hands messages to `emit`. By default
one decode runs at a time: measured on a busy 2-core machine, a partial decoding beside the
speculative final slowed the final more than starting it at once gained (`parallel=True`
allows it). Tests and the bench drive it directly; `/ws/live` is a thin wrapper around it.
"""

from __future__ import annotations

import asyncio
import bisect
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.core.engines.base import SAMPLE_RATE, Segment, Transcript, Word
from appliance.core.live.decoder import Context, Decoder, Hypothesis
from appliance.core.live.vad import WINDOW, StreamingVad
from appliance.exceptions import ApplianceError

Message = dict[str, Any]
Samples = npt.NDArray[np.float32]


@dataclass(frozen=True)
class LiveConfig:
    """Segmentation and scheduling knobs (seconds unless named otherwise)."""

    silence_seconds: float = 0.5
    max_utterance_seconds: float = 15.0
    threshold: float = 0.5
    neg_threshold: float = 0.35
    speech_pad_seconds: float = 0.2
    pre_roll_seconds: float = 0.3
    min_speech_seconds: float = 0.25
    first_partial_seconds: float = 0.5
    partial_interval_seconds: float = 0.7
    speculate_after_seconds: float = 0.06
    split_search_seconds: float = 3.0
    sentence_commits: bool = True
    sentence_min_seconds: float = 0.8  # no sentence final shorter than this
    sentence_any_gap_seconds: float = 6.0  # past this, cut at a word gap the VAD did not see
    context_seconds: float = 3.0  # audio + text before a sentence cut given to the decodes after


PAUSE_REACH = 16  # windows (0.5 s)


def _sec(samples: int) -> float:
    return round(samples / SAMPLE_RATE, 3)


_NORMALIZE = re.compile(r"[^\w']+")


def _norm(word: str) -> str:
    return _NORMALIZE.sub("", word.lower())


SENTENCE_ENDS = (".", "?", "!", "\u3002", "\uff1f", "\uff01")
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "prof"})


def _ends_sentence(word: str) -> bool:
    word = word.strip().rstrip("\"')\u201d")
    if not word.endswith(SENTENCE_ENDS) or _norm(word) in ABBREVIATIONS:
        return False
    return not (len(_norm(word)) == 1 and word.endswith("."))  # an initial: "J."


class Agreement:
    """Stable-prefix agreement: words two successive hypotheses agree on are committed.

    Committed words are shown as stable and never taken back while the utterance lasts, so
    the partial text grows instead of flickering; the final replaces it all.
    """

    def __init__(self) -> None:
        self.committed: list[str] = []
        self._previous: list[str] | None = None

    @property
    def previous(self) -> list[str] | None:
        """The words of the previous hypothesis."""
        return self._previous

    def seed(self, words: list[str]) -> None:
        """Start over with `words` as the previous hypothesis (the rest after a commit)."""
        self.committed = []
        self._previous = words or None

    def update(self, text: str) -> tuple[str, str]:
        words = text.split()
        if self._previous is not None:
            agreed = 0
            for a, b in zip(self._previous, words, strict=False):
                if _norm(a) != _norm(b):
                    break
                agreed += 1
            if agreed > len(self.committed):
                self.committed += words[len(self.committed) : agreed]
        self._previous = words
        rest = words[len(self.committed) :]
        return " ".join(self.committed), " ".join(rest)

    def reset(self) -> None:
        self.committed = []
        self._previous = None


@dataclass
class Utterance:
    index: int
    start: int  # absolute sample (with pre-roll)
    last_speech_end: int
    voiced: int = 0
    last_partial_end: int = 0
    partials: int = 0
    probs: list[tuple[int, float]] = field(default_factory=list)  # (window end, probability)
    speculation: tuple[int, Hypothesis] | None = None  # (speech end it covered, result)
    speculating: int | None = None  # speech end of the speculative decode running now
    partial_running: bool = False
    context: Context | None = None  # what was said before it (it starts at a sentence cut)


@dataclass
class Closed:
    index: int
    start: int
    end: int
    speech_end: int
    reason: str
    audio: Samples
    partials: int
    speculation: Hypothesis | None = None
    arrived: float | None = None  # wall time the audio up to speech_end had arrived
    stable: tuple[str, ...] = ()  # words the partials committed (promised) before the close
    due: int | None = None  # sample from which it counts as behind (default: speech_end)
    context: Context | None = None

    @property
    def lag_from(self) -> int:
        return self.speech_end if self.due is None else self.due


@dataclass
class DecodeJob:
    """One decode planned by `LiveTranscriber.plan`: a partial, a speculation or a final."""

    kind: str
    audio: Samples
    utterance: Utterance | None = None
    closed: Closed | None = None
    end: int = 0
    speech_end: int = 0
    arrived: float | None = None  # wall time the audio up to `end` had arrived
    words: bool = False  # word timings (for sentence commits)
    beam_size: int | None = None  # None: the decoder's default for the kind
    context: Context | None = None  # for finals and speculations after a sentence cut


@dataclass
class Final:
    """One finished utterance, as kept for the history entry."""

    index: int
    start: float
    end: float
    text: str
    words: list[Word]
    language: str


class LiveTranscriber:
    """The synchronous core of a live session; one thread at a time may call it."""

    def __init__(
        self, decoder: Decoder, config: LiveConfig | None = None, vad: StreamingVad | None = None
    ) -> None:
        self.decoder = decoder
        self.lock = threading.RLock()  # feed/plan/complete; decodes run outside it
        self.config = config or LiveConfig()
        self.vad = vad or StreamingVad()
        self.position = 0  # samples fed so far
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # absolute sample of _buffer[0]
        self._vad_position = 0  # samples the VAD has consumed
        self._arrival_samples: list[int] = []
        self._arrival_times: list[float] = []
        self.utterance: Utterance | None = None
        self.closed: deque[Closed] = deque()
        self.agreement = Agreement()
        self.finals: list[Final] = []
        self.latencies: list[float] = []
        self.processing_seconds = 0.0
        self.decodes = 0
        self._next_index = 0
        self._last_partial_seconds = 0.0
        self._finals_running: dict[int, int] = {}  # speech end -> utterance index
        self._running_due: dict[int, int] = {}  # speech end -> `Closed.lag_from`
        self.language = decoder.language or ""
        self.degraded = False  # set by the driver under load: greedy finals, fewer partials
        self.degraded_decodes = 0
        self.sentence_finals = 0

    # --- audio in ---------------------------------------------------------------------------
    def feed(self, samples: Samples, arrived: float | None = None) -> list[Message]:
        """Add audio; returns `vad` messages. Cheap (VAD only), never decodes."""
        with self.lock:
            return self._feed(samples, time.monotonic() if arrived is None else arrived)

    def _feed(self, samples: Samples, arrived: float) -> list[Message]:
        self._buffer = np.concatenate([self._buffer, samples.astype(np.float32, copy=False)])
        self.position += samples.size
        self._arrival_samples.append(self.position)
        self._arrival_times.append(arrived)
        messages: list[Message] = []
        probs = self.vad(samples)
        for prob in probs:
            self._vad_position += WINDOW
            messages.extend(self._window(self._vad_position, float(prob)))
        self._trim()
        return messages

    def _window(self, end: int, prob: float) -> list[Message]:
        cfg = self.config
        utt = self.utterance
        if utt is None:
            if prob < cfg.threshold:
                return []
            start = max(self._buffer_start, end - WINDOW - int(cfg.pre_roll_seconds * SAMPLE_RATE))
            utt_index = self._next_index
            self.utterance = Utterance(utt_index, start, end, WINDOW, start)
            self.utterance.probs.append((end, prob))
            self._next_index += 1
            self.agreement.reset()
            return [
                {"type": "vad", "speech": True, "at": _sec(end - WINDOW), "utterance": utt_index}
            ]
        utt.probs.append((end, prob))
        was_speech = utt.last_speech_end == end - WINDOW
        if prob >= cfg.threshold or (was_speech and prob >= cfg.neg_threshold):
            utt.last_speech_end = end
            utt.voiced += WINDOW
        if end - utt.last_speech_end >= cfg.silence_seconds * SAMPLE_RATE:
            self._close("silence", utt.last_speech_end + int(cfg.speech_pad_seconds * SAMPLE_RATE))
            at = _sec(utt.last_speech_end)
            return [{"type": "vad", "speech": False, "at": at, "utterance": utt.index}]
        if end - utt.start >= cfg.max_utterance_seconds * SAMPLE_RATE:
            self._split(end)
        return []

    def _split(self, end: int) -> None:
        """An utterance ran too long: cut at the quietest window of its last seconds."""
        utt = self.utterance
        assert utt is not None
        search_from = end - int(self.config.split_search_seconds * SAMPLE_RATE)
        candidates = [(p, e) for e, p in utt.probs if e >= search_from and e < end]
        cut = min(candidates)[1] if candidates else end
        self._close("max_length", cut, speech_end=min(utt.last_speech_end, cut))
        self.utterance = Utterance(self._next_index, cut, end, end - cut, cut)
        self.utterance.probs = [(e, p) for e, p in utt.probs if e > cut]
        self._next_index += 1
        self.agreement.reset()

    def _close(self, reason: str, end: int, speech_end: int | None = None) -> None:
        utt = self.utterance
        assert utt is not None
        self.utterance = None
        end = min(end, self.position)
        speech_end = utt.last_speech_end if speech_end is None else speech_end
        if utt.voiced < self.config.min_speech_seconds * SAMPLE_RATE and not utt.partials:
            return  # a click or a breath, not speech
        audio = self._slice(utt.start, end)
        speculation = None
        if utt.speculation is not None and utt.speculation[0] == speech_end:
            speculation = utt.speculation[1]
        self.closed.append(
            Closed(
                utt.index,
                utt.start,
                end,
                speech_end,
                reason,
                audio,
                utt.partials,
                speculation,
                self.arrival(speech_end),  # now: older arrival times are trimmed away
                tuple(self.agreement.committed),
                context=utt.context,
            )
        )

    def close(self) -> None:
        """End the current utterance now (the client pressed stop)."""
        with self.lock:
            utt = self.utterance
            if utt is not None:
                pad = int(self.config.speech_pad_seconds * SAMPLE_RATE)
                self._close("stop", utt.last_speech_end + pad)

    def _slice(self, start: int, end: int) -> Samples:
        a = max(0, start - self._buffer_start)
        b = max(a, end - self._buffer_start)
        return self._buffer[a:b].copy()

    def _trim(self) -> None:
        """Keep only the open utterance (or the pre-roll when nobody speaks)."""
        keep_from = self.position - int(self.config.pre_roll_seconds * SAMPLE_RATE) - WINDOW
        if self.utterance is not None:
            keep_from = min(keep_from, self.utterance.start)
        drop = keep_from - self._buffer_start
        if drop > 0:
            self._buffer = self._buffer[drop:]
            self._buffer_start = keep_from
        cut = bisect.bisect_left(self._arrival_samples, keep_from)
        if cut > 1:
            del self._arrival_samples[: cut - 1]
            del self._arrival_times[: cut - 1]

    def arrival(self, sample: int) -> float | None:
        """Wall time at which the audio up to `sample` had arrived."""
        i = bisect.bisect_left(self._arrival_samples, sample)
        if i >= len(self._arrival_samples):
            return None
        return self._arrival_times[i]

    # --- decoding ---------------------------------------------------------------------------
    def _speculation_due(self) -> bool:
        utt = self.utterance
        if utt is None or utt.voiced < self.config.min_speech_seconds * SAMPLE_RATE:
            return False
        paused = self._vad_position - utt.last_speech_end
        if paused < self.config.speculate_after_seconds * SAMPLE_RATE:
            return False
        if utt.speculating == utt.last_speech_end:
            return False  # being decoded
        return utt.speculation is None or utt.speculation[0] != utt.last_speech_end

    def _partial_due(self) -> bool:
        utt = self.utterance
        if utt is None or utt.partial_running:
            return False
        cfg = self.config
        if self.position - utt.start < cfg.first_partial_seconds * SAMPLE_RATE:
            return False
        if self._vad_position > utt.last_speech_end:
            # a pause may be starting: wait one frame rather than be mid-decode when the
            # speculative final (or the final) is due
            return False
        # slower decodes (a busy machine) space partials out, leaving the CPU to finals
        interval = max(cfg.partial_interval_seconds, 2 * self._last_partial_seconds)
        if self.degraded:
            interval *= 2
        elif self._sentence_pending(utt):
            # the last decode ended a sentence with words after it: confirm it soon
            interval = min(interval, cfg.first_partial_seconds)
        return self.position - utt.last_partial_end >= interval * SAMPLE_RATE

    def _sentence_pending(self, utt: Utterance) -> bool:
        previous = self.agreement.previous
        if not self.config.sentence_commits or not previous:
            return False
        return any(_ends_sentence(w) for w in previous[len(self.agreement.committed) : -1])

    def has_work(self, skip_partials: bool = False) -> bool:
        return bool(
            self.closed or self._speculation_due() or (not skip_partials and self._partial_due())
        )

    def settled(self, index: int) -> bool:
        """Whether utterances up to `index` are over: closed, and their finals emitted (or
        dropped: a click, an empty decode). Callers map their own units to utterances."""
        with self.lock:
            if self.utterance is not None and self.utterance.index <= index:
                return False
            if any(c.index <= index for c in self.closed):
                return False
            return all(i > index for i in self._finals_running.values())

    def lag_seconds(self) -> float:
        """How far finals are behind: audio since the oldest unfinished utterance ended,
        beyond the silence that had to pass anyway (about one decode time when keeping up)."""
        with self.lock:
            ends = [c.lag_from for c in self.closed] + list(self._running_due.values())
            if not ends:
                return 0.0
            behind = (self.position - min(ends)) / SAMPLE_RATE
            return max(0.0, behind - self.config.silence_seconds)

    def plan(self, kind: str) -> DecodeJob | None:
        """The next decode for a slot: `main` (finals, speculation) or `partial`.

        A planned job is marked as taken; hand its result to `complete`. The two slots may
        decode at the same time (in two threads), so a pause never waits for a partial.
        """
        with self.lock:
            utt = self.utterance
            if kind == "main":
                if self.closed:
                    closed = self.closed.popleft()
                    self._finals_running[closed.speech_end] = closed.index
                    self._running_due[closed.speech_end] = closed.lag_from
                    return DecodeJob(
                        "final",
                        closed.audio,
                        closed=closed,
                        beam_size=self._beam(),
                        context=closed.context,
                    )
                if utt is not None and self._speculation_due():
                    pad = int(self.config.speech_pad_seconds * SAMPLE_RATE)
                    end = min(utt.last_speech_end + pad, self.position)
                    utt.speculating = utt.last_speech_end
                    return DecodeJob(
                        "speculation",
                        self._slice(utt.start, end),
                        utterance=utt,
                        end=end,
                        speech_end=utt.last_speech_end,
                        arrived=self.arrival(end),
                        words=True,
                        beam_size=self._beam(),
                        context=utt.context,
                    )
                return None
            if utt is not None and self._partial_due():
                end = self.position
                utt.last_partial_end = end
                utt.partial_running = True
                return DecodeJob(
                    "partial",
                    self._slice(utt.start, end),
                    utterance=utt,
                    end=end,
                    arrived=self.arrival(end),
                )
            return None

    def _beam(self) -> int | None:
        """Greedy finals while degraded (counted), else the decoder's beam."""
        if self.degraded:
            self.degraded_decodes += 1
            return 1
        return None

    def decode(self, job: DecodeJob) -> Hypothesis:
        """Blocking; safe to run for a `main` and a `partial` job at once."""
        closed = job.closed
        if closed is not None and closed.speculation is not None:
            if not _falls_short(closed.speculation.text, closed.stable):
                return closed.speculation  # the speculative decode already is the final
            # the speculation saw less audio than the final (it starts before the pause's
            # padding has arrived) and lost promised words: decode the whole utterance
            closed.speculation = None
        extra = {} if job.context is None else {"context": job.context}
        return self.decoder.decode(
            job.audio,
            final=job.kind != "partial",
            words=job.words or job.kind == "final",  # a final carries word timings
            beam_size=job.beam_size,
            **extra,
        )

    def complete(self, job: DecodeJob, hyp: Hypothesis) -> list[Message]:
        with self.lock:
            if not (job.closed is not None and job.closed.speculation is hyp):
                self.processing_seconds += hyp.seconds
                self.decodes += 1
            if hyp.language:
                self.language = hyp.language
            if job.closed is not None:
                self._finals_running.pop(job.closed.speech_end, None)
                self._running_due.pop(job.closed.speech_end, None)
                return self._finalize(job.closed, hyp)
            utt = job.utterance
            assert utt is not None
            if job.kind == "partial":
                utt.partial_running = False
                self._last_partial_seconds = hyp.seconds
            else:
                utt.speculating = None
                if utt is not self.utterance:
                    # the pause became the end while decoding: this decode is its final
                    for closed in self.closed:
                        if closed.index == utt.index and closed.speech_end == job.speech_end:
                            closed.speculation = hyp
                    return []
                utt.speculation = (job.speech_end, hyp)
            if utt is not self.utterance:
                return []  # the utterance ended meanwhile: its final replaces this partial
            committed = self._commit_sentence(utt, hyp, job)
            hyp.align = None  # let the encoder output go
            if committed is not None:
                return committed
            return self._partial(utt, hyp, job.end, job.arrived)

    def _sentence_cut(self, utt: Utterance, last: Word, following: Word, end: int) -> int | None:
        """Where to cut after the sentence ending with `last`: the middle of the pause the VAD
        saw around the gap before `following` (the words' times come from cross-attention and
        are rough: cutting into a word loses it), else — in an utterance already long — the
        middle of the words' gap; else nowhere.

        The middle, not the quietest window (in digital silence any window, often one at the
        pause's edge): both pieces keep some of the pause at their edge, as at a silence close."""
        cfg = self.config
        lo = utt.start + int((last.end - 0.15) * SAMPLE_RATE)
        hi = utt.start + int((max(following.start, last.end) + 0.15) * SAMPLE_RATE)
        quiet = [(p, i) for i, (e, p) in enumerate(utt.probs) if lo <= e <= hi]
        cut: int | None = None
        if quiet and min(quiet)[0] < cfg.threshold:
            cut = self._pause_middle(utt, min(quiet)[1])
        elif (
            end - utt.start >= cfg.sentence_any_gap_seconds * SAMPLE_RATE
            and following.start - last.end >= 0.08
        ):
            cut = utt.start + int((last.end + following.start) / 2 * SAMPLE_RATE)
        if cut is None or not utt.start + WINDOW < cut < end:
            return None
        return cut

    def _pause_middle(self, utt: Utterance, at: int) -> int:
        """The middle of the run of non-speech windows around `utt.probs[at]` (at most
        `PAUSE_REACH` windows either side: a cut stays near the words it separates)."""
        probs, threshold = utt.probs, self.config.threshold
        first = last = at
        while at - first < PAUSE_REACH and first > 0 and probs[first - 1][1] < threshold:
            first -= 1
        while last - at < PAUSE_REACH and last + 1 < len(probs) and probs[last + 1][1] < threshold:
            last += 1
        return (probs[first][0] - WINDOW + probs[last][0]) // 2

    def _context(self, utt: Utterance, sentence: list[Word], cut: int) -> Context | None:
        """The last `context_seconds` of the committed sentence: its audio from the first word
        that starts in them up to the cut, and those words' text (see `decoder.Context`)."""
        reach = int(self.config.context_seconds * SAMPLE_RATE)
        if reach <= 0:
            return None
        for j, word in enumerate(sentence):
            begin = utt.start + int(word.start * SAMPLE_RATE)
            if begin >= cut - reach:
                text = "".join(w.word for w in sentence[j:]).strip()
                audio = self._slice(begin, cut)
                return Context(audio, text) if text and audio.size else None
        return None

    def _commit_sentence(
        self, utt: Utterance, hyp: Hypothesis, job: DecodeJob
    ) -> list[Message] | None:
        """Local agreement: the previous decode and this one agree on a prefix that ends a
        sentence, and this one goes on after it — emit that sentence as a final now and go on
        with the rest as a new utterance from the gap after it."""
        cfg = self.config
        previous = self.agreement.previous
        tokens = hyp.text.split()
        if not cfg.sentence_commits or not previous or len(tokens) < 2:
            return None
        if self.closed or self._finals_running:
            return None  # finals go out in order: an older one is still on its way
        agreed = 0
        for a, b in zip(previous, tokens, strict=False):
            if _norm(a) != _norm(b):
                break
            agreed += 1
        # sentence ends in the agreed prefix with a word after them, the latest first
        last = min(agreed, len(tokens) - 1) - 1
        ends = [k for k in range(last, -1, -1) if _ends_sentence(tokens[k])]
        if not ends:
            return None
        if not hyp.words and hyp.align is not None:
            hyp.words = hyp.align()  # word timings only for a decode that may commit
        words = hyp.words
        if [_norm(w.word) for w in words] != [_norm(t) for t in tokens]:
            return None  # the alignment split the text otherwise: no reliable times
        for k in ends:
            if words[k].end >= cfg.sentence_min_seconds:
                cut = self._sentence_cut(utt, words[k], words[k + 1], job.end)
                if cut is not None:
                    break
        else:
            return None
        speech_end = min(cut, utt.start + int(words[k].end * SAMPLE_RATE))
        # the agreed prefix only says where the sentence ends: its text comes from a final
        # decode of the audio up to the cut (beam search, as at any close), not from the
        # greedy partial, and it carries word timings — unless the session is degraded
        promised = len(self.agreement.committed)
        reuse = None
        if self.degraded:
            # under load the agreed decode is the final: no decode more for it (counted)
            self.degraded_decodes += 1
            limit = (cut - utt.start) / SAMPLE_RATE  # no word time past the cut
            kept = [
                Word(min(w.start, limit), min(w.end, limit), w.word, w.probability)
                for w in words[: k + 1]
            ]
            text = "".join(w.word for w in kept).strip()
            reuse = Hypothesis(text, kept, hyp.language, no_speech_prob=hyp.no_speech_prob)
        self.closed.append(
            Closed(
                utt.index,
                utt.start,
                cut,
                speech_end,
                "sentence",
                self._slice(utt.start, cut),
                utt.partials,
                reuse,
                arrived=self.arrival(speech_end),
                stable=tuple(self.agreement.committed[: min(promised, k + 1)]),
                # behind only from now: the agreement wait is not a backlog
                due=self.position - int(cfg.silence_seconds * SAMPLE_RATE),
                context=utt.context,
            )
        )
        self.sentence_finals += 1
        messages: list[Message] = []
        # the rest goes on as a new utterance from the cut (as at a `max_length` split)
        rest = Utterance(self._next_index, cut, utt.last_speech_end, 0, utt.last_partial_end)
        rest.probs = [(e, p) for e, p in utt.probs if e > cut]
        rest.voiced = sum(WINDOW for _, p in rest.probs if p >= cfg.neg_threshold)
        rest.context = self._context(utt, words[: k + 1], cut)
        self._next_index += 1
        self.utterance = rest
        remaining = [w.word.strip() for w in words[k + 1 :]]
        self.agreement.seed(remaining)
        if remaining:
            rest.partials += 1
            messages.append(
                {
                    "type": "partial",
                    "utterance": rest.index,
                    "text": " ".join(remaining),
                    "stable": "",
                    "unstable": " ".join(remaining),
                    "start": _sec(cut),
                    "audio_end": _sec(job.end),
                    "processing_ms": round(hyp.seconds * 1000),
                    "latency_ms": _ms(job.arrived),
                }
            )
        return messages

    def step(self, skip_partials: bool = False) -> list[Message]:
        """Run at most one decode (blocking) and return the messages it produced."""
        job = self.plan("main") or (None if skip_partials else self.plan("partial"))
        return [] if job is None else self.complete(job, self.decode(job))

    def _partial(
        self, utt: Utterance, hyp: Hypothesis, end: int, arrived: float | None
    ) -> list[Message]:
        if not hyp.text:
            return []
        utt.partials += 1
        stable, unstable = self.agreement.update(hyp.text)
        return [
            {
                "type": "partial",
                "utterance": utt.index,
                "text": hyp.text,
                "stable": stable,
                "unstable": unstable,
                "start": _sec(utt.start),
                "audio_end": _sec(end),
                "processing_ms": round(hyp.seconds * 1000),
                "latency_ms": _ms(arrived),
            }
        ]

    def _finalize(self, closed: Closed, hyp: Hypothesis) -> list[Message]:
        reused = closed.speculation is hyp
        if _falls_short(hyp.text, closed.stable):
            # a final never takes back words the partials promised as stable: an empty or
            # shorter decode (Whisper dropping a clipped word, the no-speech filter) keeps them
            hyp.text, hyp.words = " ".join(closed.stable), []
        if not hyp.text and not closed.partials:
            return []
        offset = closed.start / SAMPLE_RATE
        words = [
            Word(round(w.start + offset, 2), round(w.end + offset, 2), w.word, w.probability)
            for w in hyp.words
        ]
        latency = _ms(closed.arrived)
        if hyp.text:
            self.finals.append(
                Final(
                    closed.index,
                    _sec(closed.start),
                    _sec(closed.end),
                    hyp.text,
                    words,
                    hyp.language or self.language,
                )
            )
            if latency is not None:
                self.latencies.append(latency / 1000)
        return [
            {
                "type": "final",
                "utterance": closed.index,
                "text": hyp.text,
                "start": _sec(closed.start),
                "end": _sec(closed.end),
                "speech_end": _sec(closed.speech_end),
                "reason": closed.reason,
                "language": hyp.language or self.language,
                "words": [
                    {"word": w.word, "start": w.start, "end": w.end, "probability": w.probability}
                    for w in words
                ],
                "processing_ms": round(hyp.seconds * 1000),
                "speculative": reused,
                "latency_ms": latency,
            }
        ]

    # --- the result ---------------------------------------------------------------------------
    def transcript(self) -> Transcript:
        segments = [
            Segment(id=i, start=f.start, end=f.end, text=" " + f.text, words=tuple(f.words))
            for i, f in enumerate(self.finals)
        ]
        return Transcript(
            text=" ".join(f.text for f in self.finals),
            segments=segments,
            language=self.language or "en",
            duration=_sec(self.position),
        )

    def timings(self) -> dict[str, float]:
        out = {
            "audio_seconds": _sec(self.position),
            "processing_seconds": round(self.processing_seconds, 3),
            "decodes": float(self.decodes),
            "sentence_finals": float(self.sentence_finals),
            "degraded_decodes": float(self.degraded_decodes),
        }
        if self.latencies:
            ordered = sorted(self.latencies)
            out["final_latency_median"] = round(ordered[len(ordered) // 2], 3)
            out["final_latency_max"] = round(ordered[-1], 3)
        return out


def _ms(arrived: float | None) -> float | None:
    if arrived is None:
        return None
    return round((time.monotonic() - arrived) * 1000, 1)


def _falls_short(text: str, stable: tuple[str, ...]) -> bool:
    """Whether a final's `text` has fewer words than the stable words promised before it."""
    return len(text.split()) < len(stable)


def pcm_to_float(pcm: bytes) -> Samples:
    """PCM s16le bytes -> float32 in [-1, 1)."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


class BacklogError(ApplianceError):
    """More audio waits than the session may hold: the engine cannot keep up at all."""

    status, code = 503, "overloaded"


class LiveSession:
    """Drives a `LiveTranscriber` from asyncio: audio in with `feed`, messages out via `emit`.

    The event loop only appends bytes; VAD and decoding run in a worker thread. Past
    `degrade_lag_seconds` behind, the transcriber is `degraded` (greedy finals, fewer partials)
    for at least `degrade_hold_seconds`; when audio waits longer than `max_lag_seconds` the
    session stops decoding partials (finals still come) and reports `lag`; beyond
    `max_backlog_seconds` it gives up (`BacklogError`).
    """

    def __init__(
        self,
        transcriber: LiveTranscriber,
        emit: Callable[[Message], None],
        *,
        max_lag_seconds: float = 1.0,
        max_backlog_seconds: float = 60.0,
        parallel: bool = False,
        degrade_lag_seconds: float = 0.5,
        degrade_hold_seconds: float = 5.0,
    ) -> None:
        self.core = transcriber
        self.degrade_lag = degrade_lag_seconds
        self.degrade_hold = degrade_hold_seconds
        self._degraded_until = 0.0
        self.emit = emit
        self.parallel = parallel
        self.max_lag = max_lag_seconds
        self.max_backlog_bytes = int(max_backlog_seconds * SAMPLE_RATE * 2)
        self._inbox = bytearray()
        self._arrivals: list[tuple[int, float]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._aborted = False
        self._last_lag_report = 0.0
        self._flushes: list[asyncio.Future[None]] = []
        self.received_bytes = 0

    def feed(self, pcm: bytes) -> None:
        if len(pcm) % 2:
            raise ValueError("PCM frames must hold whole 16-bit samples")
        if len(self._inbox) + len(pcm) > self.max_backlog_bytes:
            raise BacklogError(
                f"the engine is more than {self.max_backlog_bytes // (SAMPLE_RATE * 2)} s behind"
            )
        self._inbox += pcm
        self.received_bytes += len(pcm)
        self._arrivals.append((len(self._inbox), time.monotonic()))
        self._wake.set()

    @property
    def backlog_seconds(self) -> float:
        return len(self._inbox) / (SAMPLE_RATE * 2)

    def stop(self) -> None:
        """Ask `run` to close the current utterance, emit every final and return."""
        self._closing = True
        self._wake.set()

    async def flush(self) -> None:
        """End the current utterance after the audio fed so far and return once its final (and
        every earlier one) is emitted; unlike `stop`, the session goes on. Feed nothing until
        this returns: that audio would land before the cut."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes.append(future)
        self._wake.set()
        await future

    def abort(self) -> None:
        """Ask `run` to return after the decode in progress, dropping what is left."""
        self._aborted = True
        self._wake.set()

    def _take(self) -> tuple[bytes, list[tuple[int, float]]]:
        pcm, arrivals = bytes(self._inbox), self._arrivals
        self._inbox.clear()
        self._arrivals = []
        return pcm, arrivals

    def _feed(self, pcm: bytes, arrivals: list[tuple[int, float]], flush: bool) -> list[Message]:
        messages: list[Message] = []
        done = 0
        for end, arrived in arrivals:
            messages += self.core.feed(pcm_to_float(pcm[done:end]), arrived)
            done = end
        if flush:
            self.core.close()
        return messages

    def _degrade(self, lag: float) -> None:
        """Greedy finals and fewer partials from `degrade_lag` behind, held for a while so
        that the session does not flip back and forth with every decode."""
        now = time.monotonic()
        if lag > self.degrade_lag:
            self._degraded_until = now + self.degrade_hold
        self.core.degraded = now < self._degraded_until

    async def run(self) -> None:
        """Feed audio, keep the two decode slots busy, emit; return after `stop` or `abort`."""
        slots: dict[str, tuple[asyncio.Task[Hypothesis], DecodeJob] | None] = {
            "main": None,
            "partial": None,
        }
        flushed = False
        cut = False  # a `flush` cut is fed: its finals are being decoded
        try:
            while not self._aborted:
                self._wake.clear()
                closing = self._closing
                flushing = bool(self._flushes)
                lag = max(self.backlog_seconds, self.core.lag_seconds())
                self._degrade(lag)
                skip = lag > self.max_lag or closing or flushing
                if lag > self.max_lag and time.monotonic() - self._last_lag_report >= 1.0:
                    self._last_lag_report = time.monotonic()
                    self.emit({"type": "lag", "seconds": round(lag, 2), "skipping_partials": True})
                if self._inbox or (closing and not flushed) or (flushing and not cut):
                    pcm, arrivals = self._take()
                    flushed, cut = closing, flushing
                    close = closing or flushing
                    for message in await asyncio.to_thread(self._feed, pcm, arrivals, close):
                        self.emit(message)
                    continue  # more audio may have come meanwhile: feed it before planning
                for kind in ("main", "partial"):
                    # a partial may still be decoding when a final starts, but none starts
                    # while a final is decoding: finals get the CPU first
                    if kind == "partial" and (skip or slots["main"] is not None):
                        continue
                    if not self.parallel and any(slots.values()):
                        break
                    if slots[kind] is None:
                        job = self.core.plan(kind)
                        if job is not None:
                            task = asyncio.create_task(asyncio.to_thread(self.core.decode, job))
                            slots[kind] = (task, job)
                running = [slot[0] for slot in slots.values() if slot is not None]
                if closing and flushed and not running and not self.core.has_work(True):
                    return
                if cut and not running and not self.core.has_work(True):
                    for future in self._flushes:
                        if not future.done():
                            future.set_result(None)
                    self._flushes.clear()
                    cut = False
                    continue
                woken = asyncio.create_task(self._wake.wait())
                await asyncio.wait([woken, *running], return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                for kind, slot in slots.items():
                    if slot is not None and slot[0].done():
                        slots[kind] = None
                        for message in self.core.complete(slot[1], slot[0].result()):
                            self.emit(message)
        finally:
            # a decode in a worker thread cannot be interrupted: wait for it to end, so the
            # caller may hand the model back
            running = [slot[0] for slot in slots.values() if slot is not None]
            if running:
                await asyncio.wait(running)
            for future in self._flushes:
                if not future.done():
                    future.set_exception(RuntimeError("the live session ended"))
