"""faster-whisper (CTranslate2) engine — the default: int8 on CPU, one thread per worker.

The model is loaded as `workers` CTranslate2 replicas of `cpu_threads` threads each (one per
core by default); a call runs on whichever replica is free, and calls beyond the replicas wait
in CTranslate2's queue, so the cores are never oversubscribed.

Files (`TranscribeOptions.batched`, the default) are decoded by faster-whisper's
`BatchedInferencePipeline`: Silero VAD cuts the speech into chunks of up to 30 s, and chunks are
decoded in batches. Each batch is split over every replica (`_Pipeline.forward`), so a lone job
uses every core while concurrent jobs share them through the queue. Segments are yielded batch
by batch, as they are decoded. Two guards keep batched text at sequential quality:

- **dropped speech**: decoding a chunk without timestamps sometimes ends early (the model emits
  end-of-text after a change of voice and the rest of the chunk is lost: 10 % WER instead of
  3.6 % on the bench's long recording). A chunk whose text is much shorter for its speech than
  the recording's other chunks (tokens per second of speech) is decoded again with Whisper's
  sequential algorithm (timestamps, seeking past what was decoded) and the longer text wins;
- **loops**: a chunk whose text compresses too well (a repetition loop) is decoded again the
  same way.

Audio of 30 s or less (one window) is decoded sequentially: there is nothing to batch.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from faster_whisper import BatchedInferencePipeline

from appliance.core.engines.base import (
    SAMPLE_RATE,
    Audio,
    Segment,
    TranscribeOptions,
    TranscriptionInfo,
    Word,
)

BATCHED_MIN_SECONDS = 30.0  # shorter audio is one Whisper window: decoded sequentially
CHUNKS_PER_REPLICA = 4  # batch size = this x the replicas a job may use
# VAD for batched decoding: faster-whisper's batched defaults (160 ms of silence ends a piece
# of speech) but 300 ms of padding instead of 400: on the bench recording 400 ms joined more
# voices per chunk and lost more speech (measured WER 10.4 % at 400, 1.6 % at 300, 3.9 % at 200)
VAD_PARAMETERS: dict[str, Any] = {"min_silence_duration_ms": 160, "speech_pad_ms": 300}
REDO_RATE = 0.75  # a chunk under 3/4 of the median tokens per second of speech is decoded again
REDO_MIN_SPEECH = 8.0  # seconds of speech a chunk needs before its rate is judged
LOOP_COMPRESSION = 2.4  # Whisper's compression_ratio_threshold: above it, a repetition loop


class FasterWhisperModel:
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

    def transcribe(
        self, audio: Audio, options: TranscribeOptions
    ) -> tuple[TranscriptionInfo, Iterator[Segment]]:
        if options.batched and audio.shape[0] > BATCHED_MIN_SECONDS * SAMPLE_RATE:
            return self._transcribe_batched(audio, options)
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
        self, audio: Audio, options: TranscribeOptions
    ) -> tuple[TranscriptionInfo, Iterator[Segment]]:
        pipeline = _Pipeline(self._model, self.replicas)
        temperature = options.temperature
        first = temperature[0] if isinstance(temperature, tuple) else temperature
        segments, info = pipeline.transcribe(
            audio,
            language=options.language,
            task=options.task,
            word_timestamps=options.word_timestamps,
            initial_prompt=options.initial_prompt,
            hotwords=options.hotwords,
            temperature=first,  # the pipeline samples at one temperature only: no fallback
            beam_size=options.beam_size,
            vad_filter=True,
            vad_parameters=dict(VAD_PARAMETERS),
            batch_size=CHUNKS_PER_REPLICA * self.replicas,
        )
        result = TranscriptionInfo(info.language, float(info.language_probability), info.duration)
        return result, (_segment(s) for s in segments)

    def close(self) -> None:
        self._model.model.unload_model()


class _Pipeline(BatchedInferencePipeline):  # type: ignore[misc]
    """faster-whisper's batched pipeline with each batch spread over the model's replicas and
    the dropped-speech and loop guards of the module docstring. One per transcription."""

    def __init__(self, model: Any, replicas: int) -> None:
        super().__init__(model)
        self.replicas = replicas
        self.rates: list[float] = []  # tokens per second of speech of the chunks so far

    def forward(
        self, features: Any, tokenizer: Any, chunks_metadata: list[dict[str, Any]], options: Any
    ) -> list[list[dict[str, Any]]]:
        count = len(chunks_metadata)
        parts = min(self.replicas, count)
        if parts <= 1:
            outputs: list[list[dict[str, Any]]] = BatchedInferencePipeline.forward(
                self, features, tokenizer, chunks_metadata, options
            )
        else:
            bounds = [round(i * count / parts) for i in range(parts + 1)]

            def run(i: int) -> list[list[dict[str, Any]]]:
                lo, hi = bounds[i], bounds[i + 1]
                return list(
                    BatchedInferencePipeline.forward(
                        self, features[lo:hi], tokenizer, chunks_metadata[lo:hi], options
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
            short = speech[i] >= REDO_MIN_SPEECH and tokens[i] < REDO_RATE * median * speech[i]
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
