"""One engine configuration in its own process, so its peak RSS is its own.

    python -m bench.worker --engine faster-whisper --compute-type int8 --threads 1 \
        --model tiny.en --out result.json

Loads the model, warms it up on the first clip, then decodes and transcribes every clip once
with the appliance's default options, and writes wall and CPU timings, texts and peak RSS as
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from appliance.core.audio import decode
from appliance.core.engines.base import SAMPLE_RATE, Engine, LoadedModel, TranscribeOptions
from bench.common import WORK, clips, model_dir


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries the
    parent's peak over fork + exec into it, so a child would report the bench's own torch."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def build_engine(name: str, compute_type: str, threads: int) -> Engine:
    if name == "faster-whisper":
        from appliance.core.engines.faster_whisper_engine import FasterWhisperEngine

        return FasterWhisperEngine(compute_type, cpu_threads=threads, workers=1)
    from appliance.core.engines.openai_whisper_engine import OpenAIWhisperEngine

    return OpenAIWhisperEngine(cpu_threads=threads, cache_dir=WORK / "openai-whisper")


def measure(model: LoadedModel, path: Path, name: str) -> dict[str, Any]:
    """Decode and transcribe one clip with the appliance's default options."""
    # Wall time is what a user waits; process CPU time (all threads) is what the work costs
    # and moves less when other jobs share the machine.
    t0, c0 = time.perf_counter(), time.process_time()
    audio = decode(path)
    t1, c1 = time.perf_counter(), time.process_time()
    _, segments = model.transcribe(audio, TranscribeOptions())
    text = "".join(s.text for s in segments).strip()
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "clip": name,
        "audio_s": audio.shape[0] / SAMPLE_RATE,
        "decode_s": t1 - t0,
        "transcribe_s": t2 - t1,
        "decode_cpu_s": c1 - c0,
        "transcribe_cpu_s": c2 - c1,
        "text": text,
    }


def encoder_cpu_s(model: LoadedModel, repeats: int = 3) -> float:
    """CPU seconds of one encoder pass over a 30 s window, the least work any clip costs: both
    engines pad every clip to 30 s, and auto-detecting the language encodes it once more."""
    import numpy as np

    silence = np.zeros(30 * SAMPLE_RATE, dtype=np.float32)
    whisper = getattr(model, "whisper", None)
    if whisper is not None:  # faster-whisper: CTranslate2
        features = whisper.feature_extractor(silence)[:, :3000]

        def encode() -> None:
            whisper.encode(features)
    else:  # openai-whisper: torch
        import torch
        import whisper as openai_whisper

        torch_model = model._model  # type: ignore[attr-defined]
        mel = openai_whisper.log_mel_spectrogram(silence, torch_model.dims.n_mels)[None]

        def encode() -> None:
            with torch.no_grad():
                torch_model.encoder(mel)

    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        encode()
        best = min(best, time.process_time() - c0)
    return best


def serve(model: LoadedModel) -> None:
    """--serve: one clip path per stdin line, one JSON result per stdout line (paired runs)."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    for line in sys.stdin:
        path = Path(line.strip())
        reply = measure(model, path, path.stem) if line.strip() else {"peak_rss_mb": peak_rss_mb()}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("faster-whisper", "openai-whisper"), required=True)
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serve", action="store_true", help="answer clip paths from stdin")
    args = parser.parse_args()

    engine = build_engine(args.engine, args.compute_type, args.threads)
    started = time.perf_counter()
    model = engine.load(model_dir(args.model))
    load_s = time.perf_counter() - started

    all_clips = clips()
    measure(model, all_clips[0].path, "warm-up")  # first-call costs (allocations, caches)
    if args.serve:
        serve(model)
        return
    if args.out is None:
        parser.error("--out is required without --serve")
    results = [measure(model, clip.path, clip.name) for clip in all_clips]
    encoder_s = encoder_cpu_s(model)
    passes = 2 if model.is_multilingual else 1  # + a language detection pass
    model.close()
    args.out.write_text(
        json.dumps(
            {
                "load_s": load_s,
                "peak_rss_mb": peak_rss_mb(),
                "clips": results,
                "encoder_cpu_s": encoder_s,
                "encoder_passes": passes,
            }
        ),
        encoding="utf-8",
    )


if __name__ == "__main__":
    main()
