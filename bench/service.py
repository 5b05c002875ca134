"""The HTTP service against the bare engine it runs: a real `whisper-appliance serve`
(Hypercorn, plain HTTP, temp data dir) on a free port, every clip POSTed to `/transcribe`.

Overhead = service time (upload, probe, decode, queue, inference, history write, response)
over the bare engine's decode + transcribe time, same engine settings, same clips. The bare
engine is a `bench.worker --serve` process kept alive next to the server, and every clip is
measured as a pair (bare, then HTTP) back to back, so both see the same machine load; per clip
the best round counts.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common
from bench.common import ROOT, normalise, wer
from bench.engines import FASTER_INT8, summarise

MODEL = "tiny.en"


@dataclass(frozen=True)
class Sample:
    wall: float
    text: str
    audio_s: float
    server_s: float  # the job's own decode + transcribe wall time
    cpu_s: float  # CPU time the whole server process tree spent on the request


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of a process and its children so far."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RssSampler(threading.Thread):
    """Peak resident memory of a process and its children, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_mb = 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop_event.wait(0.05):
            try:
                procs = [root, *root.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
            except psutil.Error:
                continue
            self.peak_mb = max(self.peak_mb, rss / 2**20)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2)


class ServiceSection:
    title = "HTTP service vs bare engine"

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.bare_key = f"{FASTER_INT8} · {MODEL}"
        self.error: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        self.sampler: RssSampler | None = None
        self.rounds: list[dict[str, Sample]] = []  # per round: clip name -> HTTP sample
        self.bare_rounds: list[dict[str, dict[str, Any]]] = []  # same clips, bare engine
        self.bare: subprocess.Popen[str] | None = None
        self.bare_peak_mb = 0.0

    def setup(self, ctx: Any) -> None:
        try:
            import httpx  # noqa: F401

            import appliance.web.app  # noqa: F401  (is the service built yet?)
        except ImportError as exc:
            self.error = f"the service cannot be imported yet ({exc})"
            return
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-service-")
        data_dir = Path(self.tmp.name) / "data"
        data_dir.mkdir()
        port = free_port()
        settings = {
            "WHISPER_MODEL": MODEL,
            "ENGINE": "faster-whisper",
            "COMPUTE_TYPE": "int8",
            "CPU_THREADS": str(self.threads),
            "WORKER_PROCESSES": "1",
            "MODEL_CACHE_SIZE": "1",
        }
        self.log = Path(self.tmp.name) / "server.log"
        self.process = common.start_service(data_dir, self.log, port, settings)
        self.url = f"http://127.0.0.1:{port}"
        self.bare = subprocess.Popen(
            [
                sys.executable, "-m", "bench.worker", "--serve",
                "--engine", "faster-whisper", "--compute-type", "int8",
                "--threads", str(self.threads), "--model", MODEL,
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        self.sampler = RssSampler(self.process.pid)
        self.sampler.start()
        self.error = self._wait_healthy(timeout=180)
        if self.error is None:
            self.error = self._post_all(ctx, warm_up=True)
        if self.error is None:
            ctx.service_url = self.url  # for the sections after this one (live latency)

    def _wait_healthy(self, timeout: float) -> str | None:
        import httpx

        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"server exited with {self.process.returncode}: {self._log_tail()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return None
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        return f"server not healthy after {timeout:.0f} s: {self._log_tail()}"

    def _log_tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return " / ".join(lines[-3:])[:300] or "no output"

    def _post_all(self, ctx: Any, warm_up: bool = False) -> str | None:
        import httpx

        assert self.process is not None
        results: dict[str, Sample] = {}
        bare: dict[str, dict[str, Any]] = {}
        for clip in ctx.clips[:1] if warm_up else ctx.clips:
            if not warm_up:
                reply = self._ask_bare(str(clip.path))
                if reply is None:
                    return "the bare engine worker died"
                bare[clip.name] = {**reply, "clip": clip.name}
            body = clip.path.read_bytes()
            cpu_before = cpu_seconds(self.process.pid)
            started = time.perf_counter()
            try:
                response = httpx.post(
                    f"{self.url}/transcribe",
                    files={"file": (clip.path.name, body, "audio/wav")},
                    data={"model": MODEL},
                    timeout=600,
                )
            except httpx.HTTPError as exc:
                return f"POST /transcribe failed: {exc!r}"
            wall = time.perf_counter() - started
            cpu = cpu_seconds(self.process.pid) - cpu_before
            if response.status_code != 200:
                return f"POST /transcribe answered {response.status_code}: {response.text[:200]}"
            payload = response.json()
            timings = payload.get("timings") or {}
            results[clip.name] = Sample(
                wall,
                str(payload.get("text", "")),
                float(payload["duration"]),
                float(timings.get("decode_seconds", 0.0))
                + float(timings.get("transcribe_seconds", 0.0)),
                cpu,
            )
        if not warm_up:
            self.rounds.append(results)
            self.bare_rounds.append(bare)
        return None

    def _ask_bare(self, line: str) -> dict[str, Any] | None:
        import json

        assert self.bare is not None and self.bare.stdin and self.bare.stdout
        try:
            self.bare.stdin.write(line + "\n")
            self.bare.stdin.flush()
            answer = self.bare.stdout.readline()
        except OSError:
            return None
        if not answer:
            return None
        reply: dict[str, Any] = json.loads(answer)
        return reply

    def run_round(self, ctx: Any, index: int) -> None:
        if self.error is None:
            print(f"  round {index + 1}: service", file=sys.stderr, flush=True)
            self.error = self._post_all(ctx)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.bare is not None:
            if self.bare.stdin:
                self.bare.stdin.close()
            try:
                self.bare.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.bare.kill()
                self.bare.wait()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.tmp is not None:
            self.tmp.cleanup()

    def report(self, ctx: Any) -> str:
        if self.error is not None:
            return f"Not measured: {self.error}"
        if not self.rounds:
            return "Not measured: no round completed"
        if self.bare is not None and self.bare.poll() is None:
            reply = self._ask_bare("")  # an empty line asks for the worker's peak RSS
            self.bare_peak_mb = float(reply["peak_rss_mb"]) if reply else 0.0
        names = list(self.rounds[0])
        bare = summarise(
            [{"load_s": 0.0, "peak_rss_mb": self.bare_peak_mb, "clips": list(r.values())}
             for r in self.bare_rounds],
            ctx.references,
        )  # fmt: skip
        best = {n: min((r[n] for r in self.rounds), key=lambda s: s.wall) for n in names}
        texts = {n: best[n].text for n in names}
        audio_s = sum(best[n].audio_s for n in names)
        service_s = sum(best[n].wall for n in names)
        inner_s = sum(best[n].server_s for n in names)
        bare_s = bare.decode_s + bare.transcribe_s
        overhead = 100.0 * (service_s - bare_s) / bare_s
        service_cpu = sum(min(r[n].cpu_s for r in self.rounds) for n in names)
        bare_cpu = sum(bare.per_clip_cpu.values())
        overhead_cpu = 100.0 * (service_cpu - bare_cpu) / bare_cpu
        service_wer = wer([ctx.references[n] for n in names], [texts[n] for n in names])
        same = sum(normalise(texts[n]) == normalise(bare.texts[n]) for n in names)
        peak = self.sampler.peak_mb if self.sampler else 0.0
        ok = overhead_cpu <= 5.0
        ctx.verdicts.append(("service overhead", ok))
        return "\n".join(
            [
                "| Path | Wall s | RTF wall | CPU s | RTF CPU | WER % | Peak RSS MB |",
                "|---|---:|---:|---:|---:|---:|---:|",
                f"| bare engine ({self.bare_key}, decode + transcribe) | {bare_s:.2f} "
                f"| {bare.audio_s / bare_s:.1f} | {bare_cpu:.2f} | {bare.audio_s / bare_cpu:.1f} "
                f"| {bare.wer:.2f} | {bare.peak_rss_mb:.0f} |",
                f"| HTTP `POST /transcribe` (WORKER_PROCESSES=1, CPU_THREADS={self.threads}) "
                f"| {service_s:.2f} | {audio_s / service_s:.1f} | {service_cpu:.2f} "
                f"| {audio_s / service_cpu:.1f} | {service_wer:.2f} | {peak:.0f} |",
                "",
                f"Service overhead: **{overhead_cpu:+.1f} % CPU** (target ≤ 5 %: "
                f"{'PASS' if ok else 'FAIL'}), {overhead:+.1f} % wall; transcripts identical "
                "to the bare engine's on "
                f"{same}/{len(names)} clips. The service's CPU time is its whole process tree's "
                "(Hypercorn, app, job worker, history), its peak RSS the tree's sampled every "
                "50 ms.",
                "",
                f"Of the service's wall time, {inner_s:.2f} s is its own decode + transcribe "
                f"(job timings) and {service_s - inner_s:.2f} s everything else (HTTP, upload, "
                "probe, queue, history). Per clip:",
                "",
                "| Clip | Audio s | Bare s | Service s | Service inner s | Overhead % (wall) |",
                "|---|---:|---:|---:|---:|---:|",
                *(
                    f"| {n} | {best[n].audio_s:.1f} | {bare.per_clip[n]:.2f} | {best[n].wall:.2f} "
                    f"| {best[n].server_s:.2f} "
                    f"| {100 * (best[n].wall - bare.per_clip[n]) / bare.per_clip[n]:+.1f} |"
                    for n in names
                ),
            ]
        )
