"""Long-form section of `make bench`: a recording of several minutes, decoded the ways the
service can decode a file, next to openai-whisper on the same file.

The recording is assembled from the real speech in `.cache/clips` (JFK and the five LibriVox
utterances, each with its reference text): the six clips in a new shuffled order per pass,
separated by pauses of 0.4-3 s of low noise (about -60 dBFS, a quiet room), now and then a long
pause (8-20 s, digital silence or noise), until it lasts `minutes`. The reference transcript is
the clips' texts in the same order. It repeats speech (38 s of it), so it measures speed and
dropped or invented words on long input, not accuracy on varied speech.

Configurations, each in its own `bench.worker` process per round (the engine's own threads;
both engines use every core):

- `faster-whisper sequential`: `WhisperModel.transcribe` (beam 5, temperature fallback,
  conditioned on the previous text), as the service decodes with `batched=false`;
- `faster-whisper batched`: the service's default file path (`batched=true`): Silero VAD
  chunks (pauses under 2 s kept) decoded in batches spread over every core
  (`appliance.core.engines.faster_whisper_engine`);
- `openai-whisper fp32`: the same model converted, `whisper.transcribe` inside the service's
  windowed path (Silero VAD removes the long pauses first, as it does for every engine);
- `openai-whisper fp32, own pipeline`: openai-whisper as its users run it, `whisper.transcribe`
  on the whole file with the `whisper` command's defaults (beam 5, best of 5, the temperature
  fallback, conditioned on the previous text, fp32 on CPU). This is the baseline of the 10x
  target (issue 13 measured openai-whisper this way); the windowed row shows how much of the
  ratio the service's VAD alone takes back from it.

The faster-whisper rows and `openai-whisper fp32` go through
`appliance.core.engines.windowed.transcribe`, the service's path.
Reported per configuration: seconds, x realtime, WER against the reference, segments past the
end of the audio. Ratios: batched vs openai-whisper, batched vs sequential.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import WORK, clips, wer

SAMPLE_RATE = 16_000
NATIVE = "openai-whisper fp32, own pipeline"
CONFIGS = ("faster-whisper sequential", "faster-whisper batched", "openai-whisper fp32", NATIVE)


def _read(path: Path) -> np.ndarray[Any, np.dtype[np.float32]]:
    with wave.open(str(path)) as w:
        if w.getframerate() != SAMPLE_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise SystemExit(f"{path}: expected 16 kHz mono 16-bit")
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return (data.astype(np.float32) / 32768.0).astype(np.float32)


def write_wav(path: Path, audio: np.ndarray[Any, np.dtype[np.float32]]) -> None:
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def assemble(
    minutes: float,
    *,
    seed: int = 13,
    long_pause_every: int = 4,
    long_pause: tuple[float, float] = (8.0, 20.0),
    tail_seconds: float = 0.0,
    noise: float = 0.001,
) -> tuple[np.ndarray[Any, np.dtype[np.float32]], str, list[tuple[float, float, str]]]:
    """Audio, reference text and the (start, end, text) of each spoken clip, `minutes` long or more.

    Deterministic for a seed. Every `long_pause_every`-th pause is long, alternately digital
    silence and low noise; `tail_seconds` of silence end the recording (where a decoder that
    hallucinates writes its tail). `noise` is the RMS of the noise in pauses (full scale 1).
    """
    rng = np.random.default_rng(seed)
    speech = [(_read(c.path), c.reference) for c in clips()]
    pieces: list[np.ndarray[Any, np.dtype[np.float32]]] = []
    texts: list[str] = []
    spans: list[tuple[float, float, str]] = []
    total, count = 0, 0
    target = round(minutes * 60 * SAMPLE_RATE)

    def pause(seconds: float, silent: bool) -> None:
        nonlocal total
        n = round(seconds * SAMPLE_RATE)
        filler = (
            np.zeros(n, np.float32)
            if silent
            else (rng.standard_normal(n) * noise).astype(np.float32)  # 0.001: about -60 dBFS
        )
        pieces.append(filler)
        total += n

    pause(0.5, False)
    while total < target:
        for index in rng.permutation(len(speech)):
            audio, text = speech[int(index)]
            spans.append((total / SAMPLE_RATE, (total + audio.shape[0]) / SAMPLE_RATE, text))
            pieces.append(audio)
            texts.append(text)
            total += audio.shape[0]
            count += 1
            if long_pause_every and count % long_pause_every == 0:
                pause(float(rng.uniform(*long_pause)), silent=count % (2 * long_pause_every) == 0)
            else:
                pause(float(rng.uniform(0.4, 3.0)), silent=False)
            if total >= target:
                break
    if tail_seconds:
        pause(tail_seconds, silent=True)
    return np.concatenate(pieces), " ".join(texts), spans


def recording(minutes: float = 6.0) -> tuple[Path, str]:
    """The bench's long recording, written once under `.cache/bench/`."""
    path = WORK / f"longform-{minutes:g}min.wav"
    ref = path.with_suffix(".txt")
    if not (path.is_file() and ref.is_file()):
        audio, text, _spans = assemble(minutes, tail_seconds=20.0)
        write_wav(path, audio)
        ref.write_text(text + "\n", encoding="utf-8")
    return path, ref.read_text(encoding="utf-8").strip()


