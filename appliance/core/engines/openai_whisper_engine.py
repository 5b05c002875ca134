"""openai-whisper (torch, CPU) engine — the seed's engine, kept as an optional reference.

It runs the same CTranslate2 model directories as the default engine: on first load a model is
converted to an openai-whisper checkpoint (`appliance.core.engines.convert`) and cached.

Differences from faster-whisper that callers can see:
- `hotwords` is not supported and ignored (openai-whisper has no such option);
- `vad_filter` is implemented with faster-whisper's Silero VAD (`faster_whisper.vad`, a core
  dependency) exactly as faster-whisper applies it: transcribe the speech chunks joined, then
  map the timestamps back to the original audio;
- openai-whisper transcribes the whole clip in one call, so the segments are produced when the
  iterator is first advanced and then yielded together: progress jumps from 0 to 100%;
- one transcription at a time per model: openai-whisper's decoder installs forward hooks on the
  shared model for its kv-cache, so concurrent calls would corrupt each other.

torch and whisper are imported inside functions, so `import appliance.core.engines` stays light.
"""

from __future__ import annotations

import base64
import gzip
import importlib.util
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from appliance.core.engines.base import (
    SAMPLE_RATE,
    Audio,
    EngineUnavailableError,
    Segment,
    TranscribeOptions,
    TranscriptionInfo,
    Word,
)
from appliance.core.engines.convert import alignment_heads, converted_checkpoint

log = logging.getLogger(__name__)


def _import_whisper() -> Any:
    try:
        import whisper
    except ImportError as exc:
        raise EngineUnavailableError(
            "ENGINE=openai-whisper needs the optional extra: "
            "pip install 'whisper-appliance[openai-whisper]'"
        ) from exc
    return whisper


class OpenAIWhisperModel:
    decodes_in_batches = False  # whisper.transcribe: sequential windows only

    def __init__(self, model_dir: Path, cache_dir: Path | None = None) -> None:
        whisper = _import_whisper()
        self._whisper = whisper
        checkpoint = converted_checkpoint(model_dir, cache_dir)
        self.checkpoint = checkpoint
        self._model = whisper.load_model(str(checkpoint), device="cpu")
        self._model.eval()
        heads = alignment_heads(model_dir)
        if heads:
            self._set_alignment_heads(heads)
        # whisper reads its tiktoken vocabulary with open().read() and leaves the file to the
        # garbage collector (a ResourceWarning); load it once here, quietly. It is lru-cached.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            whisper.tokenizer.get_tokenizer(
                self._model.is_multilingual, num_languages=self._model.num_languages
            )
        self._lock = threading.Lock()

    def _set_alignment_heads(self, heads: list[tuple[int, int]]) -> None:
        """Word timestamps need the model's own alignment heads (the checkpoint lacks them)."""
        dims = self._model.dims
        mask = np.zeros((dims.n_text_layer, dims.n_text_head), dtype=bool)
        for layer, head in heads:
            mask[layer, head] = True
        # set_alignment_heads takes the same packed form as openai-whisper's _ALIGNMENT_HEADS.
        self._model.set_alignment_heads(base64.b85encode(gzip.compress(mask.tobytes())))

    @property
    def is_multilingual(self) -> bool:
        return bool(self._model.is_multilingual)

    def transcribe(
        self, audio: Audio, options: TranscribeOptions
    ) -> tuple[TranscriptionInfo, Iterator[Segment]]:
        if options.hotwords:
            log.debug("openai-whisper engine: hotwords are not supported, ignoring them")
        duration = audio.shape[0] / SAMPLE_RATE
        speech = audio
        chunks: list[dict[str, int]] | None = None
        if options.vad_filter:
            speech, chunks = _vad(audio)
        with self._lock:
            language, probability = self._language(speech, options.language)
        info = TranscriptionInfo(language, probability, duration)
        return info, self._segments(speech, chunks, language, options)

    def _language(self, audio: Audio, language: str | None) -> tuple[str, float]:
        if language is not None:
            return language, 1.0
        if not self._model.is_multilingual:
            return "en", 1.0
        import torch

        whisper = self._whisper
        mel = whisper.log_mel_spectrogram(
            whisper.pad_or_trim(audio[: whisper.audio.N_SAMPLES]), self._model.dims.n_mels
        )
        with torch.no_grad():
            _, probs = self._model.detect_language(mel)
        best = max(probs, key=probs.get)
        return str(best), float(probs[best])

    def _segments(
        self,
        audio: Audio,
        chunks: list[dict[str, int]] | None,
        language: str,
        options: TranscribeOptions,
    ) -> Iterator[Segment]:
        if audio.shape[0] == 0:  # the VAD found no speech
            return
        segments: Iterator[Segment] = iter(
            self.transcribe_whole(
                audio,
                language=language,
                task=options.task,
                word_timestamps=options.word_timestamps,
                initial_prompt=options.initial_prompt,
                temperature=options.temperature,
                condition_on_previous_text=options.condition_on_previous_text,
                beam_size=options.beam_size,
                best_of=5,  # faster-whisper's default for the sampling fallback
            )
        )
        if chunks is not None:
            segments = _restore_timestamps(segments, chunks)
        yield from segments

    def transcribe_whole(self, audio: Audio, **decode: Any) -> list[Segment]:
        """`whisper.transcribe` on `audio` as given (fp32 on the CPU), its options as keywords:
        this engine's one call into openai-whisper, and the long-form bench's baseline (the
        whole recording, no VAD, no windows, as openai-whisper's own users run it)."""
        with self._lock:
            result = self._whisper.transcribe(
                self._model, audio, verbose=None, fp16=False, **decode
            )
        return [_segment(s) for s in result["segments"]]

    def close(self) -> None:
        self._model = None


