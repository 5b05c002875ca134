"""faster-whisper (CTranslate2) engine — the default: int8 on CPU, one thread per worker.

The model is loaded as `workers` CTranslate2 replicas of `cpu_threads` threads each (one per
core by default); a call runs on whichever replica is free, and calls beyond the replicas wait
in CTranslate2's queue, so the cores are never oversubscribed.

Files (`TranscribeOptions.batched`, the default for files) are decoded by faster-whisper's
`BatchedInferencePipeline`. Silero VAD finds the speech and `speech_plan` cuts out only pauses of
2 s or more: shorter pauses stay in the audio decoded, because the VAD now and then scores a
soft word after a pause under its threshold (JFK's "ask" in "... Americans, ask not", lost when
every pause was cut out). The rest is cut into chunks of up to 30 s at the longest pause after
15 s, and chunks are decoded in batches. Each batch is split over the replicas the
transcription may use (`FasterWhisperModel.share`): all of them when it runs alone, an equal
share when several run at once, so concurrent jobs never oversubscribe the cores. Segments are
yielded batch by batch, as they are decoded. Two guards keep batched text at sequential quality:

- **dropped speech**: decoding a chunk without timestamps sometimes ends early (the model emits
  end-of-text after a change of voice and the rest of the chunk is lost). A chunk is decoded
  again with Whisper's sequential algorithm (timestamps, seeking past what was decoded), and
  the longer text wins, when its words (cross-attention alignment, one cheap decoder pass)
  leave more than `MAX_UNCOVERED` seconds of it uncovered, or when its text is much shorter
  for its speech than the recording's other chunks (tokens per second of speech);
- **loops**: a chunk whose text compresses too well (a repetition loop) is decoded again the
  same way.

Audio of 30 s or less (one window) is decoded sequentially: there is nothing to batch; so is
audio in which the VAD finds no speech (Whisper's own no-speech check decides).
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from faster_whisper import BatchedInferencePipeline
from faster_whisper.transcribe import restore_speech_timestamps
from faster_whisper.vad import VadOptions, get_speech_timestamps

from appliance.core.engines import windowed
from appliance.core.engines.base import (
    SAMPLE_RATE,
    Audio,
    Segment,
    TranscribeOptions,
    TranscriptionInfo,
    Word,
)

BATCHED_MIN_SECONDS = 30.0  # shorter audio is one Whisper window: decoded sequentially
# batch size = this x the replicas a job may use (`share`): on 2 cores, 4 per replica cost the
# same CPU as 2 (12.7 s vs 12.3 s for 8.5 minutes, 1: 14.0 s) and stream half as often
CHUNKS_PER_REPLICA = 2
# the beam of batched decoding: 2 gave the same WER as 5 on three long recordings (6.5, 8 and 5
# minutes, tiny.en: 2.2/1.9/1.3 %) for 13 % less CPU; greedy (1) lost 0.7-0.9 pt
BATCHED_BEAM_SIZE = 2
# the VAD (one thread per call) runs over the replicas a transcription may use, each on a part
# of the audio cut at its quietest 100 ms; parts shorter than this are not worth a thread
VAD_PART_SECONDS = 60.0
# VAD pieces for batched decoding: faster-whisper's batched defaults (160 ms of silence ends a
# piece of speech), 300 ms of padding; `speech_plan` joins pieces less than
# KEEP_PAUSE_SECONDS apart (measured on long_wav, the bench's 6.5 minutes and two more
# recordings, tiny.en: 1 s lost more words, 3 s gave higher WER; 2 s lost none)
VAD_PARAMETERS: dict[str, Any] = {"min_silence_duration_ms": 160, "speech_pad_ms": 300}
CHUNK_SECONDS = 30.0  # one Whisper window
MIN_CHUNK_SECONDS = 15.0  # a chunk ends at the longest pause between this and CHUNK_SECONDS
KEEP_PAUSE_SECONDS = 2.0  # pauses between VAD pieces shorter than this stay in the audio decoded
REDO_RATE = 0.75  # a chunk under 3/4 of the median tokens per second of speech is decoded again
REDO_MIN_SPEECH = 8.0  # seconds of speech a chunk needs before its rate is judged
# the kept audio has no pause over KEEP_PAUSE_SECONDS + 2 x 300 ms of padding: a longer stretch
# of a chunk without a word (word times are good to about 0.5 s) is speech the decode dropped
MAX_UNCOVERED = 3.5
LOOP_COMPRESSION = 2.4  # Whisper's compression_ratio_threshold: above it, a repetition loop


class FasterWhisperModel:
    decodes_in_batches = True

    def __init__(
        self,
        model_dir: Path,
        compute_type: str,
        cpu_threads: int,
        workers: int,
        device: str = "cpu",
        device_index: int = 0,
    ) -> None:
        from faster_whisper import WhisperModel

        self.replicas = max(1, workers)
        self._lock = threading.Lock()
        self._running = 0  # transcriptions being decoded now (they share the replicas)
        # num_workers lets `workers` threads transcribe with this one model at the same time.
        self._model = WhisperModel(
            str(model_dir),
            device=device,  # "cpu" or "cuda" (appliance.core.engines.device)
            device_index=device_index,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=workers,
            local_files_only=True,
        )

    @property
    def whisper(self) -> Any:
        """The faster-whisper `WhisperModel`, for callers that drive its lower-level API
        (live speech encodes short windows and decodes them itself)."""
        return self._model

    @property
    def is_multilingual(self) -> bool:
        return bool(self._model.model.is_multilingual)

    def share(self, starting: int = 0) -> int:
        """The replicas (cores) one transcription may use now: all of them when it runs
        alone, an equal share when several run at once (at least one). `starting`: more
        transcriptions about to run."""
        with self._lock:
            return max(1, self.replicas // max(1, self._running + starting))

    def _counted(self, segments: Iterator[Segment]) -> Iterator[Segment]:
        with self._lock:
            self._running += 1
        try:
            yield from segments
        finally:
            with self._lock:
                self._running -= 1

    def transcribe(
        self, audio: Audio, options: TranscribeOptions
    ) -> tuple[TranscriptionInfo, Iterator[Segment]]:
        long = options.batched and audio.shape[0] > BATCHED_MIN_SECONDS * SAMPLE_RATE
        spans, clips = speech_plan(audio, self.share(starting=1)) if long else ([], [])
        if spans:
            info, segments = self._transcribe_batched(audio, spans, clips, options)
        else:  # one window, sequential asked for, or no speech: Whisper's no-speech check
            info, segments = self._transcribe_sequential(audio, options)
        return info, self._counted(segments)

    def _transcribe_sequential(
        self, audio: Audio, options: TranscribeOptions
    ) -> tuple[TranscriptionInfo, Iterator[Segment]]:
        segments, info = self._model.transcribe(
            audio,
            language=options.language,
            task=options.task,
            word_timestamps=options.word_timestamps,
            vad_filter=options.vad_filter,
            initial_prompt=options.initial_prompt,
            hotwords=options.hotwords,
            temperature=options.temperature,
            beam_size=options.beam_size,
            condition_on_previous_text=options.condition_on_previous_text,
        )
        result = TranscriptionInfo(info.language, float(info.language_probability), info.duration)
        return result, (_segment(s) for s in segments)

    def _transcribe_batched(
        self,
        audio: Audio,
        spans: list[dict[str, int]],
        clips: list[dict[str, float]],
        options: TranscribeOptions,
    ) -> tuple[TranscriptionInfo, Iterator[Segment]]:
        kept = np.concatenate([audio[s["start"] : s["end"]] for s in spans])
        pipeline = _Pipeline(self._model, self.share)
        temperature = options.temperature
        first = temperature[0] if isinstance(temperature, tuple) else temperature
        segments, info = pipeline.transcribe(
            kept,
            language=options.language,
            task=options.task,
            word_timestamps=options.word_timestamps,
            initial_prompt=options.initial_prompt,
            hotwords=options.hotwords,
            temperature=first,  # the pipeline samples at one temperature only: no fallback
            beam_size=min(options.beam_size, BATCHED_BEAM_SIZE),
            vad_filter=False,
            clip_timestamps=clips,
            batch_size=CHUNKS_PER_REPLICA * self.share(starting=1),
        )
        duration = audio.shape[0] / SAMPLE_RATE
        result = TranscriptionInfo(info.language, float(info.language_probability), duration)
        restored = restore_speech_timestamps(segments, spans, SAMPLE_RATE)
        return result, (_segment(s) for s in restored)

    def close(self) -> None:
        self._model.model.unload_model()


def speech_plan(
    audio: Audio, parts: int = 1
) -> tuple[list[dict[str, int]], list[dict[str, float]]]:
    """What batched decoding decodes: `spans` of `audio` (samples) and `clips` (seconds).

    Silero VAD finds the pieces of speech; pieces less than `KEEP_PAUSE_SECONDS` apart are
    joined with the pause between them into one span, so only long pauses are cut out. The
    spans, one after the other, are "the kept audio"; `clips` cut it into chunks of at most
    `CHUNK_SECONDS`, each ending where a span ends or in the middle of a pause between two
    pieces (the longest pause after `MIN_CHUNK_SECONDS`: between sentences, most likely), so
    no audio between nearby speech is ever left out: the VAD scores a soft word after a pause
    (JFK's "ask" in "... Americans, ask not") now and then under its threshold, and cutting
    the pauses out would drop that word. The VAD runs in up to `parts` threads.
    """
    vad = VadOptions(**VAD_PARAMETERS, max_speech_duration_s=CHUNK_SECONDS)
    keep_pause = round(KEEP_PAUSE_SECONDS * SAMPLE_RATE)
    spans: list[dict[str, int]] = []
    cuts: list[tuple[int, int]] = []  # (where a chunk may end in the kept audio, pause there)
    kept = 0
    for piece in _speech_pieces(audio, vad, parts):
        start, end = int(piece["start"]), int(piece["end"])
        pause = start - spans[-1]["end"] if spans else 0
        if spans and pause < keep_pause:
            cuts.append((kept + pause // 2, pause))
            kept += pause + end - start
            spans[-1]["end"] = end
        else:
            if spans:
                cuts.append((kept, pause))
            spans.append({"start": start, "end": end})
            kept += end - start
    limit = round(CHUNK_SECONDS * SAMPLE_RATE)
    shortest = round(MIN_CHUNK_SECONDS * SAMPLE_RATE)
    clips: list[dict[str, float]] = []
    begin = 0
    while kept - begin > limit:
        # the longest pause in the chunk's last part (the latest of equals): between sentences
        fits = [(pause, at) for at, pause in cuts if begin + shortest <= at <= begin + limit]
        stop = max(fits)[1] if fits else begin + limit
        clips.append({"start": begin / SAMPLE_RATE, "end": stop / SAMPLE_RATE})
        begin = stop
    if kept > begin:
        clips.append({"start": begin / SAMPLE_RATE, "end": kept / SAMPLE_RATE})
    return spans, clips


def _speech_pieces(audio: Audio, vad: VadOptions, parts: int) -> list[dict[str, int]]:
    """Silero's pieces of speech (samples), found in up to `parts` threads at once (the VAD is
    one ONNX thread per call; the GIL is released there), each on a part of the audio that ends
    at its quietest 100 ms, so a cut lies in a pause, and `speech_plan` joins the pieces again
    when it does not."""
    total = int(audio.shape[0])
    parts = max(1, min(parts, int(total / (VAD_PART_SECONDS * SAMPLE_RATE))))
    if parts == 1:
        return list(get_speech_timestamps(audio, vad))
    source = windowed.ArraySamples(audio)
    size = total // parts
    bounds = [
        0,
        *(windowed.quiet_cut(source, i * size - size // 4, size // 4) for i in range(1, parts)),
        total,
    ]

    def find(i: int) -> list[dict[str, int]]:
        lo = bounds[i]
        found = get_speech_timestamps(audio[lo : bounds[i + 1]], vad)
        return [{"start": int(p["start"]) + lo, "end": int(p["end"]) + lo} for p in found]

    with ThreadPoolExecutor(parts, thread_name_prefix="vad") as pool:
        return [piece for part in pool.map(find, range(parts)) for piece in part]


class _Pipeline(BatchedInferencePipeline):  # type: ignore[misc]
    """faster-whisper's batched pipeline with each batch spread over the model's replicas and
    the dropped-speech and loop guards of the module docstring. One per transcription."""

    def __init__(self, model: Any, share: Callable[[], int]) -> None:
        super().__init__(model)
        self.share = share  # how many replicas a batch may be split over, asked per batch
        self.rates: list[float] = []  # tokens per second of speech of the chunks so far

    def forward(
        self, features: Any, tokenizer: Any, chunks_metadata: list[dict[str, Any]], options: Any
    ) -> list[list[dict[str, Any]]]:
        # word times (cross-attention alignment, one cheap decoder pass) show how much of each
        # chunk the text covers; they are dropped again unless the caller asked for them
        timed = (
            options
            if options.word_timestamps
            else dataclasses.replace(options, word_timestamps=True)
        )
        count = len(chunks_metadata)
        parts = min(self.share(), count)
        if parts <= 1:
            outputs: list[list[dict[str, Any]]] = BatchedInferencePipeline.forward(
                self, features, tokenizer, chunks_metadata, timed
            )
        else:
            bounds = [round(i * count / parts) for i in range(parts + 1)]

            def run(i: int) -> list[list[dict[str, Any]]]:
                lo, hi = bounds[i], bounds[i + 1]
                return list(
                    BatchedInferencePipeline.forward(
                        self, features[lo:hi], tokenizer, chunks_metadata[lo:hi], timed
                    )
                )

            # each part is one CTranslate2 call on a free replica (the GIL is released there)
            with ThreadPoolExecutor(parts, thread_name_prefix="batched") as pool:
                outputs = [out for part in pool.map(run, range(parts)) for out in part]
        # the batch's rates join the recording's before any chunk is judged
        speech = [float(meta["duration"]) for meta in chunks_metadata]
        tokens = [sum(len(s["tokens"]) for s in output) for output in outputs]
        self.rates.extend(
            t / d for t, d in zip(tokens, speech, strict=True) if d >= REDO_MIN_SPEECH
        )
        median = statistics.median(self.rates) if len(self.rates) >= 3 else 0.0
        checked = []
        for i, output in enumerate(outputs):
            short = (
                speech[i] >= REDO_MIN_SPEECH and tokens[i] < REDO_RATE * median * speech[i]
            ) or _uncovered(output, chunks_metadata[i]) > MAX_UNCOVERED
            looping = any(s["compression_ratio"] > LOOP_COMPRESSION for s in output)
            if not (short or looping):
                checked.append(output)
                continue
            redone = self._sequential(features[i], tokenizer, chunks_metadata[i], options)
            if looping and not short:
                # Whisper's own answer to a high compression ratio is to decode again; keep
                # that sequential redo even if it still repeats: speech can really repeat (a
                # chant, a clip played twice), and a true loop is cut back to 3 repetitions
                # by `windowed.guard`, which every file transcription passes through.
                checked.append(redone)
            else:  # speech looked dropped: the longer text wins
                longer = sum(len(s["tokens"]) for s in redone) > tokens[i]
                checked.append(redone if longer else output)
        return checked

    def _sequential(
        self, feature: Any, tokenizer: Any, meta: dict[str, Any], options: Any
    ) -> list[dict[str, Any]]:
        model = self.model
        frames = round(float(meta["duration"]) * model.frames_per_second) + 1
        redo = dataclasses.replace(
            options,
            without_timestamps=False,
            max_initial_timestamp=1.0,
            clip_timestamps=[],
            condition_on_previous_text=True,
            hallucination_silence_threshold=None,
        )
        offset = float(meta["offset"])
        seek = int(offset * model.frames_per_second)
        found = []
        for s in model.generate_segments(feature[:, :frames], tokenizer, redo, False):
            if not s.text.strip():
                continue
            item: dict[str, Any] = {
                "text": s.text,
                "avg_logprob": s.avg_logprob,
                "no_speech_prob": s.no_speech_prob,
                "tokens": list(s.tokens),
                "start": s.start + offset,
                "end": s.end + offset,
                "compression_ratio": s.compression_ratio,
                "seek": seek,
            }
            if options.word_timestamps:
                item["words"] = [
                    {**dataclasses.asdict(w), "start": w.start + offset, "end": w.end + offset}
                    for w in (s.words or ())
                ]
            found.append(item)
        return found


def _uncovered(output: list[dict[str, Any]], meta: dict[str, Any]) -> float:
    """The longest part of a chunk (seconds) that no decoded word lies in."""
    start = float(meta["offset"])
    end = start + float(meta["duration"])
    longest, covered = 0.0, start
    for segment in output:
        for word in segment.get("words") or ():
            longest = max(longest, float(word["start"]) - covered)
            covered = max(covered, float(word["end"]))
    return max(longest, end - covered)


def _segment(s: object) -> Segment:
    words = tuple(
        Word(float(w.start), float(w.end), w.word, float(w.probability))
        for w in (getattr(s, "words", None) or ())
    )
    return Segment(
        id=int(s.id) - 1,  # type: ignore[attr-defined]
        start=float(s.start),  # type: ignore[attr-defined]
        end=float(s.end),  # type: ignore[attr-defined]
        text=str(s.text),  # type: ignore[attr-defined]
        words=words,
        avg_logprob=float(s.avg_logprob),  # type: ignore[attr-defined]
        no_speech_prob=float(s.no_speech_prob),  # type: ignore[attr-defined]
        compression_ratio=float(s.compression_ratio),  # type: ignore[attr-defined]
        temperature=float(s.temperature or 0.0),  # type: ignore[attr-defined]
        tokens=tuple(s.tokens),  # type: ignore[attr-defined]
    )


class FasterWhisperEngine:
    name = "faster-whisper"

    def __init__(
        self,
        compute_type: str = "int8",
        cpu_threads: int = 1,
        workers: int = 1,
        device: str = "cpu",
        device_index: int = 0,
    ) -> None:
        self.compute_type = compute_type
        self.cpu_threads = cpu_threads
        self.workers = workers
        self.device = device
        self.device_index = device_index

    def load(self, model_dir: Path) -> FasterWhisperModel:
        return FasterWhisperModel(
            model_dir,
            self.compute_type,
            self.cpu_threads,
            self.workers,
            device=self.device,
            device_index=self.device_index,
        )
