"""Live latency (`/ws/live`): real clips streamed at real-time pace to a real server.

Each clip is one live session: 0.5 s of silence, the clip, 1.5 s of silence, sent as 200 ms
PCM frames on a fixed real-time schedule (frame k leaves when its last sample would have been
spoken), then `stop`. Measured per utterance, on the client's clock:

- final latency: from the end of the utterance's speech (the `speech_end` the server's VAD
  found, placed on the real-time schedule) to the arrival of its `final` — what a speaker
  waits after they stop talking, including the silence that closes the utterance;
- partial latency: from the end of the audio a `partial` covers to its arrival.

"No audio dropped" means the server's `end` message counts every sample that was sent.
Used by `bench.run` (section "live") and runnable alone: `python -m bench.live [--url URL]`
(without a URL it starts its own `whisper-appliance serve` with tiny.en).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RATE, Clip, LiveServer, clips, normalise, stream_live, wer

LEAD_SILENCE = 0.5
TAIL_SILENCE = 1.5
TARGET_MEDIAN = 1.0
TARGET_P95 = 2.0


@dataclass
class Run:
    clip: str
    reference: str
    text: str = ""
    finals: list[float] = field(default_factory=list)
    partials: list[float] = field(default_factory=list)
    server_finals: list[float] = field(default_factory=list)
    processing: list[float] = field(default_factory=list)
    speculative: int = 0
    send_late: list[float] = field(default_factory=list)
    lag_messages: int = 0
    sent_samples: int = 0
    server_samples: int = 0
    error: str | None = None


def read_pcm(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (RATE, 1, 2):
            raise ValueError(f"{path.name}: need 16 kHz mono 16-bit PCM")
        return bytes(w.readframes(w.getnframes()))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def stream_clip(url: str, clip: Clip, model: str = "tiny.en") -> Run:
    """One live session for one clip; latencies in seconds."""
    run = Run(clip.name, clip.reference)
    pcm = bytes(int(LEAD_SILENCE * RATE) * 2) + read_pcm(clip.path)
    pcm += bytes(int(TAIL_SILENCE * RATE) * 2)
    live = await stream_live(url, pcm, model=model, timeout=120)
    run.sent_samples, run.send_late, run.error = live.sent_samples, live.send_late, live.refused
    t0, messages = live.t0, live.messages
    texts = []
    for arrived, message in messages:
        kind = message.get("type")
        if kind == "final" and message["text"]:
            texts.append(message["text"])
            run.finals.append(arrived - (t0 + message["speech_end"]))
            if message.get("latency_ms") is not None:
                run.server_finals.append(message["latency_ms"] / 1000)
            run.processing.append(message["processing_ms"] / 1000)
            run.speculative += bool(message.get("speculative"))
        elif kind == "partial":
            run.partials.append(arrived - (t0 + message["audio_end"]))
        elif kind == "lag":
            run.lag_messages += 1
        elif kind == "end":
            run.server_samples = round(message["duration"] * RATE)
        elif kind == "error":
            run.error = message.get("message")
    run.text = " ".join(texts)
    return run


class LiveSection:
    """The `bench.run` section: see the module docstring."""

    title = "Live transcription latency (/ws/live)"

    def __init__(self, url: str | None = None) -> None:
        self.url = url
        self.reason: str | None = None
        self.runs: list[Run] = []
        self.server: LiveServer | None = None

    def setup(self, ctx: Any) -> None:
        self.url = self.url or getattr(ctx, "service_url", None)
        if self.url is None:
            try:
                self.url = self._start_server()
            except Exception as exc:
                self.reason = f"could not start a server: {exc}"

    def _start_server(self) -> str:
        self.server = LiveServer({"WORKER_PROCESSES": "1"})
        return self.server.url

    def run_round(self, ctx: Any, index: int) -> None:
        if self.reason or self.url is None:
            return
        for clip in ctx.clips:
            print(f"live: round {index + 1}, {clip.name}", file=sys.stderr, flush=True)
            try:
                self.runs.append(asyncio.run(stream_clip(self.url, clip)))
            except Exception as exc:
                run = Run(clip.name, clip.reference, error=f"{type(exc).__name__}: {exc}")
                self.runs.append(run)

    def summary(self) -> dict[str, float]:
        finals = [v for r in self.runs for v in r.finals]
        partials = [v for r in self.runs for v in r.partials]
        server = [v for r in self.runs for v in r.server_finals]
        processing = [v for r in self.runs for v in r.processing]
        return {
            "utterances": float(len(finals)),
            "final_median": statistics.median(finals) if finals else float("nan"),
            "final_p95": percentile(finals, 0.95),
            "final_max": max(finals, default=float("nan")),
            "partial_median": statistics.median(partials) if partials else float("nan"),
            "partial_p95": percentile(partials, 0.95),
            "server_final_median": statistics.median(server) if server else float("nan"),
            "processing_median": statistics.median(processing) if processing else float("nan"),
            "speculative": float(sum(r.speculative for r in self.runs)),
            "send_late_p95": percentile([v for r in self.runs for v in r.send_late], 0.95),
            "lag_messages": float(sum(r.lag_messages for r in self.runs)),
            "dropped_samples": float(
                sum(max(0, r.sent_samples - r.server_samples) for r in self.runs)
            ),
            "errors": float(sum(1 for r in self.runs if r.error)),
            "wer": wer([r.reference for r in self.runs], [r.text for r in self.runs])
            if self.runs
            else float("nan"),
        }

    def report(self, ctx: Any) -> str:
        if self.reason:
            return self.reason
        if not self.runs:
            return "no live run"
        s = self.summary()
        passed = (
            s["final_median"] <= TARGET_MEDIAN
            and s["final_p95"] <= TARGET_P95
            and s["dropped_samples"] == 0
            and s["errors"] == 0
        )
        if ctx is not None and hasattr(ctx, "verdicts"):
            ctx.verdicts.append(
                (f"live final latency median ≤ {TARGET_MEDIAN} s, p95 ≤ {TARGET_P95} s", passed)
            )
        rounds = len({(r.clip, i) for i, r in enumerate(self.runs)})
        lines = [
            f"{len(self.runs)} sessions ({rounds} clip runs), tiny.en int8, real-time pace, "
            "200 ms frames; latencies in seconds on the client's clock.",
            "",
            "| metric | median | p95 | max |",
            "|---|---|---|---|",
            f"| final latency (end of speech → `final`) | {s['final_median']:.2f} | "
            f"{s['final_p95']:.2f} | {s['final_max']:.2f} |",
            f"| partial latency (end of covered audio → `partial`) | {s['partial_median']:.2f} "
            f"| {s['partial_p95']:.2f} | |",
            f"| server-side final latency (`latency_ms`) | {s['server_final_median']:.2f} | | |",
            f"| decode time of a final (`processing_ms`) | {s['processing_median']:.2f} | | |",
            "",
            f"Utterances: {s['utterances']:.0f} ({s['speculative']:.0f} finals from the "
            f"speculative decode), `lag` messages: {s['lag_messages']:.0f}, samples dropped: "
            f"{s['dropped_samples']:.0f}, errors: {s['errors']:.0f}, WER of the finals: "
            f"{s['wer']:.1f} %. The client sent its frames up to {s['send_late_p95']:.2f} s "
            "late (p95; a busy machine delays the client too).",
            "",
            f"Target: final median ≤ {TARGET_MEDIAN} s, p95 ≤ {TARGET_P95} s, no audio dropped "
            f"— **{'PASS' if passed else 'FAIL'}**.",
        ]
        errors = [f"- {r.clip}: {r.error}" for r in self.runs if r.error]
        if errors:
            lines += ["", "Errors:", *errors]
        return "\n".join(lines)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.live", description=__doc__)
    parser.add_argument("--url", help="a running appliance (default: start one)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clips", default="", help="comma-separated clip names (default: all)")
    args = parser.parse_args(argv)
    chosen = [c for c in clips() if not args.clips or c.name in args.clips.split(",")]

    class Ctx:
        clips = chosen
        verdicts: list[tuple[str, bool]] = []  # noqa: RUF012
        service_url = None

    section = LiveSection(args.url)
    try:
        section.setup(Ctx)
        for index in range(args.rounds):
            section.run_round(Ctx, index)
        print(section.report(Ctx))
        for run in section.runs:
            print(f"- {run.clip}: {normalise(run.text)}", file=sys.stderr)
    finally:
        section.close()
    return 0 if all(ok for _, ok in Ctx.verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
