"""The job queue: every file transcription (upload, API) is a job, kept in the database.

A job has an id, a state (queued, running with percent, done, failed, cancelled), a queue
position and an ETA from the measured speed. The queue is bounded (QueueFullError -> 429 with
Retry-After); jobs run to the end even when the client that sent them goes away. Inference runs
in worker threads, never on the event loop; the loop only moves progress to subscribers.

Durability (SQLite; PostgreSQL below): an accepted job is a row of the `jobs` table and its
audio a file in `DATA_DIR/jobs` (moved there from the upload temp dir), both written before
the client hears 202. At start, queued rows are queued again in their order; a row still
`running` (the server died under it) runs again, unless its audio is gone or it was already
tried MAX_ATTEMPTS times (then it fails with the reason). A graceful stop puts running jobs
back to `queued`. The audio is deleted when the job finishes; finished rows answer
`GET /api/jobs/{id}` for JOB_RETENTION_HOURS, then they and any file left in `DATA_DIR/jobs`
are pruned. A path read from the database is used only when it names a regular file directly
inside `DATA_DIR/jobs`.

On PostgreSQL (`DATABASE_URL`) several appliances share the queue and it survives a node (the
queue's bound and positions are the cluster's; retention and a graceful stop work as above). A
worker claims the oldest claimable row with `SELECT ... FOR UPDATE SKIP LOCKED` (one statement,
so two nodes never claim the same row) and writes its node and a lease (`lease_until`, on the
database's clock, JOB_LEASE_SECONDS ahead); it renews the lease every third of it while the job
runs. A row whose lease expired (its node died or hung) is claimable again by any node, its
attempt counted: after MAX_ATTEMPTS such crashes it fails as on SQLite. A node restarted on the
same DATA_DIR (its id is kept in `DATA_DIR/node-id`) takes back its own running rows at once.
Every change of a job is announced with NOTIFY on CHANNEL: each node LISTENs, and then its idle
workers try a claim and it re-reads the cluster's queue and the jobs it follows (submitted or
looked at there), so status, queue positions, progress (saved every PROGRESS_SAVE_SECONDS) and
completion reach every node, and `GET /api/jobs/{id}` (read from the row) and its events work
on whichever node the load balancer picks. Polling every POLL_SECONDS is the fallback for a
lost notification connection.

Where the audio lives on PostgreSQL: in the database itself, table `job_audio`, in bytea chunks
of AUDIO_CHUNK bytes, written with the row in one transaction and streamed in and out one
chunk at a time (a 100 MB upload is never in memory whole). Any node that can reach the
database can then run any job, with nothing else to set up, secure, back up or keep consistent:
a shared file system (NFS) or an object store would be a second shared service whose outage or
split from the database loses jobs, and whose files a dead node's rows would have to be matched
with. The cost is database traffic and size for the minutes a job waits; the chunks are deleted
when the job finishes (and with the row at the latest). The node that runs the job streams the
audio to a file in its own `DATA_DIR/jobs` and deletes it afterwards.
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
import socket
import stat
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from appliance.core import audio, diarize
from appliance.core.db import DB_ERRORS, AnyDatabase, PgConnection, PostgresDatabase, to_pyformat
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
NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,100}")
AUDIO_CHUNK = 1 << 20  # bytes per job_audio row on PostgreSQL
POLL_SECONDS = 1.0  # PostgreSQL: how often idle workers look for work and nodes re-read jobs
CHANNEL = "whisper_jobs"  # PostgreSQL: NOTIFY channel, one notification per change of a job
DB_FAILURES: tuple[type[Exception], ...] = (*DB_ERRORS, ValueError)

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

PG_MIGRATIONS = [
    # the SQLite schema, plus: `seq` (the queue's order; SQLite has rowid), the claiming node
    # and its lease, and the audio itself (audio_path is '' here: see the module doc)
    """
    CREATE TABLE jobs (
        seq BIGSERIAL UNIQUE,
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL
            CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        source TEXT NOT NULL DEFAULT 'api',
        model TEXT NOT NULL,
        options TEXT NOT NULL DEFAULT '{}',
        audio_path TEXT NOT NULL DEFAULT '',
        filename TEXT NOT NULL DEFAULT '',
        duration DOUBLE PRECISION NOT NULL DEFAULT 0,
        percent DOUBLE PRECISION NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        timings TEXT NOT NULL DEFAULT '{}',
        history_id TEXT,
        created DOUBLE PRECISION NOT NULL,
        started DOUBLE PRECISION,
        finished DOUBLE PRECISION,
        callback_url TEXT,
        callback_state TEXT,
        callbacks TEXT NOT NULL DEFAULT '[]',
        node TEXT,
        lease_until DOUBLE PRECISION
    );
    CREATE INDEX jobs_state ON jobs(state, seq);
    CREATE INDEX jobs_finished ON jobs(finished);
    CREATE TABLE job_audio (
        job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        chunk INTEGER NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (job_id, chunk)
    );
    """,
]
JOB_MIGRATIONS = {"sqlite": MIGRATIONS, "postgresql": PG_MIGRATIONS}

INSERT_JOB = (
    "INSERT INTO jobs (id, state, source, model, options, audio_path, filename,"
    " duration, created, callback_url)"
    " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)"
)
# times of leases on the database's clock: nodes' clocks may differ
CLAIM_JOB = """
    UPDATE jobs SET state = 'running', node = ?, attempts = attempts + 1, percent = 0,
        started = extract(epoch FROM clock_timestamp())::float8,
        lease_until = extract(epoch FROM clock_timestamp())::float8 + ?
    WHERE id = (
        SELECT id FROM jobs
        WHERE state = 'queued'
            OR (state = 'running' AND lease_until < extract(epoch FROM clock_timestamp()))
        ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING *
"""
RENEW_LEASE = """
    UPDATE jobs SET lease_until = extract(epoch FROM clock_timestamp())::float8 + ?
    WHERE id = ? AND node = ? AND state = 'running'
    RETURNING cancel_requested
"""
FOLLOWED = (
    "state",
    "percent",
    "started",
    "finished",
    "history_id",
    "error",
    "timings",
    "attempts",
    "duration",
    "callback_state",
    "callbacks",
)
"""What a node reads back of a job another node runs."""


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


class AudioMissingError(ApplianceError):
    """PostgreSQL: the job's audio is not in the database (deleted by hand, or pruned)."""

    code = "upload_missing"


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
        db: AnyDatabase,
        jobs_dir: Path,
        workers: int,
        max_queue: int,
        retention_hours: float = 24,
        on_done: ResultHook | None = None,
        load_result: ResultLoader | None = None,
        lease_seconds: float = 30,
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
        self.lease_seconds = lease_seconds  # PostgreSQL: JOB_LEASE_SECONDS
        self.shared = isinstance(db, PostgresDatabase)  # several nodes share the queue
        self.node = ""  # PostgreSQL: this node's id in the `node` column (set at start)
        # PostgreSQL: false while this node drains for a rolling update (appliance.web.cluster):
        # the other nodes take the queued jobs, this one finishes what it runs
        self.claiming = True
        # the queue's statements; on PostgreSQL a connection of its own (see _exec)
        self._conn: Any = db.conn
        self._lock = asyncio.Lock()
        self._lost: set[str] = set()  # PostgreSQL: jobs running here another node took over
        self._poked = asyncio.Event()  # PostgreSQL: a job changed somewhere (NOTIFY)
        self._leases: set[asyncio.Task[None]] = set()  # PostgreSQL: renewing running jobs
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
        await self.db.migrate("jobs", JOB_MIGRATIONS)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.chmod(0o700)
        if isinstance(self.db, PostgresDatabase):
            self._conn = await PgConnection.connect(self.db.conn.url)
            self.node = await asyncio.to_thread(self._node_id)
            # this node died under these (it had their lease): claimable now, not after it
            await self._exec(
                (
                    "UPDATE jobs SET lease_until = 0 WHERE node = ? AND state = 'running'",
                    (self.node,),
                )
            )
            await self._refresh()
        else:
            await self._recover()
        await self.prune()
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._prune_periodically()))
        if self.shared:
            self._tasks.append(asyncio.create_task(self._follow()))
            self._tasks.append(asyncio.create_task(self._listen()))

    async def stop(self) -> None:
        """Stop the workers; queued and running jobs stay in the database for the next start."""
        interrupted = [j for j in self.jobs.values() if not j.state.finished]
        running = [j.id for j in interrupted if j.id in self.running]
        for job in interrupted:
            job.cancel_flag.set()  # a running decode stops at its next segment
        # never while one of them waits for a statement: psycopg would then first ask the
        # server to cancel it and wait up to 5 s for that (a slow stop on PostgreSQL)
        async with self._lock:
            for task in [*self._tasks, *self._leases]:
                task.cancel()
        for task in [*self._tasks, *self._background]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.pending.clear()
        for job_id in running:  # this run does not count as an attempt
            if self.shared:
                await self._write(
                    "UPDATE jobs SET state = 'queued', started = NULL, percent = 0, node = NULL,"
                    " lease_until = NULL, attempts = greatest(attempts - 1, 0)"
                    " WHERE id = ? AND state = 'running' AND node = ?",
                    (job_id, self.node),
                )
            else:
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
        if self._conn is not self.db.conn:
            await self._conn.close()

    # --- client side -----------------------------------------------------------------------
    async def submit(self, job: Job) -> Job:
        """Take over the job's audio file and store the job; only then is it accepted."""
        if self.shared:
            await self._refresh_quietly()  # the bound is the cluster's queue
        if len(self.pending) + len(self._incoming) >= self.max_queue:
            job.audio_path.unlink(missing_ok=True)
            self.metrics.jobs_rejected.inc()
            raise QueueFullError(max(1, round(self.eta_seconds(len(self.pending)))))
        target = self.jobs_dir / f"job-{job.id}"
        self._incoming.add(target.name)
        try:
            if self.shared:
                await self._store_in_database(job)
            else:
                await self._store_in_file(job, target)
        finally:
            self._incoming.discard(target.name)
        job.audio_path = target  # PostgreSQL: where the node that runs it puts its copy
        self.jobs[job.id] = job
        if self.shared:
            await self._refresh_quietly()
        else:
            self.pending.append(job)
        self.metrics.job_submitted(job)
        self._notify_queue()
        return job

    def _row_values(self, job: Job, audio_path: str) -> tuple[Any, ...]:
        return (
            job.id,
            job.source,
            job.model,
            options_to_json(job.options),
            audio_path,
            job.filename,
            job.duration,
            job.created,
            job.callback_url,
        )

    async def _store_in_file(self, job: Job, target: Path) -> None:
        try:
            await asyncio.to_thread(shutil.move, job.audio_path, target)
        except OSError as exc:
            job.audio_path.unlink(missing_ok=True)
            raise JobStoreError(f"could not keep the upload: {exc}") from None
        try:
            await self._exec((INSERT_JOB, self._row_values(job, str(target))))
        except DB_FAILURES as exc:
            await asyncio.to_thread(target.unlink, missing_ok=True)
            log.error("could not store job %s: %s", job.id, exc)
            raise JobStoreError(f"could not store the job: {exc}") from None

    async def _store_in_database(self, job: Job) -> None:
        """Row and audio in one transaction, on a connection of its own: no node sees the job
        before all of its audio, and the upload neither waits for the queue's statements nor
        holds them up. The upload's temp file is gone afterwards either way."""
        assert isinstance(self.db, PostgresDatabase)
        try:
            conn = await psycopg.AsyncConnection.connect(self.db.conn.url, connect_timeout=10)
            async with conn, conn.transaction():
                await conn.execute(to_pyformat(INSERT_JOB), self._row_values(job, ""))
                with job.audio_path.open("rb") as upload:
                    chunk = 0
                    while data := await asyncio.to_thread(upload.read, AUDIO_CHUNK):
                        await conn.execute(
                            "INSERT INTO job_audio (job_id, chunk, data) VALUES (%s, %s, %s)",
                            (job.id, chunk, data),
                        )
                        chunk += 1
                await conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
        except (psycopg.Error, OSError, ValueError) as exc:
            log.error("could not store job %s: %s", job.id, exc)
            raise JobStoreError(f"could not store the job: {exc}") from None
        finally:
            job.audio_path.unlink(missing_ok=True)

    async def get(self, job_id: str) -> Job | None:
        """A job in memory, or a finished one from the database within the retention time."""
        cutoff = time.time() - self.retention_hours * 3600
        job = self.jobs.get(job_id)
        if job is not None:
            if job.state.finished and (job.finished or 0) < cutoff:
                del self.jobs[job_id]
                return None
            if self.shared and not job.state.finished and job.id not in self.running:
                await self._refresh_quietly(job.id)  # another node may run it: read it now
            return job
        if not JOB_ID.fullmatch(job_id):
            return None
        try:
            rows, _ = await self._exec(
                (
                    "SELECT * FROM jobs WHERE id = ? AND (finished IS NULL OR finished >= ?)",
                    (job_id, cutoff),
                )
            )
        except DB_FAILURES:
            log.exception("could not read job %s", job_id)
            return None
        if not rows:
            return None
        job = self._from_row(rows[0])
        if job.state.finished:
            await self._done(job)
        elif self.shared:  # submitted on another node: followed from now on
            self.jobs[job.id] = job
            await self._refresh_quietly(job.id)  # and its place in the cluster's queue
        return job

    async def _done(self, job: Job) -> None:
        """A job finished elsewhere (another node, a previous run): its result, its waiters."""
        if job.state == JobState.DONE and job.history_id and self.load_result is not None:
            job.result = await self.load_result(job.history_id)
            if job.result is not None and not job.segments:  # streams get the text at once
                job.segments = list(job.result.segments)
        job.done.set()

    async def cancel(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is None:
            job = await self.get(job_id)
            if job is None or not self.shared:
                return job
        if job.state.finished:
            return job
        job.cancel_flag.set()
        if self.shared:
            await self._cancel_shared(job)
        elif job in self.pending:
            self.pending.remove(job)
            await self._finish(job, JobState.CANCELLED)
            self._notify_queue()
        else:  # running: it stops at its next segment; a restart before that must not re-run it
            await self._write("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job.id,))
        return job

    async def _cancel_shared(self, job: Job) -> None:
        """A queued job is cancelled at once, on whichever node; a running one by the node
        that runs it, which reads `cancel_requested` when it renews the lease (a node that
        claims a job with the flag set cancels it instead of running it)."""
        try:
            rows, _ = await self._exec(
                ("UPDATE jobs SET cancel_requested = 1 WHERE id = ? RETURNING state", (job.id,))
            )
        except DB_FAILURES:
            log.exception("could not cancel job %s", job.id)
            return
        if rows and rows[0]["state"] == JobState.QUEUED:
            await self._finish(job, JobState.CANCELLED)
            await self._refresh_quietly()
            self._notify_queue()

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
        """1 for the next job to run; by id (PostgreSQL: the queue holds other nodes' jobs
        as read from the table, not the objects this node follows)."""
        for index, queued in enumerate(self.pending, start=1):
            if queued.id == job.id:
                return index
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
    async def _exec(
        self, *statements: tuple[str, tuple[Any, ...]], quiet: bool = False
    ) -> tuple[list[Any], int]:
        """The statements as one transaction, under the queue's lock: the rows and rowcount of
        the first. On PostgreSQL the connection is the queue's own, so no other component's
        statement (or its rollback) lands inside a claim or a finish; a change is announced
        to the nodes (NOTIFY, sent at the commit) unless `quiet`."""
        changes = any(not sql.lstrip().startswith("SELECT") for sql, _ in statements)
        if self.shared and changes and not quiet:
            statements = (*statements, ("SELECT pg_notify(?, '')", (CHANNEL,)))
        async with self._lock:
            rows: list[Any] = []
            count = 0
            for index, (sql, args) in enumerate(statements):
                async with self._conn.execute(sql, args) as cur:
                    if index == 0:
                        rows = list(await cur.fetchall())
                        count = cur.rowcount
            await self._conn.commit()
        return rows, count

    async def _write(
        self, sql: str, args: tuple[Any, ...], *more: tuple[str, tuple[Any, ...]]
    ) -> bool:
        """Statements, committed; a failure is logged (the job goes on in memory)."""
        try:
            await self._exec((sql, args), *more)
        except DB_FAILURES:
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

    def _from_row(self, row: Any) -> Job:
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
        rows, _ = await self._exec(
            ("SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY created, rowid", ())
        )
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
        statements: list[tuple[str, tuple[Any, ...]]] = [
            (
                "DELETE FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND finished < ?",
                (cutoff,),
            )
        ]
        if self.shared:  # audio of jobs finished while their node died before deleting it
            statements.append(
                (
                    "DELETE FROM job_audio WHERE job_id IN (SELECT id FROM jobs"
                    " WHERE state IN ('done', 'failed', 'cancelled'))",
                    (),
                )
            )
        try:
            _, removed = await self._exec(*statements)
        except DB_FAILURES:
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

    def claim(self, on: bool) -> None:
        """PostgreSQL: take queued jobs (`on`) or leave them to the other nodes (draining)."""
        self.claiming = on
        if on:
            self._has_work.set()

    async def _claimed(self) -> Job:
        """PostgreSQL: the next job this node claimed, from whichever node it was sent to."""
        while True:
            self._has_work.clear()
            try:
                job = await self._claim() if self.claiming else None
            except DB_FAILURES as exc:
                log.warning("could not look for queued jobs: %s", exc)
                job = None
            if job is not None:
                return job
            await _wait(self._has_work, POLL_SECONDS)

    async def _claim(self) -> Job | None:
        """Claim a row (see the module doc); rows that must not run are finished here."""
        while True:
            rows, _ = await self._exec((CLAIM_JOB, (self.node, self.lease_seconds)))
            if not rows:
                return None
            row = rows[0]
            try:
                options_from_json(row["options"])
                claimed = self._from_row(row)
            except (ValueError, KeyError, TypeError):
                await self._write(
                    "UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?",
                    (time.time(), json.dumps(_error("invalid_job", "unreadable job")), row["id"]),
                )
                continue
            job = self.jobs.setdefault(claimed.id, claimed)
            self._take_over(job, claimed)
            crashes = job.attempts - 1  # runs that never finished: their node died
            if row["cancel_requested"]:
                await self._finish(job, JobState.CANCELLED)
            elif crashes >= MAX_ATTEMPTS:
                await self._finish(
                    job,
                    JobState.FAILED,
                    error=(
                        "server_crashed",
                        f"the server stopped {crashes} times while transcribing this "
                        "file; it is not tried again",
                    ),
                )
            else:
                if crashes:
                    log.warning(
                        "job %s: its node stopped while running it: running it again", job.id
                    )
                return job

    async def _worker(self, index: int) -> None:
        while True:
            job = await (self._claimed() if self.shared else self._next())
            self.running.add(job.id)
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise  # shutdown: stop() puts the job back to queued for the next start
            except Exception as exc:
                if job.id in self._lost:  # another node runs it now and finishes it
                    with contextlib.suppress(OSError):
                        job.audio_path.unlink(missing_ok=True)
                elif isinstance(exc, JobCancelledError):
                    await self._finish(job, JobState.CANCELLED)
                else:
                    code = getattr(exc, "code", "transcription_failed")
                    message = getattr(exc, "message", None) or f"transcription failed: {exc}"
                    log.warning("job %s failed: %s", job.id, message)
                    await self._finish(job, JobState.FAILED, error=(code, message))
            finally:
                self.running.discard(job.id)
                self._lost.discard(job.id)

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
        job.saved_at = time.monotonic()
        if not self.shared:
            job.state = JobState.RUNNING
            job.started = time.time()
            job.attempts += 1
            await self._write(
                "UPDATE jobs SET state = 'running', started = ?, percent = 0, attempts = ?"
                " WHERE id = ?",
                (job.started, job.attempts, job.id),
            )
            await self._transcribe(job)
            return
        lease = asyncio.create_task(self._keep_lease(job))  # claimed: state and attempt saved
        self._leases.add(lease)
        try:
            await self._fetch_audio(job)
            await self._transcribe(job)
        finally:
            lease.cancel()
            self._leases.discard(lease)

    async def _keep_lease(self, job: Job) -> None:
        """Renew the lease of a job running here every third of it. A cancel asked on any node
        arrives here; a job another node took over (this one stalled past its lease) stops."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                rows, _ = await self._exec(
                    (RENEW_LEASE, (self.lease_seconds, job.id, self.node)), quiet=True
                )
            except DB_FAILURES as exc:
                log.warning("could not renew the lease of job %s: %s", job.id, exc)
                continue
            if not rows:
                log.warning("job %s was taken over by another node: stopping it here", job.id)
                self._lost.add(job.id)
                job.cancel_flag.set()
                return
            if rows[0]["cancel_requested"]:
                job.cancel_flag.set()

    async def _fetch_audio(self, job: Job) -> None:
        """Stream the job's audio out of the database into `jobs_dir`, a chunk at a time."""
        target = self.jobs_dir / f"job-{job.id}"
        chunk = 0
        with target.open("wb") as out:
            while True:
                rows, _ = await self._exec(
                    ("SELECT data FROM job_audio WHERE job_id = ? AND chunk = ?", (job.id, chunk))
                )
                if not rows:
                    break
                await asyncio.to_thread(out.write, rows[0]["data"])
                chunk += 1
        job.audio_path = target
        if not chunk:
            raise AudioMissingError("the uploaded file of this job is gone; send it again")

    async def _transcribe(self, job: Job) -> None:
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
        if job.id in self._lost:
            raise JobCancelledError  # the node that took it over saves the result
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
        values = (
            state.value,
            job.finished,
            round(job.percent, 1),
            json.dumps(job.error) if job.error else None,
            json.dumps(job.timings),
            job.history_id,
            job.duration,
            job.id,
        )
        update = (
            "UPDATE jobs SET state = ?, finished = ?, percent = ?, error = ?, timings = ?,"
            " history_id = ?, duration = ? WHERE id = ?"
        )
        if self.shared:  # never over a row another node claimed since
            await self._write(
                update + " AND (node IS NULL OR node = ?)",
                (*values, self.node),
                ("DELETE FROM job_audio WHERE job_id = ?", (job.id,)),
            )
        else:
            await self._write(update, values)
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

    # --- PostgreSQL: the cluster's view --------------------------------------------------
    def _node_id(self) -> str:
        """This node's id, kept in DATA_DIR: after a crash the node knows its own rows."""
        path = self.data_dir / "node-id"
        with contextlib.suppress(OSError, UnicodeError):
            node = path.read_text().strip()
            if NODE_ID.fullmatch(node):
                return node
        node = f"{socket.gethostname()[:60]}-{uuid.uuid4().hex[:12]}"
        if not NODE_ID.fullmatch(node):
            node = uuid.uuid4().hex
        path.write_text(node + "\n")
        return node

    async def _follow(self) -> None:
        while True:
            await _wait(self._poked, POLL_SECONDS)
            self._poked.clear()
            await self._refresh_quietly()

    async def _listen(self) -> None:
        """Wake the followers and the idle workers when a job changed on any node (NOTIFY);
        while the connection for it is down, they poll."""
        assert isinstance(self.db, PostgresDatabase)
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.db.conn.url, autocommit=True, connect_timeout=10
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    async for _ in conn.notifies():
                        self._poked.set()
                        self._has_work.set()
            except psycopg.Error as exc:
                log.warning("no job notifications (%s): polling until they are back", exc)
            await asyncio.sleep(5 * POLL_SECONDS)

    async def _refresh_quietly(self, *only: str) -> None:
        try:
            await self._refresh(*only)
        except DB_FAILURES as exc:
            log.warning("could not read the job queue: %s", exc)

    async def _refresh(self, *only: str) -> None:
        """Re-read the cluster's queue (positions, ETA, the bound) and the jobs this node
        follows but does not run (or `only` these): what other nodes wrote reaches its
        clients this way. A cancel asked on another node reaches the jobs running here."""
        followed = list(only) or [j.id for j in self.jobs.values() if not j.state.finished]
        rows, _ = await self._exec(
            ("SELECT * FROM jobs WHERE state = 'queued' OR id = ANY(?) ORDER BY seq", (followed,))
        )
        pending: list[Job] = []
        for row in rows:
            try:
                fresh = self._from_row(row)
            except (ValueError, KeyError, TypeError):
                continue
            job = self.jobs.get(fresh.id)
            if job is None:  # queued on another node: counted here, not followed
                job = fresh
            elif job.id in self.running:
                if row["cancel_requested"]:
                    job.cancel_flag.set()
            elif not job.state.finished and self._take_over(job, fresh):
                # (finished is final here: a row read before our own finish is older)
                if job.state.finished:
                    await self._done(job)
                job.touch()
            if job.state == JobState.QUEUED:
                pending.append(job)
        moved = [j.id for j in pending] != [j.id for j in self.pending]
        self.pending = deque(pending)
        if moved:
            self._notify_queue()
        self._forget_old()

    @staticmethod
    def _take_over(job: Job, fresh: Job) -> bool:
        """Copy what another node wrote of a job into ours; True if a client sees a change."""
        changed = False
        for name in FOLLOWED:
            value = getattr(fresh, name)
            if getattr(job, name) != value:
                setattr(job, name, value)
                changed = True
        return changed

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.state.finished]
        for job in sorted(finished, key=lambda j: j.finished or 0)[:-FINISHED_JOBS_KEPT]:
            del self.jobs[job.id]


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until `event` is set or `seconds` passed. Not `asyncio.wait_for`: on Python 3.11 it
    swallows a cancel that comes with the event (NOTIFY) and the task would outlive stop()."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}
