"""Soak: mixed real traffic against one real server for a set time (`make bench`, `make soak`).

One `whisper-appliance serve` subprocess (plain HTTP, temp data dir, tiny.en, the rate limits
raised) gets, all at once and for `--minutes` (default 5; `SOAK_MINUTES`):

- uploads: real clips (JFK, LibriVox) by `POST /transcribe`, `POST /api/jobs` (then polled
  to the end) and `POST /v1/audio/transcriptions`, each with an API key;
- live sessions: a clip streamed at real-time pace over `/ws/live`, `stop`, the `end`;
- history reads: the list, a full-text search, one entry, its SRT export;
- admin calls with a session and its CSRF token: status, logs, settings (read and a harmless
  write), API keys (create and revoke).

Every response that is not the expected one, every exception and every failed job or live
error counts as an error. The server's RSS (its whole process tree) is measured at rest twice:
after the warm-up (default 20 % of the time, at least 30 s) and at the end — each time every
workload is paused and its in-flight work finished first, so transient buffers of a running
transcription do not count, only what stays. It is also sampled every 2 s under load (means of
the first and last 20 s, peak). Pass: 0 errors and RSS growth at rest under 10 %. The report
(latency p50/p95 per kind, RSS, verdict) is printed and replaces the "Soak" section of
`bench/results.md`.

Alone: `python -m bench.soak [--minutes 5] [--warmup SECONDS] [--uploaders 2]`; `bench.run`
keeps the last Soak section when it rewrites the results file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common
from bench.common import ROOT, Clip, clips

RESULTS = ROOT / "bench" / "results.md"
SECTION = "## Soak"
RSS_WINDOW = 20.0
IDLE_SETTLE = 3.0
MAX_RSS_GROWTH = 10.0
SEARCH_WORDS = ("country", "americans", "ask", "the", "zzzz", "fellow*", '"what you"')


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    idle_start: float | None = None  # MB, the server at rest after the warm-up
    idle_end: float | None = None  # MB, the server at rest after the soak

    def ok(self, kind: str, seconds: float) -> None:
        self.latencies[kind].append(seconds)

    def error(self, kind: str, message: str) -> None:
        self.errors[kind] += 1
        if len(self.messages) < 20:
            self.messages.append(f"{kind}: {message}")
        print(f"soak: ERROR {kind}: {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


class Server:
    """`whisper-appliance serve` in a subprocess with a temp data dir."""

    def __init__(self) -> None:
        from tests.conftest import free_port

        self.tmp = tempfile.TemporaryDirectory(prefix="bench-soak-")
        self.data_dir = Path(self.tmp.name) / "data"
        port = free_port()
        settings = {
            "WHISPER_MODEL": "tiny.en",
            "API_RATE_LIMIT": "100000/minute",
            "LOGIN_RATE_LIMIT": "100000/minute",
        }
        self.log = Path(self.tmp.name) / "server.log"
        self.process = common.start_service(self.data_dir, self.log, port, settings)
        self.url = f"http://127.0.0.1:{port}"

    def wait_healthy(self, timeout: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server did not become healthy:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.tmp.cleanup()


class Soak:
    def __init__(self, url: str, password: str, clip_list: list[Clip], until: float) -> None:
        import httpx

        self.url = url
        self.password = password
        self.clips = clip_list
        self.until = until
        self.stats = Stats()
        self.rng = random.Random(12)  # a reproducible mix
        self.admin = httpx.AsyncClient(base_url=url, timeout=120)
        self.api = httpx.AsyncClient(base_url=url, timeout=300)
        self.csrf = ""
        self.key = ""
        self.history_ids: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.busy = 0

    def running(self) -> bool:
        return time.monotonic() < self.until

    async def login(self) -> None:
        page = await self.admin.get("/admin/login")
        token = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        if not token:
            raise RuntimeError("no login token on /admin/login")
        response = await self.admin.post(
            "/admin/api/login",
            json={"password": self.password},
            headers={"X-CSRF-Token": token.group(1)},
        )
        response.raise_for_status()
        page = await self.admin.get("/admin/settings")
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        if not csrf:
            raise RuntimeError("no CSRF token on /admin/settings")
        self.csrf = csrf.group(1)
        created = await self.admin.post(
            "/admin/api/keys", json={"name": "soak"}, headers={"X-CSRF-Token": self.csrf}
        )
        created.raise_for_status()
        self.key = created.json()["key"]
        self.api.headers["Authorization"] = f"Bearer {self.key}"

    async def timed(self, kind: str, expected: tuple[int, ...], coro: Any) -> Any:
        """Await a request; record its latency, or an error when it is not as expected."""
        started = time.monotonic()
        try:
            response = await coro
        except Exception as exc:
            self.stats.error(kind, f"{type(exc).__name__}: {exc}")
            return None
        if response.status_code not in expected:
            self.stats.error(kind, f"HTTP {response.status_code}: {response.text[:200]}")
            return None
        self.stats.ok(kind, time.monotonic() - started)
        return response

    # --- the workloads -------------------------------------------------------------------
    async def uploads(self, worker: int) -> None:
        kinds = ("transcribe", "job", "openai")
        index = worker
        async for _ in self.turns():
            clip = self.rng.choice(self.clips)
            kind = kinds[index % len(kinds)]
            index += 1
            data = clip.path.read_bytes()
            files = {"file": (clip.path.name, data, "audio/wav")}
            if kind == "transcribe":
                await self.timed(
                    kind, (200,), self.api.post("/transcribe", files=files, data={"language": "en"})
                )
            elif kind == "openai":
                await self.timed(
                    kind,
                    (200,),
                    self.api.post(
                        "/v1/audio/transcriptions", files=files, data={"model": "whisper-1"}
                    ),
                )
            else:
                await self.job(files)

    async def job(self, files: dict[str, Any]) -> None:
        started = time.monotonic()
        try:
            response = await self.api.post("/api/jobs", files=files)
            if response.status_code != 202:
                self.stats.error("job", f"submit HTTP {response.status_code}: {response.text}")
                return
            job_id = response.json()["id"]
            while True:
                await asyncio.sleep(0.5)
                state = await self.api.get(f"/api/jobs/{job_id}")
                if state.status_code != 200:
                    self.stats.error("job", f"poll HTTP {state.status_code}: {state.text[:200]}")
                    return
                body = state.json()
                if body.get("state") == "done":
                    break
                if body.get("state") in ("failed", "cancelled"):
                    self.stats.error("job", f"job {job_id} {body.get('state')}: {body}")
                    return
            result = await self.api.get(f"/api/jobs/{job_id}/result")
            if result.status_code != 200:
                self.stats.error("job", f"result HTTP {result.status_code}")
                return
        except Exception as exc:
            self.stats.error("job", f"{type(exc).__name__}: {exc}")
            return
        self.stats.ok("job", time.monotonic() - started)

    async def live(self) -> None:
        from bench.live import stream_clip

        async for _ in self.turns():
            clip = self.rng.choice(self.clips)
            started = time.monotonic()
            try:
                run = await stream_clip(self.url, clip)
            except Exception as exc:
                self.stats.error("live", f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1)
                continue
            if run.error:
                self.stats.error("live", run.error)
            elif not run.text.strip() or run.server_samples != run.sent_samples:
                self.stats.error(
                    "live", f"{clip.name}: text {run.text!r}, samples {run.server_samples}"
                )
            else:
                self.stats.ok("live session", time.monotonic() - started)
                for value in run.finals:
                    self.stats.ok("live final", value)

    async def history(self) -> None:
        async for _ in self.turns():
            page = await self.timed("history list", (200,), self.api.get("/api/history"))
            if page is not None:
                self.history_ids = [str(item["id"]) for item in page.json()["items"]]
            word = self.rng.choice(SEARCH_WORDS)
            await self.timed(
                "history search", (200,), self.api.get("/api/history", params={"q": word})
            )
            if self.history_ids:
                entry = self.rng.choice(self.history_ids)
                # 404: an entry that retention or a concurrent delete removed meanwhile
                await self.timed("history entry", (200, 404), self.api.get(f"/api/history/{entry}"))
                await self.timed(
                    "history export",
                    (200, 404),
                    self.api.get(f"/api/history/{entry}/export", params={"format": "srt"}),
                )
            await asyncio.sleep(0.25)

    async def admin_calls(self) -> None:
        headers = {"X-CSRF-Token": self.csrf}
        turn = 0
        async for _ in self.turns():
            await self.timed("admin read", (200,), self.admin.get("/admin/api/status"))
            await self.timed(
                "admin read", (200,), self.admin.get("/admin/api/logs", params={"lines": "100"})
            )
            await self.timed("admin read", (200,), self.admin.get("/admin/api/settings"))
            await self.timed("admin read", (200,), self.admin.get("/admin/api/keys"))
            days = 3650 + turn % 2  # a harmless write, changed back and forth
            await self.timed(
                "admin write",
                (200,),
                self.admin.put(
                    "/admin/api/settings", json={"history_retention_days": days}, headers=headers
                ),
            )
            created = await self.timed(
                "admin write",
                (201,),
                self.admin.post("/admin/api/keys", json={"name": f"soak {turn}"}, headers=headers),
            )
            if created is not None:
                key_id = created.json()["id"]
                await self.timed(
                    "admin write",
                    (200,),
                    self.admin.delete(f"/admin/api/keys/{key_id}", headers=headers),
                )
            turn += 1
            await asyncio.sleep(1.0)

    async def turns(self) -> AsyncIterator[None]:
        """One iteration of a workload per item, while the soak runs and is not paused."""
        while True:
            await self.gate.wait()
            if not self.running():
                return
            self.busy += 1
            try:
                yield
            finally:
                self.busy -= 1

    async def idle_rss(self, pid: int) -> float:
        """Let every workload finish what it is doing, then the server's RSS at rest (MB)."""
        paused = time.monotonic()
        self.gate.clear()
        deadline = paused + 180
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(IDLE_SETTLE)
        samples = []
        for _ in range(5):
            samples.append(tree_rss(pid))
            await asyncio.sleep(0.5)
        self.until += time.monotonic() - paused  # the pause does not count as soak time
        self.gate.set()
        return statistics.median(samples) / 2**20

    async def sample_rss(self, pid: int, started: float, warmup: float) -> None:
        while self.running():
            if self.stats.idle_start is None and time.monotonic() - started >= warmup:
                self.stats.idle_start = await self.idle_rss(pid)
            self.stats.rss.append((time.monotonic() - started, tree_rss(pid)))
            await asyncio.sleep(2.0)

    async def run(self, pid: int, uploaders: int, warmup: float) -> None:
        await self.login()
        started = time.monotonic()
        tasks = [
            *(self.uploads(i) for i in range(uploaders)),
            self.live(),
            self.history(),
            self.admin_calls(),
            self.sample_rss(pid, started, warmup),
        ]
        await asyncio.gather(*tasks)
        self.stats.idle_end = await self.idle_rss(pid)
        await self.admin.aclose()
        await self.api.aclose()


