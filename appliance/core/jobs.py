"""The job queue: every file transcription (upload, API) is a job, kept in SQLite.

A job has an id, a state (queued, running with percent, done, failed, cancelled), a queue
position and an ETA from the measured speed. The queue is bounded (QueueFullError -> 429 with
Retry-After); jobs run to the end even when the client that sent them goes away. Inference runs
in worker threads, never on the event loop; the loop only moves progress to subscribers.

Durability: an accepted job is a row of the `jobs` table and its audio a file in
`DATA_DIR/jobs` (moved there from the upload temp dir), both written before the client hears
202. At start, queued rows are queued again in their order; a row still `running` (the server
died under it) runs again, unless its audio is gone or it was already tried MAX_ATTEMPTS times
(then it fails with the reason). A graceful stop puts running jobs back to `queued`. The audio
is deleted when the job finishes; finished rows answer `GET /api/jobs/{id}` for
JOB_RETENTION_HOURS, then they and any file left in `DATA_DIR/jobs` are pruned. A path read
from the database is used only when it names a regular file directly inside `DATA_DIR/jobs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import re
import shutil
import sqlite3
import stat
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.core import audio, diarize
from appliance.core.db import Database
from appliance.core.engines import windowed
from appliance.core.engines.base import Segment, TranscribeOptions, Transcript
from appliance.core.metrics import Metrics
from appliance.core.model_manager import ModelManager
from appliance.exceptions import ApplianceError

log = logging.getLogger(__name__)

FINISHED_JOBS_KEPT = 500  # finished jobs kept in memory; older ones are read from the database
MAX_ATTEMPTS = 3  # a job the server died under this many times is not run again
PROGRESS_SAVE_SECONDS = 2.0  # how often a running job's percent is written to the database
JOB_ID = re.compile(r"[0-9a-f]{32}")
AUDIO_NAME = re.compile(r"job-[0-9a-f]{32}")

MIGRATIONS = [
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL
            CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        source TEXT NOT NULL DEFAULT 'api',
        model TEXT NOT NULL,
        options TEXT NOT NULL DEFAULT '{}',
        audio_path TEXT NOT NULL,
        filename TEXT NOT NULL DEFAULT '',
        duration REAL NOT NULL DEFAULT 0,
        percent REAL NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        timings TEXT NOT NULL DEFAULT '{}',
        history_id TEXT,
        created REAL NOT NULL,
        started REAL,
        finished REAL
    );
    CREATE INDEX jobs_state ON jobs(state, created);
    CREATE INDEX jobs_finished ON jobs(finished);
    """,
    # issue 15: webhooks (appliance/web/webhooks.py); callback_state NULL until the job finished
    # and its delivery began, then 'pending', 'delivered' or 'failed'
    """
    ALTER TABLE jobs ADD COLUMN callback_url TEXT;
    ALTER TABLE jobs ADD COLUMN callback_state TEXT;
    ALTER TABLE jobs ADD COLUMN callbacks TEXT NOT NULL DEFAULT '[]';
    """,
]


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class QueueFullError(ApplianceError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class JobStoreError(ApplianceError):
    """The job could not be stored (database or disk): it was not accepted."""


class JobCancelledError(ApplianceError):
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
    attempts: int = 0
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    saved_at: float = 0.0  # monotonic time of the last progress write
    segments: list[Segment] = field(default_factory=list)  # decoded so far (streaming)
    callback_url: str | None = None  # issue 15: webhook POSTed when the job finishes
    callback_state: str | None = None  # None, pending, delivered, failed
    callbacks: list[dict[str, Any]] = field(default_factory=list)  # delivery attempts

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
ResultLoader = Callable[[str], Awaitable[Transcript | None]]


def options_to_json(options: TranscribeOptions) -> str:
    return json.dumps(dataclasses.asdict(options))


def options_from_json(text: str) -> TranscribeOptions:
    """Options of a stored job; unknown keys are ignored, a malformed value raises ValueError."""
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("options are not an object")
    known = {f.name for f in dataclasses.fields(TranscribeOptions)}
    values = {k: v for k, v in raw.items() if k in known}
    if isinstance(values.get("temperature"), list):
        values["temperature"] = tuple(float(t) for t in values["temperature"])
    try:
        return TranscribeOptions(**values)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


class JobQueue:
    def __init__(
        self,
        models: ModelManager,
        *,
        db: Database,
        jobs_dir: Path,
        workers: int,
        max_queue: int,
        retention_hours: float = 24,
        on_done: ResultHook | None = None,
        load_result: ResultLoader | None = None,
    ) -> None:
        self.models = models
        self.db = db
        self.jobs_dir = jobs_dir
        self.data_dir = jobs_dir.parent  # where the speaker model lives (models/)
        self.workers = workers
        self.max_queue = max_queue
        self.retention_hours = retention_hours
        self.on_done = on_done
        self.load_result = load_result
        self.max_audio_duration: float | None = None  # MAX_AUDIO_DURATION, set by the app
        self.jobs: dict[str, Job] = {}
        self.pending: deque[Job] = deque()
        self.running: set[str] = set()
        self.speed = SpeedMeter()
        # issue 14: the app's Prometheus metrics (its own when `models` is a stand-in)
        self.metrics: Metrics = getattr(models, "metrics", None) or Metrics()
        self._has_work = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._incoming: set[str] = set()  # audio files moved in, rows not written yet
        # issue 15: called (on the loop) when a job finished; appliance/web/webhooks.py sets it
        self.on_finished: Callable[[Job], None] | None = None

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the table, take back the jobs a previous run left, start the workers."""
        await self.db.migrate("jobs", MIGRATIONS)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.chmod(0o700)
        await self._recover()
        await self.prune()
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._prune_periodically()))

    async def stop(self) -> None:
        """Stop the workers; queued and running jobs stay in the database for the next start."""
        interrupted = [j for j in self.jobs.values() if not j.state.finished]
        running = [j.id for j in interrupted if j.id in self.running]
        for job in interrupted:
            job.cancel_flag.set()  # a running decode stops at its next segment
        for task in self._tasks:
            task.cancel()
        for task in [*self._tasks, *self._background]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.pending.clear()
        for job_id in running:  # this run does not count as an attempt
            await self._write(
                "UPDATE jobs SET state = 'queued', started = NULL, percent = 0,"
                " attempts = max(attempts - 1, 0) WHERE id = ? AND state = 'running'",
                (job_id,),
            )
        for job in interrupted:  # wake the clients still waiting in this process
            job.error = {
                "code": "shutdown",
                "message": "the server is shutting down; the job runs again after the restart",
            }
            job.done.set()
            job.touch()

    # --- client side -----------------------------------------------------------------------
    async def submit(self, job: Job) -> Job:
        """Take over the job's audio file and store the job; only then is it accepted."""
        if len(self.pending) + len(self._incoming) >= self.max_queue:
            job.audio_path.unlink(missing_ok=True)
            self.metrics.jobs_rejected.inc()
            raise QueueFullError(max(1, round(self.eta_seconds(len(self.pending)))))
        target = self.jobs_dir / f"job-{job.id}"
        self._incoming.add(target.name)
        try:
            try:
                await asyncio.to_thread(shutil.move, job.audio_path, target)
            except OSError as exc:
                job.audio_path.unlink(missing_ok=True)
                raise JobStoreError(f"could not keep the upload: {exc}") from None
            job.audio_path = target
            try:
                await self.db.conn.execute(
                    "INSERT INTO jobs (id, state, source, model, options, audio_path, filename,"
                    " duration, created, callback_url)"
                    " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job.id,
                        job.source,
                        job.model,
                        options_to_json(job.options),
                        str(target),
                        job.filename,
                        job.duration,
                        job.created,
                        job.callback_url,
                    ),
                )
                await self.db.conn.commit()
            except (sqlite3.Error, ValueError) as exc:
                target.unlink(missing_ok=True)
                log.error("could not store job %s: %s", job.id, exc)
                raise JobStoreError(f"could not store the job: {exc}") from None
        finally:
            self._incoming.discard(target.name)
        self.jobs[job.id] = job
        self.pending.append(job)
        self.metrics.job_submitted(job)
        self._notify_queue()
        return job

    async def get(self, job_id: str) -> Job | None:
        """A job in memory, or a finished one from the database within the retention time."""
        cutoff = time.time() - self.retention_hours * 3600
        job = self.jobs.get(job_id)
        if job is not None:
            if job.state.finished and (job.finished or 0) < cutoff:
                del self.jobs[job_id]
                return None
            return job
        if not JOB_ID.fullmatch(job_id):
            return None
        try:
            async with self.db.conn.execute(
                "SELECT * FROM jobs WHERE id = ? AND (finished IS NULL OR finished >= ?)",
                (job_id, cutoff),
            ) as cur:
                row = await cur.fetchone()
        except (sqlite3.Error, ValueError):
            log.exception("could not read job %s", job_id)
            return None
        if row is None:
            return None
        job = self._from_row(row)
        if job.state == JobState.DONE and job.history_id and self.load_result is not None:
            job.result = await self.load_result(job.history_id)
        if job.state.finished:
            job.done.set()
        return job

    async def cancel(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is None:
            return await self.get(job_id)
        if job.state.finished:
            return job
        job.cancel_flag.set()
        if job in self.pending:
            self.pending.remove(job)
            await self._finish(job, JobState.CANCELLED)
            self._notify_queue()
        else:  # running: it stops at its next segment; a restart before that must not re-run it
            await self._write("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job.id,))
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
            if job.state.finished or job.done.is_set():
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
            "callback_state": job.callback_state,
            "callbacks": list(job.callbacks),
        }

    def stats(self) -> dict[str, Any]:
        return {
            "queued": len(self.pending),
            "running": len(self.running),
            "max_queue": self.max_queue,
            "workers": self.workers,
            "realtime_factor": round(self.speed.value, 2),
        }

    # --- persistence -----------------------------------------------------------------------
    async def _write(self, sql: str, args: tuple[Any, ...]) -> bool:
        """One statement, committed; a failure is logged (the job goes on in memory)."""
        try:
            await self.db.conn.execute(sql, args)
            await self.db.conn.commit()
        except (sqlite3.Error, ValueError):
            log.exception("could not save job state")
            return False
        return True

    def checked_audio(self, stored: str, job_id: str) -> Path | None:
        """The stored audio path if it is the job's own regular file in `jobs_dir`, else None.

        The database is writable by the service user and anything that gets its privileges:
        a path from it is never opened or deleted unless it is exactly where we put it.
        """
        path = Path(stored)
        expected = self.jobs_dir / f"job-{job_id}"
        if path != expected or not AUDIO_NAME.fullmatch(path.name):
            return None
        try:
            if path.parent.resolve(strict=True) != self.jobs_dir.resolve(strict=True):
                return None
            mode = path.lstat().st_mode
        except OSError:
            return None
        return path if stat.S_ISREG(mode) else None

    def _from_row(self, row: sqlite3.Row) -> Job:
        try:
            options = options_from_json(row["options"])
        except ValueError:
            options = TranscribeOptions()
        try:
            error = json.loads(row["error"]) if row["error"] else None
            timings = json.loads(row["timings"] or "{}")
        except ValueError:
            error, timings = None, {}
        job = Job(
            model=row["model"],
            options=options,
            # never the stored path itself: see checked_audio
            audio_path=self.jobs_dir / f"job-{row['id']}",
            duration=float(row["duration"] or 0),
            source=row["source"],
            filename=row["filename"],
            id=row["id"],
            state=JobState(row["state"]),
            percent=float(row["percent"] or 0),
            created=float(row["created"]),
            started=row["started"],
            finished=row["finished"],
            history_id=row["history_id"],
            error=error if isinstance(error, dict) else None,
            timings=timings if isinstance(timings, dict) else {},
            attempts=int(row["attempts"] or 0),
            callback_url=row["callback_url"],
            callback_state=row["callback_state"],
        )
        try:
            callbacks = json.loads(row["callbacks"] or "[]")
        except ValueError:
            callbacks = []
        if isinstance(callbacks, list):
            job.callbacks = [c for c in callbacks if isinstance(c, dict)]
        return job

    async def _recover(self) -> None:
        """Queue again what a previous run accepted and did not finish."""
        async with self.db.conn.execute(
            "SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY created, rowid"
        ) as cur:
            rows = list(await cur.fetchall())
        requeued = 0
        for row in rows:
            try:
                options_from_json(row["options"])
                job = self._from_row(row)
            except (ValueError, KeyError, TypeError):
                job = None
            if job is None:
                await self._write(
                    "UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?",
                    (time.time(), json.dumps(_error("invalid_job", "unreadable job")), row["id"]),
                )
                continue
            audio_ok = self.checked_audio(row["audio_path"], job.id) is not None
            self.jobs[job.id] = job
            if row["cancel_requested"]:
                await self._finish(job, JobState.CANCELLED)
            elif not audio_ok:
                await self._finish(
                    job,
                    JobState.FAILED,
                    error=(
                        "upload_missing",
                        "the server restarted and the uploaded file of this job is gone; "
                        "send it again",
                    ),
                )
            elif job.state == JobState.RUNNING and job.attempts >= MAX_ATTEMPTS:
                await self._finish(
                    job,
                    JobState.FAILED,
                    error=(
                        "server_crashed",
                        f"the server stopped {job.attempts} times while transcribing this "
                        "file; it is not tried again",
                    ),
                )
            else:
                if job.state == JobState.RUNNING:
                    log.warning(
                        "job %s was running when the server stopped: running it again", job.id
                    )
                job.state, job.percent, job.started = JobState.QUEUED, 0.0, None
                await self._write(
                    "UPDATE jobs SET state = 'queued', percent = 0, started = NULL WHERE id = ?",
                    (job.id,),
                )
                self.pending.append(job)
                requeued += 1
        if requeued:
            log.info("%d job(s) from before the restart queued again", requeued)
            self._notify_queue()

    async def prune(self) -> int:
        """Delete finished rows past the retention time and audio files no job owns."""
        cutoff = time.time() - self.retention_hours * 3600
        removed = 0
        try:
            cur = await self.db.conn.execute(
                "DELETE FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND finished < ?",
                (cutoff,),
            )
            removed = cur.rowcount
            await self.db.conn.commit()
        except (sqlite3.Error, ValueError):
            log.exception("could not prune old jobs")
        for job_id in [j.id for j in self.jobs.values() if j.state.finished]:
            if (self.jobs[job_id].finished or 0) < cutoff:
                del self.jobs[job_id]
        owned = {j.audio_path.name for j in self.jobs.values() if not j.state.finished}
        owned |= self._incoming
        try:
            entries = list(self.jobs_dir.iterdir())
        except OSError:
            entries = []
        for entry in entries:
            if entry.name in owned:
                continue
            with contextlib.suppress(OSError):
                if not stat.S_ISDIR(entry.lstat().st_mode):
                    entry.unlink()
        if removed:
            log.info("pruned %d finished job(s) older than %s h", removed, self.retention_hours)
        return removed

    async def _prune_periodically(self) -> None:
        interval = min(3600.0, self.retention_hours * 3600 / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.prune()
            except Exception:
                log.exception("job pruning failed")

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
                raise  # shutdown: stop() puts the job back to queued for the next start
            except JobCancelledError:
                await self._finish(job, JobState.CANCELLED)
            except Exception as exc:
                code = getattr(exc, "code", "transcription_failed")
                message = getattr(exc, "message", None) or f"transcription failed: {exc}"
                log.warning("job %s failed: %s", job.id, message)
                await self._finish(job, JobState.FAILED, error=(code, message))
            finally:
                self.running.discard(job.id)

    def _progress(self, job: Job) -> None:
        """On the loop, after each segment: wake subscribers, now and then save the percent."""
        job.touch()
        now = time.monotonic()
        if now - job.saved_at >= PROGRESS_SAVE_SECONDS:
            job.saved_at = now
            task = asyncio.create_task(
                self._write(
                    "UPDATE jobs SET percent = ? WHERE id = ? AND state = 'running'",
                    (round(job.percent, 1), job.id),
                )
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _run(self, job: Job) -> None:
        job.state = JobState.RUNNING
        job.started = time.time()
        job.attempts += 1
        job.saved_at = time.monotonic()
        await self._write(
            "UPDATE jobs SET state = 'running', started = ?, percent = 0, attempts = ?"
            " WHERE id = ?",
            (job.started, job.attempts, job.id),
        )
        self.metrics.job_started(job)
        job.touch()
        async with self.models.use(job.model) as model:
            t0 = time.perf_counter()
            # decoded into an anonymous temp file, transcribed in windows: bounded memory
            samples = await asyncio.to_thread(
                audio.decode_to_file, job.audio_path, self.max_audio_duration
            )
            t1 = time.perf_counter()
            job.duration = max(job.duration, len(samples) / 16000)
            loop = asyncio.get_running_loop()

            def work() -> Transcript:
                info, segments = windowed.transcribe(model, samples, job.options)
                collected: list[Segment] = []
                job.segments = collected  # read on the loop by streaming responses
                for segment in segments:
                    if job.cancel_flag.is_set():
                        raise JobCancelledError
                    collected.append(segment)
                    percent = 100 * segment.end / info.duration if info.duration else 100
                    job.percent = min(99.0, percent)
                    loop.call_soon_threadsafe(self._progress, job)
                if job.cancel_flag.is_set():
                    raise JobCancelledError
                if job.options.diarize:  # issue 15: who said what
                    started = time.perf_counter()
                    collected[:] = diarize.run(samples, collected, job.options, self.data_dir)
                    job.timings["diarize_seconds"] = round(time.perf_counter() - started, 3)
                return Transcript.from_segments(info, collected)

            try:
                job.result = await asyncio.to_thread(work)
            finally:
                samples.close()
            t2 = time.perf_counter()
        self.speed.add(job.duration, t2 - t1)
        self.metrics.job_transcribed(job, t2 - t1)
        job.timings = {
            **job.timings,  # diarize_seconds
            "decode_seconds": round(t1 - t0, 3),
            "transcribe_seconds": round(t2 - t1, 3),
            "realtime_factor": round(job.duration / max(t2 - t1, 1e-6), 2),
        }
        if self.on_done is not None:
            job.history_id = await self.on_done(job)
        await self._finish(job, JobState.DONE)

    async def _finish(
        self, job: Job, state: JobState, error: tuple[str, str] | None = None
    ) -> None:
        job.state = state
        job.finished = time.time()
        if state == JobState.DONE:
            job.percent = 100.0
        if error:
            job.error = _error(*error)
        await self._write(
            "UPDATE jobs SET state = ?, finished = ?, percent = ?, error = ?, timings = ?,"
            " history_id = ?, duration = ? WHERE id = ?",
            (
                state.value,
                job.finished,
                round(job.percent, 1),
                json.dumps(job.error) if job.error else None,
                json.dumps(job.timings),
                job.history_id,
                job.duration,
                job.id,
            ),
        )
        # the path is ours (made in submit, or rebuilt from the id at recovery)
        with contextlib.suppress(OSError):
            job.audio_path.unlink(missing_ok=True)
        job.done.set()
        job.touch()
        self.metrics.job_finished(job)
        if self.on_finished is not None:
            try:
                self.on_finished(job)
            except Exception:
                log.exception("finish hook failed for job %s", job.id)
        self._forget_old()

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.state.finished]
        for job in sorted(finished, key=lambda j: j.finished or 0)[:-FINISHED_JOBS_KEPT]:
            del self.jobs[job.id]


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}
