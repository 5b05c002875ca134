"""Bare engines side by side: faster-whisper int8 vs openai-whisper on the same model and clips.

Each configuration runs in its own `bench.worker` process per round (peak RSS is its own); per
clip the fastest round counts, which filters out noise from other work on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, WORK, model_dir, wer

FASTER_INT8 = "faster-whisper int8"


@dataclass(frozen=True)
class Config:
    engine: str
    compute_type: str
    threads: int
    model: str

    @property
    def key(self) -> str:
        return f"{self.label} · {self.model}"

    @property
    def label(self) -> str:
        if self.engine == "faster-whisper":
            return f"faster-whisper {self.compute_type}"
        return "openai-whisper fp32"


@dataclass
class Measured:
    """A configuration's best-of-rounds numbers."""

    load_s: float
    audio_s: float
    decode_s: float
    transcribe_s: float
    transcribe_cpu_s: float
    per_clip_cpu: dict[str, float]  # decode + transcribe CPU seconds
    wer: float
    peak_rss_mb: float
    texts: dict[str, str]
    per_clip: dict[str, float]  # decode + transcribe seconds
    encoder_cpu_s: float  # one encoder pass over a 30 s window
    encoder_passes: int  # per clip: 1, or 2 when the language is auto-detected

    @property
    def rtf(self) -> float:
        return self.audio_s / self.transcribe_s

    @property
    def rtf_cpu(self) -> float:
        return self.audio_s / self.transcribe_cpu_s


def summarise(runs: list[dict[str, Any]], references: dict[str, str]) -> Measured:
    names = [c["clip"] for c in runs[0]["clips"]]
    best = {
        name: min((c for r in runs for c in r["clips"] if c["clip"] == name), key=_total)
        for name in names
    }
    return Measured(
        load_s=min(r["load_s"] for r in runs),
        audio_s=sum(best[n]["audio_s"] for n in names),
        decode_s=sum(best[n]["decode_s"] for n in names),
        transcribe_s=sum(best[n]["transcribe_s"] for n in names),
        transcribe_cpu_s=sum(
            min(c["transcribe_cpu_s"] for r in runs for c in r["clips"] if c["clip"] == n)
            for n in names
        ),
        per_clip_cpu={
            n: min(
                c["decode_cpu_s"] + c["transcribe_cpu_s"]
                for r in runs
                for c in r["clips"]
                if c["clip"] == n
            )
            for n in names
        },
        wer=wer([references[n] for n in names], [best[n]["text"] for n in names]),
        peak_rss_mb=max(r["peak_rss_mb"] for r in runs),
        texts={n: best[n]["text"] for n in names},
        per_clip={n: _total(best[n]) for n in names},
        encoder_cpu_s=min(float(r.get("encoder_cpu_s", 0.0)) for r in runs),
        encoder_passes=int(runs[0].get("encoder_passes", 1)),
    )


def _total(clip: dict[str, Any]) -> float:
    return float(clip["decode_s"] + clip["transcribe_s"])


