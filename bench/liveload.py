"""Live load (`/ws/live`): 1, 2 and 4 concurrent sessions of conversational speech.

The audio is conversation: the real two-speaker telephone call of `.cache/clips/diarization/
sample.wav` (30 s, when `scripts/fetch_clips.py` fetched it), 1 s of silence, then JFK and the
five LibriVox clips with their own silences trimmed, joined by 0.2-0.4 s gaps — pauses too short
to close an utterance (`LIVE_SILENCE_MS` 500), the conversational failure mode. Every session
streams all of it at real-time pace in 200 ms frames (sessions start 0.37 s apart), then `stop`.

Measured per configuration, on the client's clock (as in `bench/live.py`), p50/p95:

- **final after end of speech** (the acceptance metric): for the finals that close an utterance
  at a pause or at `stop` (reason `silence` or `stop`), the `speech_end` on the real-time
  schedule → the final's arrival — how long the text takes once the speaker stopped;
- **sentence commit** and **max_length** finals, reported on their own: the speaker is still
  talking when they come (early text is a gain, not a wait), and a sentence commit's
  `speech_end` → arrival is by design the agreement wait (two decodes that agree);
- word final: each word's end → the final that holds it (comparable across policies);
- partial latency; `lag` messages; samples dropped (sent minus the `end` message's duration);
  the finals' `reason`s.
Text quality: the finals of the clip part against the clips' reference texts next to the same
audio transcribed as a file (`POST /transcribe`, beam 5) — the target is within 2 WER points —
and the finals of the call (no reference text) against its file transcription.

Each configuration runs on the server as it is (sentence commits, batched decodes) and, right
after it, on a second server with `LIVE_SENTENCE_COMMITS=false LIVE_BATCH_DECODES=false` (the
previous behaviour), so that the ratio is measured under the same machine load.

Used by `bench.run` (section "liveload") and runnable alone: `python -m bench.liveload
[--sessions 1,2,4] [--no-baseline]`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import wave
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import CLIPS, RATE, LiveServer, clips, normalise, stream_live, wer
from bench.live import percentile, read_pcm
from bench.service import cpu_seconds

CALL = CLIPS / "diarization" / "sample.wav"
GAP_RANGE = (0.2, 0.4)
STAGGER = 0.37
TARGET_P95 = {1: 1.0, 4: 1.5}  # final after end of speech (reasons below)
END_OF_SPEECH = frozenset({"silence", "stop"})
TARGET_WER_POINTS = 2.0


@dataclass
class Conversation:
    pcm: bytes
    boundary: float  # stream seconds where the clip part starts (0 without the call)
    references: list[str]  # reference texts of the clip part
    call_pcm: bytes = b""
    clips_pcm: bytes = b""


def _trim(pcm: bytes, threshold: float = 0.01, pad: float = 0.05) -> bytes:
    """Drop leading and trailing silence (20 ms frames under `threshold` RMS), keeping `pad`."""
    audio = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    frame = 320
    count = audio.size // frame
    rms = np.sqrt((audio[: count * frame].reshape(count, frame) ** 2).mean(axis=1))
    loud = np.flatnonzero(rms > threshold)
    if loud.size == 0:
        return pcm
    keep = int(pad * RATE)
    start = max(0, loud[0] * frame - keep)
    end = min(audio.size, (loud[-1] + 1) * frame + keep)
    return pcm[start * 2 : end * 2]


def _read_any(path: Path) -> bytes:
    from appliance.core.audio import decode

    audio = decode(path)
    return (np.clip(audio, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()


def conversation(seed: int = 13) -> Conversation:
    rng = np.random.default_rng(seed)
    call = _read_any(CALL) if CALL.is_file() else b""
    parts, references = [], []
    for clip in clips():
        parts.append(_trim(read_pcm(clip.path)))
        references.append(clip.reference)
    clip_pcm = b""
    for part in parts:
        gap = int(rng.uniform(*GAP_RANGE) * RATE)
        clip_pcm += part + bytes(gap * 2)
    lead = bytes(int(0.5 * RATE) * 2)
    middle = bytes(RATE * 2) if call else b""
    pcm = lead + call + middle + clip_pcm + bytes(int(1.5 * RATE) * 2)
    boundary = (len(lead) + len(call) + len(middle) / 2) / 2 / RATE
    return Conversation(pcm, boundary, references, call, clip_pcm)


@dataclass
class SessionRun:
    finals: list[tuple[float, float, str, str]] = field(default_factory=list)  # lat, start,..
    partials: list[float] = field(default_factory=list)
    words: list[float] = field(default_factory=list)  # each word: spoken -> in a final
    lag_messages: int = 0
    sent_samples: int = 0
    server_samples: int = 0
    timings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


async def stream(url: str, pcm: bytes, delay: float, model: str = "tiny.en") -> SessionRun:
    run = SessionRun()
    live = await stream_live(url, pcm, model=model, delay=delay)
    run.sent_samples, run.error, t0 = live.sent_samples, live.refused, live.t0
    for arrived, message in live.messages:
        kind = message.get("type")
        if kind == "final" and message["text"]:
            latency = arrived - (t0 + message["speech_end"])
            run.finals.append((latency, message["start"], message["text"], message["reason"]))
            run.words += [arrived - (t0 + w["end"]) for w in message["words"]]
        elif kind == "partial":
            run.partials.append(arrived - (t0 + message["audio_end"]))
        elif kind == "lag":
            run.lag_messages += 1
        elif kind == "end":
            run.server_samples = round(message["duration"] * RATE)
            run.timings = message.get("timings") or {}
        elif kind == "error":
            run.error = message.get("message")
    return run


async def load(url: str, pcm: bytes, sessions: int) -> list[SessionRun]:
    return list(await asyncio.gather(*(stream(url, pcm, i * STAGGER) for i in range(sessions))))


def _wav(pcm: bytes) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm)
    return out.getvalue()


def file_transcription(url: str, pcm: bytes) -> str:
    import httpx

    files = {"file": ("part.wav", _wav(pcm), "audio/wav")}
    response = httpx.post(f"{url}/transcribe", files=files, data={"language": "en"}, timeout=600)
    response.raise_for_status()
    return str(response.json()["text"])


def server(env: dict[str, str]) -> LiveServer:
    """A server for one configuration (tiny.en, up to 8 sessions, no rate limit)."""
    base = {"LIVE_MAX_SESSIONS": "8", "API_RATE_LIMIT": "0"}
    return LiveServer({**base, **env}, prefix="bench-liveload-")


BASELINE_ENV = {"LIVE_SENTENCE_COMMITS": "false", "LIVE_BATCH_DECODES": "false"}
# the features under test (off by default until this bench shows they help on a quiet machine)
FEATURES_ENV = {"LIVE_SENTENCE_COMMITS": "true", "LIVE_BATCH_DECODES": "true"}


@dataclass
class Result:
    name: str
    sessions: int
    runs: list[SessionRun]
    load: float
    cpu: float = float("nan")  # CPU seconds the server spent on the run (load-independent)

    def summary(self, conv: Conversation, file_text: dict[str, str]) -> dict[str, Any]:
        finals = [f[0] for r in self.runs for f in r.finals]
        ends = [f[0] for r in self.runs for f in r.finals if f[3] in END_OF_SPEECH]
        sentences = [f[0] for r in self.runs for f in r.finals if f[3] == "sentence"]
        cuts = [f[0] for r in self.runs for f in r.finals if f[3] == "max_length"]
        partials = [p for r in self.runs for p in r.partials]
        words = [w for r in self.runs for w in r.words]
        call_texts, clip_texts = [], []
        for r in self.runs:
            call_texts.append(" ".join(f[2] for f in r.finals if f[1] < conv.boundary))
            clip_texts.append(" ".join(f[2] for f in r.finals if f[1] >= conv.boundary))
        reference = " ".join(conv.references)
        reasons = Counter(f[3] for r in self.runs for f in r.finals)
        return {
            "final_p50": _median(ends),
            "final_p95": percentile(ends, 0.95),
            "sentence_p50": _median(sentences),
            "sentence_p95": percentile(sentences, 0.95),
            "cut_p50": _median(cuts),
            "cut_p95": percentile(cuts, 0.95),
            "word_p50": _median(words),
            "word_p95": percentile(words, 0.95),
            "partial_p50": _median(partials),
            "partial_p95": percentile(partials, 0.95),
            "lag": sum(r.lag_messages for r in self.runs),
            # `end.duration` is rounded to the millisecond: up to 8 samples are rounding
            "dropped": sum(
                r.sent_samples - r.server_samples
                for r in self.runs
                if r.sent_samples - r.server_samples > 16
            ),
            "errors": sum(1 for r in self.runs if r.error),
            "wer_clips": wer([reference] * len(self.runs), clip_texts),
            "wer_call_vs_file": wer([file_text["call"]] * len(self.runs), call_texts)
            if conv.call_pcm
            else float("nan"),
            "reasons": dict(reasons),
            "finals": len(finals),
        }


def _f(value: float) -> str:
    """A latency for the table: two decimals, or a dash where there was no such final."""
    return "—" if value != value else f"{value:.2f}"  # NaN


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class LiveLoadSection:
    """The `bench.run` section: see the module docstring."""

    title = "Live load: concurrent conversational sessions (/ws/live)"

    def __init__(self, sessions: tuple[int, ...] = (1, 2, 4), baseline: bool = True) -> None:
        self.sessions = sessions
        self.baseline = baseline
        self.reason: str | None = None
        self.servers: dict[str, LiveServer] = {}
        self.results: list[Result] = []
        self.conv: Conversation | None = None
        self.file_text: dict[str, str] = {}
        self.done = False

    def setup(self, ctx: Any) -> None:
        try:
            self.conv = conversation()
            self.servers["now"] = server(FEATURES_ENV)
            if self.baseline:
                self.servers["baseline"] = server(BASELINE_ENV)
            url = self.servers["now"].url
            self.file_text["clips"] = file_transcription(url, self.conv.clips_pcm)
            if self.conv.call_pcm:
                self.file_text["call"] = file_transcription(url, self.conv.call_pcm)
        except Exception as exc:
            self.reason = f"could not set up: {type(exc).__name__}: {exc}"

    def run_round(self, ctx: Any, index: int) -> None:
        if self.reason or self.done or self.conv is None:
            return
        self.done = True  # one round: each configuration is minutes of real-time audio
        for count in self.sessions:
            for name, server in self.servers.items():
                print(f"liveload: {count} session(s), {name}", file=sys.stderr, flush=True)
                load = os.getloadavg()[0]
                before = cpu_seconds(server.process.pid)
                runs = asyncio.run(_load_or_error(server.url, self.conv.pcm, count))
                cpu = cpu_seconds(server.process.pid) - before
                self.results.append(Result(name, count, runs, load, cpu))

    def report(self, ctx: Any) -> str:
        if self.reason:
            return self.reason
        if not self.results or self.conv is None:
            return "no live-load run"
        conv = self.conv
        file_wer = wer([" ".join(conv.references)], [self.file_text["clips"]])
        seconds = len(conv.pcm) / 2 / RATE
        lines = [
            f"{seconds:.0f} s of conversation per session ({conv.boundary:.0f} s two-speaker "
            "call, then the clips with 0.2-0.4 s gaps), tiny.en int8, real-time pace, 200 ms "
            f"frames, {os.cpu_count()} cores; load average (1 min) before each run in the table; "
            "server CPU: user + system seconds of the server per second of session audio "
            "(what the decoding costs; an adaptive session decodes less when behind). "
            "Latencies in seconds on the client's clock. **final after end of speech** (the "
            "acceptance metric): for finals that close an utterance at a pause or at `stop` "
            "(reason `silence`/`stop`), the `speech_end` → the final; **sentence** and "
            "**max_length** finals come while the speaker goes on talking (early text, not a "
            "wait; a sentence commit's `speech_end` → final is the agreement wait) and are "
            "reported in their own columns; "
            "word final: each word's end (its timing in the final) → the final that holds it "
            "(the text's own wait, comparable across policies that cut utterances differently). "
            "`now`: sentence commits + batched "
            "decodes; `baseline`: both off (the previous behaviour), run right after on a "
            "second server.",
            "",
            "| sessions | server | load | server CPU s / audio s | final after end of speech "
            "p50 | p95 | sentence final p50 | p95 | max_length final p50 | p95 | "
            "word final p50 | word final p95 | partial p50 | partial p95 | `lag` | dropped | "
            "finals (reasons) | WER clips | WER call vs file |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.results:
            s = r.summary(conv, self.file_text)
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items()))
            lines.append(
                f"| {r.sessions} | {r.name} | {r.load:.1f} | "
                f"{r.cpu / (seconds * r.sessions):.2f} | {_f(s['final_p50'])} | "
                f"{_f(s['final_p95'])} | {_f(s['sentence_p50'])} | {_f(s['sentence_p95'])} | "
                f"{_f(s['cut_p50'])} | {_f(s['cut_p95'])} | "
                f"{s['word_p50']:.2f} | {s['word_p95']:.2f} | "
                f"{s['partial_p50']:.2f} | {s['partial_p95']:.2f} | "
                f"{s['lag']} | {s['dropped']} | {s['finals']} ({reasons}) | "
                f"{s['wer_clips']:.1f} % | {s['wer_call_vs_file']:.1f} % |"
            )
            if r.name == "now" and r.sessions in TARGET_P95:
                passed = (
                    s["final_p95"] <= TARGET_P95[r.sessions]
                    and s["lag"] == 0
                    and s["dropped"] == 0
                    and s["errors"] == 0
                    and s["wer_clips"] - file_wer <= TARGET_WER_POINTS
                )
                if ctx is not None and hasattr(ctx, "verdicts"):
                    ctx.verdicts.append(
                        (
                            f"live load, {r.sessions} session(s): p95 final after end of "
                            "speech ≤ "
                            f"{TARGET_P95[r.sessions]} s, no lag, nothing dropped, WER ≤ file "
                            f"+ {TARGET_WER_POINTS} pt",
                            passed,
                        )
                    )
        lines += [
            "",
            f"The clip part as a file (`POST /transcribe`): WER {file_wer:.1f} %; target for "
            f"the finals: ≤ {file_wer + TARGET_WER_POINTS:.1f} %. Targets (quiet 2-core "
            "machine): 1 session p95 final after end of speech ≤ 1.0 s, 4 sessions ≤ 1.5 s, "
            "no `lag`, nothing dropped.",
        ]
        errors = [f"- {r.name}/{r.sessions}: {x.error}" for r in self.results for x in r.runs]
        errors = [e for e in errors if not e.endswith(": None")]
        if errors:
            lines += ["", "Errors:", *errors]
        return "\n".join(lines)

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
        self.servers.clear()


async def _load_or_error(url: str, pcm: bytes, count: int) -> list[SessionRun]:
    try:
        return await load(url, pcm, count)
    except Exception as exc:
        return [SessionRun(error=f"{type(exc).__name__}: {exc}")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.liveload", description=__doc__)
    parser.add_argument("--sessions", default="1,2,4", help="comma-separated session counts")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline server")
    args = parser.parse_args(argv)
    counts = tuple(int(n) for n in args.sessions.split(","))

    class Ctx:
        verdicts: list[tuple[str, bool]] = []  # noqa: RUF012

    section = LiveLoadSection(counts, baseline=not args.no_baseline)
    try:
        section.setup(Ctx)
        section.run_round(Ctx, 0)
        print(section.report(Ctx))
        for result in section.results:
            for run in result.runs[:1]:
                text = " ".join(f[2] for f in run.finals)
                print(f"- {result.name}/{result.sessions}: {normalise(text)}", file=sys.stderr)
                for latency, start, final, reason in run.finals:
                    print(f"  {start:7.2f} {reason:10} {latency:5.2f} {final}", file=sys.stderr)
    finally:
        section.close()
    return 0 if all(ok for _, ok in Ctx.verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