# --- the worker: one configuration, one process ------------------------------------------------


def _worker(config: str, model_dir: str, audio_path: str, threads: int) -> dict[str, Any]:
    import time

    from appliance.core.engines import windowed
    from appliance.core.engines.base import TranscribeOptions

    audio = _read(Path(audio_path))
    duration = audio.shape[0] / SAMPLE_RATE
    t0 = time.perf_counter()
    if config.startswith("openai-whisper"):
        from appliance.core.engines.openai_whisper_engine import OpenAIWhisperEngine

        cache = WORK / "openai-cache"
        model: Any = OpenAIWhisperEngine(cpu_threads=threads, cache_dir=cache).load(Path(model_dir))
        options = TranscribeOptions(language="en")
    else:
        from appliance.core.engines.faster_whisper_engine import FasterWhisperEngine

        model = FasterWhisperEngine("int8", cpu_threads=1, workers=threads).load(Path(model_dir))
        batched = config.endswith("batched")
        options = TranscribeOptions(language="en", batched=batched)
    load_s = time.perf_counter() - t0
    c0, t1 = time.process_time(), time.perf_counter()
    if config == NATIVE:
        found = _native_openai_whisper(model, audio)
    else:
        _info, segments = windowed.transcribe(model, audio, options)
        found = list(segments)
    wall = time.perf_counter() - t1
    cpu = time.process_time() - c0
    model.close()
    return {
        "config": config,
        "load_s": load_s,
        "seconds": wall,
        "cpu_s": cpu,
        "duration": duration,
        "text": "".join(s.text for s in found).strip(),
        "segments": len(found),
        "past_end": sum(1 for s in found if s.end > duration + 1e-3),
        "last_end": max((s.end for s in found), default=0.0),
    }


def _native_openai_whisper(model: Any, audio: np.ndarray[Any, Any]) -> list[Any]:
    """`whisper.transcribe` on the whole recording with the `whisper` command's defaults."""
    segments: list[Any] = model.transcribe_whole(
        audio,
        language="en",
        beam_size=5,
        best_of=5,
        temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        condition_on_previous_text=True,
    )
    return segments


def run_config(config: str, model_dir: Path, audio: Path, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.longform",
                "--worker",
                config,
                str(model_dir),
                str(audio),
                str(threads),
                str(out),
            ],
            check=True,
        )
        result: dict[str, Any] = json.loads(out.read_text())
        return result