class EnginesSection:
    title = "Bare engines"

    def __init__(self, models: list[str], threads: int) -> None:
        self.configs: list[Config] = []
        for model in models:
            self.configs.append(Config("faster-whisper", "int8", threads, model))
            if model == models[0]:  # same precision as openai-whisper: separates int8's share
                self.configs.append(Config("faster-whisper", "float32", threads, model))
            self.configs.append(Config("openai-whisper", "float32", threads, model))
        self.runs: dict[str, list[dict[str, Any]]] = {c.key: [] for c in self.configs}
        self.errors: dict[str, str] = {}
        self.measured: dict[str, Measured] = {}

    def setup(self, ctx: Any) -> None:
        for model in {c.model for c in self.configs}:
            model_dir(model)  # join split models before any timing
        if any(c.engine == "openai-whisper" for c in self.configs):
            self._convert({c.model for c in self.configs if c.engine == "openai-whisper"})

    def _convert(self, models: set[str]) -> None:
        """Convert once up front, so the workers' load time is the cached load."""
        from appliance.core.engines.convert import converted_checkpoint

        for model in sorted(models):
            try:
                converted_checkpoint(model_dir(model), WORK / "openai-whisper")
            except ImportError as exc:
                for c in self.configs:
                    if c.engine == "openai-whisper":
                        self.errors[c.key] = f"openai-whisper extra not installed ({exc})"

    def run_round(self, ctx: Any, index: int) -> None:
        for config in self.configs:
            if config.key in self.errors:
                continue
            print(f"  round {index + 1}: {config.key}", file=sys.stderr, flush=True)
            result = run_worker(config)
            if isinstance(result, str):
                self.errors[config.key] = result
            else:
                self.runs[config.key].append(result)

    def close(self) -> None:
        pass

    def results(self, references: dict[str, str]) -> dict[str, Measured]:
        if not self.measured:
            self.measured = {
                key: summarise(runs, references) for key, runs in self.runs.items() if runs
            }
        return self.measured

    def report(self, ctx: Any) -> str:
        measured = self.results(ctx.references)
        lines = [
            "| Configuration | Model | Threads | Load s | Audio s | Wall s | RTF wall | CPU s "
            "| RTF CPU | WER % | Peak RSS MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in self.configs:
            if c.key in self.errors:
                lines.append(
                    f"| {c.label} | {c.model} | {c.threads} | {self.errors[c.key]} |||||||"
                )
                continue
            m = measured.get(c.key)
            if m is None:
                continue
            lines.append(
                f"| {c.label} | {c.model} | {c.threads} | {m.load_s:.2f} | {m.audio_s:.1f} "
                f"| {m.transcribe_s:.2f} | {m.rtf:.1f} | {m.transcribe_cpu_s:.2f} "
                f"| {m.rtf_cpu:.1f} | {m.wer:.2f} | {m.peak_rss_mb:.0f} |"
            )
        lines += [
            "",
            "| Model | Speed faster int8 / openai (CPU) | (wall) | WER delta (pt) | Target "
            "| Verdict |",
            "|---|---:|---:|---:|---|---|",
        ]
        for model in dict.fromkeys(c.model for c in self.configs):
            fast = measured.get(f"{FASTER_INT8} · {model}")
            slow = measured.get(f"openai-whisper fp32 · {model}")
            if fast is None or slow is None:
                lines.append(f"| {model} | n/a | n/a | n/a | ≥4x, ±0.5 pt | not measured |")
                continue
            ratio = fast.rtf_cpu / slow.rtf_cpu
            delta = fast.wer - slow.wer
            ok = ratio >= 4 and abs(delta) <= 0.5
            lines.append(
                f"| {model} | {ratio:.2f}x | {fast.rtf / slow.rtf:.2f}x | {delta:+.2f} "
                f"| ≥4x (CPU), ±0.5 pt | {'PASS' if ok else 'FAIL'} |"
            )
            ctx.verdicts.append((f"engines {model}", ok))
        lines += ["", *self._encoder_floor(measured)]
        return "\n".join(lines)

    def _encoder_floor(self, measured: dict[str, Measured]) -> list[str]:
        """Why the ratio is what it is: the encoder pass every clip pays, measured alone."""
        lines = [
            "Encoder alone (CPU s for one 30 s window; every clip is padded to one window, "
            "auto-detected languages cost a second pass). The ceiling is the speed ratio "
            "faster-whisper would reach if its decoding cost nothing:",
            "",
            "| Model | faster int8 encoder s | openai fp32 encoder s | Encoder ratio "
            "| Encoder share of faster int8 | Ratio ceiling |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for model in dict.fromkeys(c.model for c in self.configs):
            fast = measured.get(f"{FASTER_INT8} · {model}")
            slow = measured.get(f"openai-whisper fp32 · {model}")
            if fast is None or slow is None or not fast.encoder_cpu_s or not slow.encoder_cpu_s:
                continue
            clips = len(fast.per_clip)
            floor = fast.encoder_cpu_s * fast.encoder_passes * clips
            slow_cpu = sum(slow.per_clip_cpu.values())
            lines.append(
                f"| {model} | {fast.encoder_cpu_s:.2f} | {slow.encoder_cpu_s:.2f} "
                f"| {slow.encoder_cpu_s / fast.encoder_cpu_s:.2f}x "
                f"| {100 * floor / sum(fast.per_clip_cpu.values()):.0f} % "
                f"| {slow_cpu / floor:.2f}x |"
            )
        return lines


def run_worker(config: Config) -> dict[str, Any] | str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable, "-m", "bench.worker",
            "--engine", config.engine,
            "--compute-type", config.compute_type,
            "--threads", str(config.threads),
            "--model", config.model,
            "--out", str(out),
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False
            )
        except subprocess.TimeoutExpired:
            return "timed out after 30 min"
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"worker failed ({proc.returncode}): {tail[0][:200]}"
        result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        return result