def report(stats: Stats, minutes: float, warmup: float, uploaders: int) -> tuple[str, bool]:
    lines = [
        SECTION,
        "",
        f"`python -m bench.soak` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC: "
        f"{minutes:g} min against one real server (tiny.en, int8, plain HTTP), {os.cpu_count()} "
        f"CPUs, load average at the end {os.getloadavg()[0]:.1f}. At once: {uploaders} upload "
        "loop(s) (`/transcribe`, `/api/jobs` + polling, `/v1/audio/transcriptions`, real "
        "clips), one live session after another over `/ws/live` (real-time pace), history reads "
        "and searches every 0.25 s, admin reads and writes every second. Latency in seconds "
        "(an upload's includes its transcription; `live final` is the end of speech → `final`).",
        "",
        "| Kind | Requests | Errors | p50 s | p95 s | max s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    kinds = sorted(set(stats.latencies) | set(stats.errors))
    for kind in kinds:
        values = stats.latencies.get(kind, [])
        lines.append(
            f"| {kind} | {len(values) + stats.errors.get(kind, 0)} | {stats.errors.get(kind, 0)} "
            f"| {percentile(values, 0.5):.2f} | {percentile(values, 0.95):.2f} "
            f"| {max(values, default=float('nan')):.2f} |"
        )
    errors = sum(stats.errors.values())
    after = [(t, r) for t, r in stats.rss if t >= warmup]
    start_window = [r for t, r in after if t < warmup + RSS_WINDOW]
    end_at = after[-1][0] if after else 0.0
    end_window = [r for t, r in after if t > end_at - RSS_WINDOW]
    nan = float("nan")
    load_start = statistics.mean(start_window) / 2**20 if start_window else nan
    load_end = statistics.mean(end_window) / 2**20 if end_window else nan
    idle_start = stats.idle_start if stats.idle_start is not None else nan
    idle_end = stats.idle_end if stats.idle_end is not None else nan
    growth = 100.0 * (idle_end - idle_start) / idle_start
    load_growth = 100.0 * (load_end - load_start) / load_start
    peak = max((r for _, r in stats.rss), default=0) / 2**20
    quarters = []
    if after:
        span = (end_at - warmup) / 4 or 1.0
        for q in range(4):
            part = [r for t, r in after if warmup + q * span <= t <= warmup + (q + 1) * span]
            quarters.append(f"{statistics.mean(part) / 2**20:.0f}" if part else "-")
    passed = errors == 0 and growth < MAX_RSS_GROWTH
    lines += [
        "",
        "Server RSS (whole process tree), at rest — every workload paused, in-flight work "
        f"finished, {IDLE_SETTLE:g} s settled — after the {warmup:g} s warm-up: "
        f"{idle_start:.0f} MB; after the soak: {idle_end:.0f} MB: **{growth:+.1f} %**. "
        f"Under load: {load_start:.0f} MB (mean of the first {RSS_WINDOW:g} s after the "
        f"warm-up), {load_end:.0f} MB (mean of the last {RSS_WINDOW:g} s), {load_growth:+.1f} %; "
        f"peak {peak:.0f} MB; mean per quarter of the soak after the warm-up: "
        f"{' / '.join(quarters)} MB.",
        "",
        f"Soak verdict (0 errors, RSS growth at rest < {MAX_RSS_GROWTH:g} %): "
        f"{errors} error(s), RSS {growth:+.1f} % → **{'PASS' if passed else 'FAIL'}**",
    ]
    if stats.messages:
        lines += ["", "First errors:", "", *(f"- `{m}`" for m in stats.messages)]
    return "\n".join(lines) + "\n", passed


def current_section(out: Path) -> str | None:
    """The Soak section of the results file, if it has one (kept by `bench.run`)."""
    text = out.read_text(encoding="utf-8") if out.is_file() else ""
    start = text.find(f"\n{SECTION}\n")
    if start < 0:
        return None
    end = text.find("\n## ", start + 1)
    return text[start + 1 : end if end >= 0 else None].rstrip("\n") + "\n"


def write_section(text: str, out: Path) -> None:
    """Replace the Soak section of the results file (or append it)."""
    common.write_section(SECTION, text, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "5")))
    parser.add_argument("--warmup", type=float, default=None, help="seconds (default: 20 %%)")
    parser.add_argument("--uploaders", type=int, default=2, help="concurrent upload loops")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="exit 1 when the verdict is FAIL")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(30.0, 0.2 * args.minutes * 60)

    server = Server()
    try:
        server.wait_healthy()
        password = (server.data_dir / "admin-password.txt").read_text().strip()
        soak = Soak(server.url, password, clips(), time.monotonic() + args.minutes * 60)
        print(f"soak: {args.minutes:g} min against {server.url}", file=sys.stderr, flush=True)
        asyncio.run(soak.run(server.process.pid, args.uploaders, warmup))
        if server.process.poll() is not None:
            soak.stats.error("server", f"exited with {server.process.returncode}")
    finally:
        server.stop()
    text, passed = report(soak.stats, args.minutes, warmup, args.uploaders)
    write_section(text, args.out)
    print(text)
    return 1 if args.check and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