@dataclass
class LongformSection:
    """`make bench` section: sequential vs batched vs openai-whisper on one long recording."""

    threads: int
    model: str = "tiny.en"
    minutes: float = 6.0
    title: str = "Long-form recording (batched vs sequential vs openai-whisper)"

    def __post_init__(self) -> None:
        self.runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
        self.skipped: dict[str, str] = {}
        self.audio: Path | None = None
        self.reference = ""

    def setup(self, ctx: Any) -> None:
        from bench.common import model_dir

        self.audio, self.reference = recording(self.minutes)
        self.model_dir = model_dir(self.model)
        try:
            import whisper  # noqa: F401
        except ImportError:
            for config in ("openai-whisper fp32", NATIVE):
                self.skipped[config] = "openai-whisper is not installed"

    def run_round(self, ctx: Any, index: int) -> None:
        assert self.audio is not None
        for config in CONFIGS:
            if config in self.skipped or (config == NATIVE and index > 0):
                # openai-whisper's own pipeline runs once: it takes minutes (its temperature
                # fallback samples 5 candidates at up to 6 temperatures in every silent window)
                continue
            print(f"longform round {index + 1}: {config}", file=sys.stderr, flush=True)
            try:
                self.runs[config].append(
                    run_config(config, self.model_dir, self.audio, self.threads)
                )
            except subprocess.CalledProcessError as exc:
                self.skipped[config] = f"failed: {exc}"

    def best(self, config: str) -> dict[str, Any] | None:
        runs = self.runs.get(config) or []
        return min(runs, key=lambda r: r["seconds"]) if runs else None

    def report(self, ctx: Any) -> str:
        rows = []
        duration = 0.0
        for config in CONFIGS:
            best = self.best(config)
            if best is None:
                rows.append(f"| {config} | — | — | — | — | {self.skipped.get(config, '')} |")
                continue
            duration = best["duration"]
            error = wer([self.reference], [best["text"]])
            rows.append(
                f"| {config} | {best['seconds']:.1f} | {duration / best['seconds']:.1f}x | "
                f"{duration / best['cpu_s']:.1f}x | {error:.1f} % | {best['past_end']} |"
            )
        lines = [
            f"{self.model}, a {duration / 60:.1f}-minute recording assembled from the real clips "
            "(`bench/longform.py`: the six clips in shuffled passes, pauses of low noise and "
            "digital silence, 20 s of silence at the end), "
            f"{self.threads} core(s) for every engine, best of {len(self.runs[CONFIGS[0]])} "
            "round(s) (openai-whisper's own pipeline: one round). Every configuration but "
            "the last goes through the service's windowed path; the last is openai-whisper's "
            "own `transcribe` on the whole file with the `whisper` command's defaults.",
            "",
            "| configuration | seconds | x realtime | x realtime (CPU) | WER "
            "| segments past the end |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
        seq, bat, windowed_oai, oai = (self.best(c) for c in CONFIGS)
        if bat is not None:
            # verdicts on CPU time, as the other sections: other work on a shared machine
            # stretches wall time, not the CPU seconds a configuration needs
            verdicts = []
            cores = self.threads
            rt_wall = bat["duration"] / bat["seconds"]
            rt_cpu = bat["duration"] / (bat["cpu_s"] / cores)
            lines.append("")
            lines.append(
                f"- batched file path: **{rt_wall:.1f}x realtime** on the wall clock, "
                f"**{rt_cpu:.1f}x** from CPU time over {cores} core(s) (target ≥ 30x)"
            )
            verdicts.append(rt_cpu >= 30)
            if oai is not None:
                wall, cpu = _speedup(oai, bat)
                lines.append(
                    f"- batched vs openai-whisper (its own pipeline, the `whisper` command's "
                    f"defaults): **{wall:.1f}x faster** on the wall clock, **{cpu:.1f}x** in "
                    "CPU time (target ≥ 10x)"
                )
                verdicts.append(cpu >= 10)
            if windowed_oai is not None:
                wall, cpu = _speedup(windowed_oai, bat)
                lines.append(
                    f"- batched vs openai-whisper inside the service's windowed path (the VAD "
                    f"already removed the long pauses): {wall:.1f}x faster on the wall clock, "
                    f"{cpu:.1f}x in CPU time"
                )
            if seq is not None:
                bat_wer = wer([self.reference], [bat["text"]])
                seq_wer = wer([self.reference], [seq["text"]])
                wall, cpu = _speedup(seq, bat)
                lines.append(
                    f"- batched vs sequential: {wall:.1f}x faster "
                    f"(wall), {cpu:.1f}x (CPU); WER {bat_wer:.1f} % vs "
                    f"{seq_wer:.1f} % (target ≤ sequential + 1 pt)"
                )
                verdicts.append(bat_wer <= seq_wer + 1.0)
            # the service's rows only: openai-whisper's own pipeline is the baseline, not ours
            past = sum(r["past_end"] for c in CONFIGS if c != NATIVE for r in self.runs[c])
            lines.append(f"- segments past the end of the audio, all runs of the service: {past}")
            ctx.verdicts.append(("long-form", all(verdicts) and past == 0))
        return "\n".join(lines)

    def close(self) -> None:
        pass


def _speedup(slow: dict[str, Any], fast: dict[str, Any]) -> tuple[float, float]:
    """How many times faster `fast` ran than `slow`: on the wall clock, in CPU time."""
    return slow["seconds"] / fast["seconds"], slow["cpu_s"] / fast["cpu_s"]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        config, model_dir, audio, threads, out = argv[1:6]
        result = _worker(config, model_dir, audio, int(threads))
        Path(out).write_text(json.dumps(result))
        return 0
    raise SystemExit("run through `python -m bench.run --sections longform`")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
