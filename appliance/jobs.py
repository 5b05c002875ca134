"""The job queue: every file transcription (upload, API) is a job.

A job has an id, a state (queued, running with percent, done, failed, cancelled), a queue
position and an ETA from the measured speed. The queue is bounded (QueueFullError -> 429 with
Retry-After); jobs run to the end even when the client that sent them goes away; the temp
file of a job is deleted in every outcome. Inference runs in worker threads, never on the
event loop; the loop only moves progress to subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import audio
from appliance.engines.base import Segment, TranscribeOptions, Transcript
from appliance.models import ModelManager

log = logging.getLogger(__name__)

FINISHED_JOBS_KEPT = 500


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class QueueFullError(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class JobCancelledError(Exception):
    pass


@dataclass
class Job:
    model: str
    options: TranscribeOptions
    audio_path: Path
    duration: float
    source: str = "api"
    filename: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: JobState = JobState.QUEUED
    percent: float = 0.0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: Transcript | None = None
    history_id: str | None = None
    error: dict[str, str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def touch(self) -> None:
        """Wake every subscriber; they re-read the job."""
        self.changed.set()
        self.changed = asyncio.Event()


class SpeedMeter:
    """Realtime factor (audio seconds per wall second, per worker), smoothed."""

    def __init__(self, initial: float = 8.0) -> None:
        self.value = initial

    def add(self, audio_seconds: float, wall_seconds: float) -> None:
        if audio_seconds > 1 and wall_seconds > 0:
            self.value = 0.7 * self.value + 0.3 * (audio_seconds / wall_seconds)


ResultHook = Callable[[Job], Awaitable[str | None]]


class JobQueue:
    def __init__(
        self,
        models: ModelManager,
        *,
        workers: int,
        max_queue: int,
        on_done: ResultHook | None = None,
    ) -> None:
        self.models = models
        self.workers = workers
        self.max_queue = max_queue
        self.on_done = on_done
        self.jobs: dict[str, Job] = {}
        self.pending: deque[Job] = deque()
        self.running: set[str] = set()
        self.speed = SpeedMeter()
        self._has_work = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]

    async def stop(self) -> None:
        for job in list(self.pending):
            self._finish(job, JobState.CANCELLED, error=("shutdown", "the server shut down"))
        self.pending.clear()
        for job in self.jobs.values():
            if not job.state.finished:
                job.cancel_flag.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- client side -----------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        if len(self.pending) >= self.max_queue:
            job.audio_path.unlink(missing_ok=True)
            raise QueueFullError(max(1, round(self.eta_seconds(len(self.pending)))))
        self.jobs[job.id] = job
        self.pending.append(job)
        self._notify_queue()
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is None or job.state.finished:
            return job
        job.cancel_flag.set()
        if job in self.pending:
            self.pending.remove(job)
            self._finish(job, JobState.CANCELLED)
            self._notify_queue()
        return job

    async def wait(self, job: Job) -> Job:
        await job.done.wait()
        return job

    async def events(self, job: Job) -> AsyncIterator[dict[str, Any]]:
        """Snapshots of the job each time it changes, ending with the final one."""
        while True:
            changed = job.changed
            snapshot = self.snapshot(job)
            yield snapshot
            if job.state.finished:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=15)

    def position(self, job: Job) -> int | None:
        try:
            return self.pending.index(job) + 1
        except ValueError:
            return None

    def eta_seconds(self, ahead: int, job: Job | None = None) -> float:
        """Seconds until `job` (with `ahead` jobs before it) is done, from measured speed."""
        remaining = sum(
            j.duration * (1 - j.percent / 100) for j in self.jobs.values() if j.id in self.running
        )
        remaining += sum(j.duration for j in list(self.pending)[:ahead])
        if job is not None:
            remaining += job.duration * (1 - job.percent / 100)
        return remaining / (self.speed.value * max(1, self.workers))

    def snapshot(self, job: Job) -> dict[str, Any]:
        position = self.position(job)
        eta = None
        if job.state == JobState.QUEUED and position is not None:
            eta = self.eta_seconds(position - 1, job)
        elif job.state == JobState.RUNNING:
            eta = job.duration * (1 - job.percent / 100) / self.speed.value
        return {
            "id": job.id,
            "state": job.state.value,
            "percent": round(job.percent, 1),
            "position": position,
            "eta_seconds": None if eta is None else round(eta, 1),
            "model": job.model,
            "filename": job.filename,
            "duration": round(job.duration, 3),
            "created": job.created,
            "started": job.started,
            "finished": job.finished,
            "history_id": job.history_id,
            "error": job.error,
            "text": job.result.text if job.result else None,
        }

    def stats(self) -> dict[str, Any]:
        return {
            "queued": len(self.pending),
            "running": len(self.running),
            "max_queue": self.max_queue,
            "workers": self.workers,
            "realtime_factor": round(self.speed.value, 2),
        }

    # --- worker side -----------------------------------------------------------------------
    def _notify_queue(self) -> None:
        """Queue positions changed: wake the waiting jobs' subscribers and idle workers."""
        for job in self.pending:
            job.touch()
        if self.pending:
            self._has_work.set()

    async def _next(self) -> Job:
        while not self.pending:
            self._has_work.clear()
            await self._has_work.wait()
        job = self.pending.popleft()
        self._notify_queue()
        return job

    async def _worker(self, index: int) -> None:
        while True:
            job = await self._next()
            self.running.add(job.id)
            try:
                await self._run(job)
            except asyncio.CancelledError:
                self._finish(job, JobState.CANCELLED, error=("shutdown", "the server shut down"))
                raise
            except JobCancelledError:
                self._finish(job, JobState.CANCELLED)
            except Exception as exc:
                code = getattr(exc, "code", "transcription_failed")
                message = getattr(exc, "message", None) or f"transcription failed: {exc}"
                log.warning("job %s failed: %s", job.id, message)
                self._finish(job, JobState.FAILED, error=(code, message))
            finally:
                self.running.discard(job.id)

    async def _run(self, job: Job) -> None:
        job.state = JobState.RUNNING
        job.started = time.time()
        job.touch()
        async with self.models.use(job.model) as model:
            t0 = time.perf_counter()
            samples = await asyncio.to_thread(audio.decode, job.audio_path)
            t1 = time.perf_counter()
            job.duration = max(job.duration, len(samples) / 16000)
            loop = asyncio.get_running_loop()

            def work() -> Transcript:
                info, segments = model.transcribe(samples, job.options)
                collected: list[Segment] = []
                for segment in segments:
                    if job.cancel_flag.is_set():
                        raise JobCancelledError
                    collected.append(segment)
                    percent = 100 * segment.end / info.duration if info.duration else 100
                    job.percent = min(99.0, percent)
                    loop.call_soon_threadsafe(job.touch)
                if job.cancel_flag.is_set():
                    raise JobCancelledError
                return Transcript.from_segments(info, collected)

            job.result = await asyncio.to_thread(work)
            t2 = time.perf_counter()
        self.speed.add(job.duration, t2 - t1)
        job.timings = {
            "decode_seconds": round(t1 - t0, 3),
            "transcribe_seconds": round(t2 - t1, 3),
            "realtime_factor": round(job.duration / max(t2 - t1, 1e-6), 2),
        }
        if self.on_done is not None:
            job.history_id = await self.on_done(job)
        self._finish(job, JobState.DONE)

    def _finish(self, job: Job, state: JobState, error: tuple[str, str] | None = None) -> None:
        job.state = state
        job.finished = time.time()
        if state == JobState.DONE:
            job.percent = 100.0
        if error:
            job.error = {"code": error[0], "message": error[1]}
        job.audio_path.unlink(missing_ok=True)
        job.done.set()
        job.touch()
        self._forget_old()

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.state.finished]
        for job in sorted(finished, key=lambda j: j.finished or 0)[:-FINISHED_JOBS_KEPT]:
            del self.jobs[job.id]