def _segment(s: dict[str, Any]) -> Segment:
    words = tuple(
        Word(float(w["start"]), float(w["end"]), str(w["word"]), float(w["probability"]))
        for w in s.get("words") or ()
    )
    return Segment(
        id=int(s["id"]),
        start=float(s["start"]),
        end=float(s["end"]),
        text=str(s["text"]),
        words=words,
        avg_logprob=float(s["avg_logprob"]),
        no_speech_prob=float(s["no_speech_prob"]),
        compression_ratio=float(s["compression_ratio"]),
        temperature=float(s["temperature"]),
        tokens=tuple(int(t) for t in s["tokens"]),
    )


def _vad(audio: Audio) -> tuple[Audio, list[dict[str, int]]]:
    """Keep the speech only, as faster-whisper's `vad_filter=True` does."""
    from faster_whisper.vad import VadOptions, collect_chunks, get_speech_timestamps

    chunks: list[dict[str, int]] = get_speech_timestamps(audio, VadOptions())
    pieces, _ = collect_chunks(audio, chunks)
    return np.concatenate(pieces).astype(np.float32, copy=False), chunks


def _restore_timestamps(
    segments: Iterator[Segment], chunks: list[dict[str, int]]
) -> Iterator[Segment]:
    """Map times in the VAD-joined audio back to the original (faster-whisper's algorithm)."""
    from dataclasses import replace

    from faster_whisper.vad import SpeechTimestampsMap

    ts_map = SpeechTimestampsMap(chunks, SAMPLE_RATE)
    for segment in segments:
        if segment.words:
            words = []
            for w in segment.words:
                index = ts_map.get_chunk_index((w.start + w.end) / 2)
                words.append(
                    replace(
                        w,
                        start=float(ts_map.get_original_time(w.start, index)),
                        end=float(ts_map.get_original_time(w.end, index)),
                    )
                )
            yield replace(segment, start=words[0].start, end=words[-1].end, words=tuple(words))
        else:
            yield replace(
                segment,
                start=float(ts_map.get_original_time(segment.start)),
                end=float(ts_map.get_original_time(segment.end, is_end=True)),
            )


class OpenAIWhisperEngine:
    """Loads CTranslate2 float16/float32 model directories into openai-whisper on the CPU."""

    name = "openai-whisper"

    def __init__(self, cpu_threads: int = 1, cache_dir: Path | None = None) -> None:
        # Fail at start-up (ENGINE=openai-whisper without the extra), not at the first job;
        # find_spec does not import torch.
        missing = [m for m in ("torch", "whisper") if importlib.util.find_spec(m) is None]
        if missing:
            raise EngineUnavailableError(
                f"ENGINE=openai-whisper needs {' and '.join(missing)}: "
                "pip install 'whisper-appliance[openai-whisper]'"
            )
        self.cpu_threads = cpu_threads
        self.cache_dir = cache_dir

    def load(self, model_dir: Path) -> OpenAIWhisperModel:
        _import_whisper()
        import torch

        # Process-wide in torch: the last engine built decides.
        torch.set_num_threads(max(1, self.cpu_threads))
        return OpenAIWhisperModel(model_dir, self.cache_dir)
