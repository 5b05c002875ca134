"""Speaker diarization (issue 15): DER and what it costs next to transcription.

Recordings with reference speaker turns (RTTM) from pyannote.audio's sdist (AMI meeting
excerpts, fetched by scripts/fetch_clips.py): `sample` (2 speakers), `dev00`, `dev01`
(2 speakers each), the same `sample` band-limited to 300-3400 Hz (a telephone line), and JFK
(one speaker, no RTTM: only the count is checked). DER with pyannote.metrics, 0.25 s collar,
overlapping speech scored. Cost: CPU seconds of diarization (VAD + embeddings + clustering)
over CPU seconds of transcription (tiny.en int8, one thread, word timestamps, beam 5) of the
same clip, per clip best of the rounds. Run alone: `python -m bench.diarize_bench` (replaces
this section of bench/results.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.common import CLIPS, ROOT, model_dir

SECTION = "## Diarization"
AMI = CLIPS / "diarization"
SPEAKER_NPZ = ROOT / ".cache" / "speaker" / "models" / "speaker-ge2e.npz"
TARGET_DER = 0.20
TARGET_COST = 0.30


@dataclass(frozen=True)
class Recording:
    name: str
    wav: Path
    rttm: Path | None
    uri: str
    speakers: int
    telephone: bool = False


RECORDINGS = (
    Recording("sample", AMI / "sample.wav", AMI / "sample.rttm", "sample", 2),
    Recording(
        "sample, telephone band",
        AMI / "sample.wav",
        AMI / "sample.rttm",
        "sample",
        2,
        telephone=True,
    ),
    Recording("dev00", AMI / "dev00.wav", AMI / "debug.development.rttm", "dev00", 2),
    Recording("dev01", AMI / "dev01.wav", AMI / "debug.development.rttm", "dev01", 2),
    Recording("jfk (one speaker)", CLIPS / "jfk.wav", None, "jfk", 1),
)


def telephone(audio: np.ndarray) -> np.ndarray:
    """300-3400 Hz band, as a telephone line passes it."""
    spectrum = np.fft.rfft(audio)
    freqs = np.fft.rfftfreq(len(audio), 1 / 16000)
    spectrum[(freqs < 300) | (freqs > 3400)] = 0
    return np.fft.irfft(spectrum, len(audio)).astype(np.float32)


def reference(rec: Recording) -> Any:
    from pyannote.core import Annotation
    from pyannote.core import Segment as Span

    ann = Annotation(uri=rec.uri)
    assert rec.rttm is not None
    for line in rec.rttm.read_text().splitlines():
        parts = line.split()
        if parts and parts[1] == rec.uri:
            ann[Span(float(parts[3]), float(parts[3]) + float(parts[4]))] = parts[7]
    return ann


def der(rec: Recording, turns: list[Any]) -> float | None:
    if rec.rttm is None:
        return None
    from pyannote.core import Annotation
    from pyannote.core import Segment as Span
    from pyannote.metrics.diarization import DiarizationErrorRate

    ref = reference(rec)
    hyp = Annotation(uri=rec.uri)
    for t in turns:
        hyp[Span(t.start, t.end)] = t.speaker
    metric = DiarizationErrorRate(collar=0.25)
    return float(metric(ref, hyp, uem=ref.get_timeline().extent()))


@dataclass
class Row:
    audio_s: float = 0.0
    transcribe_cpu: float = float("inf")
    diarize_cpu: float = float("inf")
    diarize_wall: float = float("inf")
    auto: tuple[int, float | None] = (0, None)  # speakers found, DER
    known: tuple[int, float | None] = (0, None)


@dataclass
class DiarizationSection:
    title: str = "Diarization"
    rows: dict[str, Row] = field(default_factory=dict)
    skipped: str | None = None
    _model: Any = None
    _encoder: Any = None

    def setup(self, ctx: Any) -> None:
        try:
            import pyannote.metrics  # noqa: F401
        except ImportError:
            self.skipped = "pyannote.metrics is not installed (a dev dependency)"
            return
        if not SPEAKER_NPZ.is_file() or not (AMI / "sample.rttm").is_file():
            self.skipped = "speaker model or diarization clips missing: run `make setup`"
            return
        from faster_whisper import WhisperModel

        from appliance.core import diarize

        self._encoder = diarize.SpeakerEncoder.load(SPEAKER_NPZ)
        self._model = WhisperModel(
            str(model_dir("tiny.en")), device="cpu", compute_type="int8", cpu_threads=1
        )

    def run_round(self, ctx: Any, index: int) -> None:
        if self.skipped:
            return
        from appliance.core import diarize
        from appliance.core.audio import decode

        for rec in RECORDINGS:
            audio = decode(rec.wav)
            if rec.telephone:
                audio = telephone(audio)
            row = self.rows.setdefault(rec.name, Row(audio_s=len(audio) / 16000))
            c0 = time.process_time()
            segments, _ = self._model.transcribe(audio, beam_size=5, word_timestamps=True)
            list(segments)
            row.transcribe_cpu = min(row.transcribe_cpu, time.process_time() - c0)
            c0, w0 = time.process_time(), time.perf_counter()
            turns = diarize.diarize(audio, encoder=self._encoder)
            row.diarize_cpu = min(row.diarize_cpu, time.process_time() - c0)
            row.diarize_wall = min(row.diarize_wall, time.perf_counter() - w0)
            row.auto = (len({t.speaker for t in turns}), der(rec, turns))
            known = diarize.diarize(audio, encoder=self._encoder, num_speakers=rec.speakers)
            row.known = (len({t.speaker for t in known}), der(rec, known))

    def report(self, ctx: Any) -> str:
        if self.skipped:
            return f"Skipped: {self.skipped}."
        lines = [
            "Speaker model: Resemblyzer's GE2E d-vector LSTM (from the `Resemblyzer` 0.1.4 wheel,",
            "Apache-2.0), run in numpy. Recordings: AMI excerpts with reference turns from",
            "pyannote.audio 4.0.7's sdist (30 s each). DER: pyannote.metrics, 0.25 s collar,",
            "overlap scored. Cost: CPU seconds of diarization / CPU seconds of transcribing the",
            "same clip (tiny.en int8, 1 thread, word timestamps).",
            "",
            "| recording | speakers (ref) | found | DER (count estimated) | DER (count given) "
            "| diarize CPU s | transcribe CPU s | cost |",
            "|---|---|---|---|---|---|---|---|",
        ]
        ders, known_ders, costs, counts_ok = [], [], [], []
        for rec in RECORDINGS:
            row = self.rows[rec.name]
            cost = row.diarize_cpu / row.transcribe_cpu
            costs.append(cost)
            counts_ok.append(row.auto[0] == rec.speakers)
            auto_der, known_der = row.auto[1], row.known[1]
            if auto_der is not None and known_der is not None:
                ders.append(auto_der)
                known_ders.append(known_der)
            lines.append(
                f"| {rec.name} | {rec.speakers} | {row.auto[0]} | {_pct(auto_der)} "
                f"| {_pct(known_der)} | {row.diarize_cpu:.2f} | {row.transcribe_cpu:.2f} "
                f"| {cost:.0%} |"
            )
        mean_der = sum(ders) / len(ders)
        mean_known = sum(known_ders) / len(known_ders)
        mean_cost = sum(costs) / len(costs)
        two = self.rows["sample"].auto
        ok = (
            two[0] == 2
            and (two[1] or 1) <= TARGET_DER
            and self.rows[RECORDINGS[-1].name].auto[0] == 1
        )
        ctx.verdicts.append(("diarization", ok))
        lines += [
            "",
            f"Mean DER {mean_der:.1%} with the count estimated, {mean_known:.1%} with it given; "
            f"speaker count right on {sum(counts_ok)}/{len(counts_ok)}; mean cost "
            f"{mean_cost:.0%} of the transcription time. Targets: DER <= {TARGET_DER:.0%} on a "
            f"two-speaker conversation, cost <= {TARGET_COST:.0%}.",
        ]
        return "\n".join(lines)

    def close(self) -> None:
        self._model = None


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def write_section(text: str, out: Path) -> None:
    """Replace this section of the results file (or append it)."""
    common.write_section(SECTION, text, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.diarize_bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md")
    args = parser.parse_args(argv)

    @dataclass
    class Ctx:
        verdicts: list[tuple[str, bool]] = field(default_factory=list)

    ctx = Ctx()
    section = DiarizationSection()
    section.setup(ctx)
    for index in range(args.rounds):
        section.run_round(ctx, index)
    text = f"{SECTION}\n\n{section.report(ctx)}\n"
    section.close()
    print(text)
    write_section(text, args.out)
    return 0 if all(ok for _, ok in ctx.verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
