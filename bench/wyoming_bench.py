"""Wyoming (Home Assistant): our server next to `wyoming-faster-whisper`, same model, same clips.

`wyoming-faster-whisper` (the PyPI package Home Assistant users install, pinned below) runs
from a throw-away venv under `.cache/wyoming-bench/` (its pins may differ from ours), with its
defaults and the bundled tiny.en folder as `--model`. Ours is a real `whisper-appliance serve`
with `WYOMING_ENABLED=true` (tiny.en, int8, one worker). Both are driven with the `wyoming`
library's `AsyncTcpClient`, as Home Assistant drives them: `transcribe`, `audio-start`,
`audio-chunk`s, `audio-stop`, then read until `transcript`.

Each clip is sent with 0.3 s of silence before and 0.8 s after the speech (a satellite sends
`audio-stop` once its VAD heard the end of the command), as 16 kHz mono 16-bit chunks:

- *real time*: 100 ms chunks, chunk k leaves when its last sample would have been spoken;
- *real time, early stop*: the same, but `audio-stop` comes 0.2 s after the speech (a
  client with an aggressive VAD): less time to finish decoding before it;
- *at once*: every chunk as fast as the socket takes it.

Measured on the client's clock: seconds from sending `audio-stop` to receiving `transcript`,
best round per clip, and the WER of the transcript. Clips: JFK (11 s), the five LibriVox
utterances joined (~27 s) and a ~76 s mix of both. Targets (issue 14): real time, ours
<= 0.5x theirs; at once, ours no slower (<= 1.1x, for noise).

A round takes about 9 minutes (real time is real time); at most two rounds run. Used by
`bench.run` (section "wyoming"); alone: `python -m bench.wyoming_bench [--rounds N]
[--write]` (`--write` replaces this section in bench/results.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, WORK, Clip, clips, model_dir, wer

PACKAGE = "wyoming-faster-whisper==3.8.1"
VENV = WORK.parent / "wyoming-bench" / "venv"
RATE = 16000
CHUNK_SECONDS = 0.1
LEAD_SILENCE = 0.3
TAIL_SILENCE = 0.8
TARGET_REALTIME = 0.5
TARGET_AT_ONCE = 1.1
MAX_ROUNDS = 2  # a round streams ~4 min of audio per server in real time: bench.run's 3 is long
SERVERS = ("ours", "wyoming-faster-whisper")
EARLY_STOP = "real time, early stop"
MODES = ("real time", EARLY_STOP, "at once")
EARLY_TAIL = 0.2  # seconds of silence after the speech in the early-stop mode
TITLE = "Wyoming (Home Assistant): ours vs wyoming-faster-whisper"


@dataclass
class Request:
    name: str
    pcm: bytes
    reference: str

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / RATE


@dataclass
class Result:
    latency: float | None = None
    text: str = ""
    error: str | None = None


@dataclass
class Runs:
    results: dict[tuple[str, str, str], list[Result]] = field(default_factory=dict)

    def add(self, server: str, mode: str, clip: str, result: Result) -> None:
        self.results.setdefault((server, mode, clip), []).append(result)

    def best(self, server: str, mode: str, clip: str) -> Result | None:
        ok = [r for r in self.results.get((server, mode, clip), []) if r.latency is not None]
        return min(ok, key=lambda r: r.latency or 0.0) if ok else None


def _pcm(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        if (w.getframerate(), w.getsampwidth(), w.getnchannels()) != (RATE, 2, 1):
            raise SystemExit(f"{path}: expected 16 kHz mono 16-bit")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def requests(all_clips: list[Clip]) -> list[Request]:
    """JFK, the LibriVox utterances joined, and a ~76 s mix; silence around each."""
    gap = np.zeros(int(0.4 * RATE), dtype="<i2")
    jfk = next(c for c in all_clips if c.name == "jfk")
    libri = [c for c in all_clips if c.name != "jfk"]

    def join(parts: list[Clip]) -> tuple[np.ndarray, str]:
        audio: list[np.ndarray] = []
        for clip in parts:
            audio += [_pcm(clip.path), gap]
        return np.concatenate(audio[:-1]), " ".join(c.reference for c in parts)

    made = []
    for name, parts in (
        ("jfk", [jfk]),
        ("librivox", libri),
        ("mix", [jfk, *libri, jfk, *libri]),
    ):
        audio, reference = join(parts)
        lead = np.zeros(int(LEAD_SILENCE * RATE), dtype="<i2")
        tail = np.zeros(int(TAIL_SILENCE * RATE), dtype="<i2")
        pcm = np.concatenate([lead, audio, tail]).astype("<i2").tobytes()
        made.append(Request(name, pcm, reference))
    return made


async def transcribe(port: int, pcm: bytes, *, realtime: bool) -> Result:
    from wyoming.asr import Transcribe, Transcript
    from wyoming.client import AsyncTcpClient

    from appliance.web.wyoming_server import AudioChunk, AudioStart, AudioStop

    step = int(RATE * CHUNK_SECONDS) * 2
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
        started = time.monotonic()
        for index, offset in enumerate(range(0, len(pcm), step)):
            if realtime:
                delay = started + (index + 1) * CHUNK_SECONDS - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await client.write_event(AudioChunk(RATE, 2, 1, pcm[offset : offset + step]).event())
        await client.write_event(AudioStop().event())
        stopped = time.monotonic()
        while True:
            event = await asyncio.wait_for(client.read_event(), 300)
            if event is None:
                return Result(error="connection closed before the transcript")
            if event.type == "error":
                return Result(error=str(event.data))
            if Transcript.is_type(event.type):
                latency = time.monotonic() - stopped
                return Result(latency, Transcript.from_event(event).text)


async def _describe(port: int) -> bool:
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe

    try:
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Describe().event())
            event = await asyncio.wait_for(client.read_event(), 5)
            return event is not None and event.type == "info"
    except (OSError, TimeoutError):
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WyomingSection:
    """The `bench.run` section: see the module docstring."""

    title = TITLE

    def __init__(self) -> None:
        self.reason: str | None = None
        self.ports: dict[str, int] = {}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.requests: list[Request] = []
        self.runs = Runs()

    # --- setup ---------------------------------------------------------------------------------
    def setup(self, ctx: Any) -> None:
        self.requests = requests(ctx.clips)
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-wyoming-")
        try:
            self._install()
            self._start_theirs()
            self._start_ours()
        except Exception as exc:
            self.reason = f"{type(exc).__name__}: {exc}"

    def _install(self) -> None:
        exe = VENV / "bin" / "wyoming-faster-whisper"
        if exe.is_file():
            return
        print(f"wyoming: installing {PACKAGE} into {VENV}", file=sys.stderr, flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(VENV)], check=True, timeout=300)
        subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "-q", PACKAGE], check=True, timeout=1800
        )

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        assert self.tmp is not None
        log = (Path(self.tmp.name) / f"{name}.log").open("wb")
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(process)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = (Path(self.tmp.name) / f"{name}.log").read_text(errors="replace")[-800:]
                raise RuntimeError(f"{name} exited with {process.returncode}: {tail}")
            if asyncio.run(_describe(self.ports[name])):
                return
            time.sleep(0.5)
        raise RuntimeError(f"{name} did not answer describe")

    def _start_theirs(self) -> None:
        assert self.tmp is not None
        port = self.ports["wyoming-faster-whisper"] = _free_port()
        data = Path(self.tmp.name) / "wfw-data"
        data.mkdir()
        argv = [
            str(VENV / "bin" / "wyoming-faster-whisper"),
            "--uri",
            f"tcp://127.0.0.1:{port}",
            "--model",
            str(model_dir("tiny.en")),
            "--data-dir",
            str(data),
            "--language",
            "en",
        ]
        self._spawn("wyoming-faster-whisper", argv, dict(os.environ))

    def _start_ours(self) -> None:
        assert self.tmp is not None
        port = self.ports["ours"] = _free_port()
        env = {
            **os.environ,
            "DATA_DIR": str(Path(self.tmp.name) / "data"),
            "HTTPS_ENABLED": "false",
            "BIND_ADDRESS": "127.0.0.1",
            "HTTPS_PORT": str(_free_port()),
            "WHISPER_MODEL": "tiny.en",
            "WORKER_PROCESSES": "1",
            "WYOMING_ENABLED": "true",
            "WYOMING_PORT": str(port),
            "WYOMING_ZEROCONF": "false",
        }
        self._spawn("ours", [sys.executable, "-m", "appliance", "serve"], env)

    # --- rounds --------------------------------------------------------------------------------
    def run_round(self, ctx: Any, index: int) -> None:
        if self.reason or index >= MAX_ROUNDS:
            return
        for request in self.requests:
            for mode in MODES:
                # alternate who goes first, so neither always follows the other's decode
                order = SERVERS if index % 2 == 0 else tuple(reversed(SERVERS))
                for server in order:
                    print(
                        f"wyoming: round {index + 1}, {request.name} ({request.seconds:.0f} s), "
                        f"{mode}, {server}",
                        file=sys.stderr,
                        flush=True,
                    )
                    pcm = request.pcm
                    if mode == EARLY_STOP:
                        pcm = pcm[: len(pcm) - int((TAIL_SILENCE - EARLY_TAIL) * RATE) * 2]
                    try:
                        result = asyncio.run(
                            transcribe(self.ports[server], pcm, realtime=mode != "at once")
                        )
                    except Exception as exc:
                        result = Result(error=f"{type(exc).__name__}: {exc}")
                    self.runs.add(server, mode, request.name, result)

    # --- report --------------------------------------------------------------------------------
    def report(self, ctx: Any) -> str:
        if self.reason:
            return f"Not run: {self.reason}"
        lines = [
            "Seconds from `audio-stop` to `transcript` on the client's clock (best round), "
            "and WER (%). Ours: tiny.en int8, one worker; real-time input is decoded while it "
            "arrives (live core), input sent at once is a job of the queue. Theirs: "
            f"`{PACKAGE}` with its defaults (`--model` the same tiny.en folder, "
            "`--language en`; its default `--cpu-threads 4` suffers more than our one thread per "
            "worker when other work shares the machine, so compare on a quiet machine too). Real "
            "time: 0.8 s of silence after the speech before `audio-stop`; early stop: 0.2 s.",
            "",
            "| clip | audio s | mode | ours s | theirs s | ours / theirs | ours WER | theirs WER |",
            "|---|---|---|---|---|---|---|---|",
        ]
        sums: dict[str, list[float]] = {m: [0.0, 0.0] for m in MODES}
        complete = {m: True for m in MODES}
        for request in self.requests:
            for mode in MODES:
                ours = self.runs.best("ours", mode, request.name)
                theirs = self.runs.best("wyoming-faster-whisper", mode, request.name)
                if ours is None or theirs is None:
                    complete[mode] = False
                    errors = [
                        r.error
                        for s in SERVERS
                        for r in self.runs.results.get((s, mode, request.name), [])
                        if r.error
                    ]
                    lines.append(
                        f"| {request.name} | {request.seconds:.1f} | {mode} | "
                        f"failed: {'; '.join(errors)[:200]} | | | | |"
                    )
                    continue
                assert ours.latency is not None and theirs.latency is not None
                sums[mode][0] += ours.latency
                sums[mode][1] += theirs.latency
                ratio = ours.latency / max(theirs.latency, 1e-6)
                lines.append(
                    f"| {request.name} | {request.seconds:.1f} | {mode} | {ours.latency:.3f} | "
                    f"{theirs.latency:.3f} | {ratio:.2f}x | "
                    f"{wer([request.reference], [ours.text]):.1f} | "
                    f"{wer([request.reference], [theirs.text]):.1f} |"
                )
        lines.append("")
        targets = (
            ("real time", TARGET_REALTIME),
            (EARLY_STOP, TARGET_REALTIME),
            ("at once", TARGET_AT_ONCE),
        )
        for mode, target in targets:
            ours_sum, theirs_sum = sums[mode]
            if not complete[mode] or theirs_sum <= 0:
                ctx.verdicts.append((f"wyoming {mode}", False))
                lines.append(f"- {mode}: incomplete")
                continue
            ratio = ours_sum / theirs_sum
            passed = ratio <= target
            ctx.verdicts.append((f"wyoming {mode} <= {target}x", passed))
            lines.append(
                f"- {mode}: ours {ours_sum:.3f} s vs theirs {theirs_sum:.3f} s over all clips = "
                f"{ratio:.2f}x (target <= {target}x): {'PASS' if passed else 'FAIL'}"
            )
        return "\n".join(lines)

    def close(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def _replace_section(path: Path, body: str) -> None:
    """Put `## TITLE` + body into the results file, replacing an earlier run of it."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    section = f"## {TITLE}\n\n{body}\n"
    start = text.find(f"## {TITLE}")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if end < 0 else text[end + 1 :])
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wyoming_bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="update bench/results.md")
    args = parser.parse_args(argv)

    @dataclass
    class Ctx:
        clips: list[Clip]
        verdicts: list[tuple[str, bool]] = field(default_factory=list)

    ctx = Ctx(clips())
    section = WyomingSection()
    try:
        section.setup(ctx)
        for index in range(args.rounds):
            section.run_round(ctx, index)
        body = section.report(ctx)
    finally:
        section.close()
    body += (
        f"\n\nRun alone (`python -m bench.wyoming_bench --rounds {args.rounds}`) on "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {os.cpu_count()} CPUs, load "
        f"average {os.getloadavg()[0]:.1f} after."
    )
    print(body)
    if args.write:
        _replace_section(ROOT / "bench" / "results.md", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
