"""Webhooks (issue 15): when a job with a `callback_url` finishes, POST its result there, signed.

The body is JSON (see `payload`); it is signed with HMAC-SHA256 under the appliance's webhook
secret (`DATA_DIR/webhook-secret`, 64 hex characters made at first start, shown in the admin
panel; on PostgreSQL one row of `auth_secrets` that every node of a cluster signs with) over
`"<timestamp>." + body`, the timestamp being the `X-Whisper-Timestamp` header:

    X-Whisper-Timestamp: 1767225600
    X-Whisper-Signature: sha256=<hex HMAC-SHA256(secret, b"1767225600." + raw body)>

A delivery is an answer 2xx; anything else (another status, a redirect, no answer, a refused
address) is retried WEBHOOK_MAX_ATTEMPTS times in all, waiting WEBHOOK_RETRY_SECONDS before the
second attempt and twice as long before each next one. Every attempt is appended to the job's
`callbacks` list (stored in its row, shown by `GET /api/jobs/{id}`) and logged. Deliveries
survive a restart: at start every finished job whose callback is not delivered or given up
(`callback_state` NULL or `pending`) carries on where it stopped, its waits counted from the
time of its last attempt. A crash during an attempt can send the same body twice: receivers
deduplicate on `job_id`. On PostgreSQL the nodes of a cluster resume each other's deliveries
too, one node per job at a time (an advisory lock of the node's connection, so a delivery
of a node that died resumes when any node starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Literal

from appliance.core import formats
from appliance.core.auth import shared_secret
from appliance.core.db import DB_ERRORS, AnyDatabase, PostgresDatabase
from appliance.core.jobs import DB_FAILURES, Job, JobQueue
from appliance.web import outbound
from appliance.web.errors import APIError
from appliance.web.services import Services

log = logging.getLogger(__name__)

SECRET_FILE = "webhook-secret"  # noqa: S105 (a file name)
SIGNATURE_HEADER = "X-Whisper-Signature"
TIMESTAMP_HEADER = "X-Whisper-Timestamp"
EVENT = "job.finished"
ATTEMPT_TIMEOUT = 10.0  # seconds for one attempt (connect, send, status line)
DELIVERY_LOCK = 0x5748  # PostgreSQL: pg_try_advisory_lock(DELIVERY_LOCK, hashtext(job id))


async def load_secret(db: AnyDatabase, data_dir: Path) -> str:
    """The appliance's webhook secret: the cluster's on PostgreSQL (a receiver verifies every
    node's deliveries with the one secret), else this appliance's file."""
    if isinstance(db, PostgresDatabase):
        return await shared_secret(db, "webhook")
    return _file_secret(data_dir)


def _file_secret(data_dir: Path) -> str:
    """The webhook secret file, made (0600) at the first start."""
    path = data_dir / SECRET_FILE
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        secret = ""
    if len(secret) >= 32:
        return secret
    secret = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    path.chmod(0o600)
    log.info("made the webhook secret %s", path)
    return secret


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The value of X-Whisper-Signature for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def payload(job: Job) -> bytes:
    """The JSON body POSTed for a finished job."""
    result: dict[str, Any] | None = None
    if job.result is not None and job.state.value == "done":
        result = formats.job_result(job)
    body = {
        "event": EVENT,
        "job_id": job.id,
        "state": job.state.value,
        "error": job.error,
        "model": job.model,
        "filename": job.filename,
        "duration": round(job.duration, 3),
        "created": job.created,
        "finished": job.finished,
        "history_id": job.history_id,
        "result": result,
    }
    return json.dumps(body, ensure_ascii=False).encode()


async def check_callback(value: str | None, policy: outbound.Policy) -> str | None:
    """A client's `callback_url` form field, checked now (400 when refused); None when empty."""
    if value is None or not value.strip():
        return None
    try:
        url = outbound.check_url(value, "callback_url")
        await outbound.resolve(url, policy)
    except outbound.OutboundError as exc:
        code = "invalid_callback_url" if exc.code == "invalid_url" else f"callback_{exc.code}"
        raise APIError(400, code, exc.message) from None
    return value.strip()


class Dispatcher:
    """Delivers the callbacks of finished jobs, one task per job."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.jobs: JobQueue = services.jobs
        settings = services.settings
        self.secret = ""  # read by `start`
        self.policy = outbound.Policy.from_settings(settings)
        self.max_attempts = settings.webhook_max_attempts
        self.retry_seconds = float(settings.webhook_retry_seconds)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stopped = False

    async def start(self) -> None:
        self.secret = await load_secret(self.services.db, self.services.settings.data_dir)
        self.jobs.on_finished = self.enqueue
        try:
            async with self.services.db.conn.execute(
                "SELECT id FROM jobs WHERE callback_url IS NOT NULL"
                " AND state IN ('done', 'failed', 'cancelled')"
                " AND (callback_state IS NULL OR callback_state = 'pending')"
                " ORDER BY finished"
            ) as cur:
                rows = list(await cur.fetchall())
        except DB_ERRORS:
            log.exception("could not read the pending webhooks")
            return
        if rows:
            log.info("%d webhook delivery(ies) from before the restart resumed", len(rows))
        for row in rows:
            self._spawn(str(row[0]), None)

    async def stop(self) -> None:
        """Stop delivering; what is pending carries on at the next start."""
        self.stopped = True
        if self.jobs.on_finished == self.enqueue:
            self.jobs.on_finished = None
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def enqueue(self, job: Job) -> None:
        """The job queue's finish hook."""
        if job.callback_url and not self.stopped:
            self._spawn(job.id, job)

    def _spawn(self, job_id: str, job: Job | None) -> None:
        if job_id in self.tasks:
            return
        task = asyncio.create_task(self._deliver(job_id, job))
        self.tasks[job_id] = task
        task.add_done_callback(lambda _t: self.tasks.pop(job_id, None))

    async def _deliver(self, job_id: str, job: Job | None) -> None:
        try:
            if not await self._lock(job_id, "pg_try_advisory_lock"):
                log.info("webhook of job %s: another node is delivering it", job_id)
                return
            try:
                if job is None:
                    job = await self.jobs.get(job_id)
                if job is None or not job.callback_url or not await self._current(job):
                    return
                await self._run(job, job.callback_url)
            finally:
                await self._lock(job_id, "pg_advisory_unlock")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook of job %s: delivery failed unexpectedly", job_id)

    async def _lock(
        self, job_id: str, function: Literal["pg_try_advisory_lock", "pg_advisory_unlock"]
    ) -> bool:
        """PostgreSQL: take or release the job's delivery lock (True elsewhere). A node that
        starts resumes every pending delivery, some of which other nodes are making."""
        db = self.services.db
        if not isinstance(db, PostgresDatabase):
            return True
        async with db.conn.execute(
            f"SELECT {function}(?, hashtext(?))", (DELIVERY_LOCK, job_id)
        ) as cur:
            row = await cur.fetchone()
        return bool(row and row[0])

    async def _current(self, job: Job) -> bool:
        """PostgreSQL: the job's attempts as stored, which another node may have made since
        this one read the job; False when nothing is left to deliver."""
        if not isinstance(self.services.db, PostgresDatabase):
            return True
        async with self.services.db.conn.execute(
            "SELECT callback_state, callbacks FROM jobs WHERE id = ?", (job.id,)
        ) as cur:
            row = await cur.fetchone()
        if row is None or row[0] not in (None, "pending"):
            return False
        job.callback_state, job.callbacks = row[0], json.loads(row[1])
        return True

    async def _run(self, job: Job, url: str) -> None:
        body = payload(job)
        if job.callback_state is None:
            job.callback_state = "pending"
            await self._save(job)
        while len(job.callbacks) < self.max_attempts:
            done = len(job.callbacks)
            if done:
                delay = self.retry_seconds * 2 ** (done - 1)
                last = float(job.callbacks[-1].get("time") or 0)
                await asyncio.sleep(max(0.0, min(delay, last + delay - time.time())))
            record = await self._attempt(job, url, body, done + 1)
            job.callbacks.append(record)
            ok = record.get("status") is not None and 200 <= int(record["status"]) < 300
            if ok:
                job.callback_state = "delivered"
            elif len(job.callbacks) >= self.max_attempts:
                job.callback_state = "failed"
                log.warning(
                    "webhook of job %s: given up after %d attempts", job.id, len(job.callbacks)
                )
            await self._save(job)
            job.touch()
            if ok:
                return
        if job.callback_state == "pending":  # attempts used up before a restart
            job.callback_state = "failed"
            await self._save(job)

    async def _attempt(self, job: Job, url: str, body: bytes, number: int) -> dict[str, Any]:
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
            "X-Whisper-Event": EVENT,
            "X-Whisper-Job": job.id,
            "X-Whisper-Attempt": str(number),
        }
        record: dict[str, Any] = {"attempt": number, "time": time.time(), "status": None}
        started = time.perf_counter()
        try:
            async with outbound.request(
                "POST",
                url,
                self.policy,
                content=body,
                headers=headers,
                seconds=ATTEMPT_TIMEOUT,
                what="callback_url",
            ) as response:
                record["status"] = response.status_code  # the body is never read
            if not 200 <= response.status_code < 300:
                record["error"] = f"HTTP {response.status_code}"
        except outbound.OutboundError as exc:
            record["error"] = exc.message
        record["seconds"] = round(time.perf_counter() - started, 3)
        if record.get("error"):
            log.warning(
                "webhook of job %s: attempt %d/%d failed: %s",
                job.id,
                number,
                self.max_attempts,
                record["error"],
            )
        else:
            log.info(
                "webhook of job %s: attempt %d delivered (HTTP %s)",
                job.id,
                number,
                record["status"],
            )
        return record

    async def _save(self, job: Job) -> None:
        try:
            await self.services.db.conn.execute(
                "UPDATE jobs SET callback_state = ?, callbacks = ? WHERE id = ?",
                (job.callback_state, json.dumps(job.callbacks), job.id),
            )
            await self.services.db.conn.commit()
        except DB_FAILURES:
            log.exception("could not save the webhook state of job %s", job.id)


def dispatcher(services: Services) -> Dispatcher | None:
    """The running dispatcher (built and stopped by `appliance.web.app.build_services`)."""
    return services.webhooks


async def callback_for(value: str | None, services: Services) -> str | None:
    """The callback URL of a new job: the form field (checked now), else the admin default."""
    if value is not None and value.strip():
        return await check_callback(value, outbound.Policy.from_settings(services.settings))
    return services.runtime.default_callback_url
