"""Prometheus counters, histograms and scrape-time gauges (prometheus-client); the `GET /metrics`
route that serves them is `appliance.web.metrics`.

Every app has its own `Metrics` with its own `CollectorRegistry` (never the global one), so
several apps in one process (tests) do not share or clash. The model manager owns it
(`services.models.metrics`); the job queue, the live route and the HTTP hooks (web.metrics)
count into it, and what is a state rather than an event (queue length, running jobs, live
sessions, loaded models and their RAM) is read at scrape time by `_StateCollector`.

Label values are bounded: HTTP requests are labelled with the URL rule (`/api/jobs/<job_id>`,
not the raw path; `none` when nothing matched), the method (`other` for unknown ones) and
the status. Model names come from the catalogue or the models on disk.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance import __version__

if TYPE_CHECKING:
    from appliance.core.jobs import Job, JobQueue
    from appliance.core.model_manager import ModelManager


HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
REALTIME_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
FINAL_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LABEL = re.compile(r"[^A-Za-z0-9_.:-]")


def label(value: object, default: str = "unknown") -> str:
    """A label value from code (an error code, a source): plain characters, at most 64."""
    text = _LABEL.sub("_", str(value or ""))[:64]
    return text or default


class Metrics:
    """The counters, histograms and gauges of one app, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds, start time
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.state = _StateCollector()
        r.register(self.state)
        info = Gauge("whisper_appliance_info", "Version of the appliance", ["version"], registry=r)
        info.labels(__version__).set(1)

        self.http_requests = Counter(
            "whisper_http_requests",
            "HTTP requests answered, by route (the URL rule), method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "whisper_http_request_duration_seconds",
            "Time from a request to its response (headers; a stream may last longer)",
            ["route", "method"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.jobs_submitted = Counter(
            "whisper_jobs_submitted",
            "Transcription jobs accepted into the queue, by source",
            ["source"],
            registry=r,
        )
        self.jobs_rejected = Counter(
            "whisper_jobs_rejected",
            "Transcription jobs refused because the queue was full",
            registry=r,
        )
        self.jobs_started = Counter(
            "whisper_jobs_started",
            "Transcription jobs a worker started, by source",
            ["source"],
            registry=r,
        )
        self.jobs_finished = Counter(
            "whisper_jobs_finished",
            "Transcription jobs finished, by outcome (done, failed, cancelled) and source",
            ["outcome", "source"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "whisper_job_queue_wait_seconds",
            "Time a job waited in the queue before a worker started it",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter(
            "whisper_audio_transcribed_seconds",
            "Seconds of audio transcribed, by source (jobs and live sessions)",
            ["source"],
            registry=r,
        )
        self.transcribe_seconds = Counter(
            "whisper_transcribe_seconds",
            "Wall-clock seconds workers spent transcribing jobs",
            registry=r,
        )
        self.realtime_factor = Histogram(
            "whisper_job_realtime_factor",
            "Audio seconds transcribed per second of work, per finished job",
            buckets=REALTIME_BUCKETS,
            registry=r,
        )
        self.live_sessions_started = Counter(
            "whisper_live_sessions_started",
            "Live speech sessions accepted",
            registry=r,
        )
        self.live_final_latency = Histogram(
            "whisper_live_final_latency_seconds",
            "Live speech: time from the arrival of the end of speech to its final text",
            buckets=FINAL_LATENCY_BUCKETS,
            registry=r,
        )
        self.wyoming_requests = Counter(
            "whisper_wyoming_requests",
            "Wyoming protocol requests, by kind (describe, transcribe) and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.model_loads = Counter(
            "whisper_model_loads",
            "Model loads, by model and outcome (ok, failed)",
            ["model", "outcome"],
            registry=r,
        )
        self.model_load_seconds = Histogram(
            "whisper_model_load_seconds",
            "Time to load a model into memory",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.model_unloads = Counter(
            "whisper_model_unloads",
            "Models unloaded, by model and reason (idle, evicted, removed, shutdown)",
            ["model", "reason"],
            registry=r,
        )
        self.errors = Counter(
            "whisper_errors",
            "Errors, by component (http, job, live, model, wyoming) and code",
            ["component", "code"],
            registry=r,
        )

    # --- what the app binds at start --------------------------------------------------------
    def bind(
        self,
        *,
        jobs: JobQueue | None = None,
        models: ModelManager | None = None,
        live: Any = None,
    ) -> None:
        """The objects whose state is read at each scrape."""
        if jobs is not None:
            self.state.jobs = jobs
        if models is not None:
            self.state.models = models
        if live is not None:
            self.state.live = live

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- events: one call per event from the code that sees it -----------------------------
    def error(self, component: str, code: object) -> None:
        self.errors.labels(component, label(code)).inc()

    def job_submitted(self, job: Job) -> None:
        self.jobs_submitted.labels(label(job.source)).inc()

    def job_started(self, job: Job) -> None:
        self.jobs_started.labels(label(job.source)).inc()
        if job.started is not None:
            self.queue_wait.observe(max(0.0, job.started - job.created))

    def job_transcribed(self, job: Job, seconds: float) -> None:
        """A job's audio was transcribed in `seconds` of wall-clock time."""
        self.audio_seconds.labels(label(job.source)).inc(max(0.0, job.duration))
        self.transcribe_seconds.inc(max(0.0, seconds))
        if seconds > 0 and job.duration > 0:
            self.realtime_factor.observe(job.duration / seconds)

    def job_finished(self, job: Job) -> None:
        self.jobs_finished.labels(label(job.state.value), label(job.source)).inc()
        if job.state.value == "failed":
            self.error("job", (job.error or {}).get("code"))

    def live_message(self, message: dict[str, Any]) -> None:
        """A message the live route sends: finals (latency), `end` (audio), errors."""
        kind = message.get("type")
        if kind == "final":
            latency = message.get("latency_ms")
            if isinstance(latency, int | float):
                self.live_final_latency.observe(max(0.0, latency / 1000))
        elif kind == "end":
            duration = message.get("duration")
            if isinstance(duration, int | float) and duration > 0:
                self.audio_seconds.labels("live").inc(duration)
        elif kind == "error":
            self.error("live", message.get("code"))

    def model_loaded(self, name: str, seconds: float) -> None:
        self.model_loads.labels(label(name), "ok").inc()
        self.model_load_seconds.observe(seconds)

    def model_load_failed(self, name: str) -> None:
        self.model_loads.labels(label(name), "failed").inc()
        self.error("model", "model_load_failed")

    def model_unloaded(self, name: str, reason: str) -> None:
        self.model_unloads.labels(label(name), reason).inc()


class _StateCollector(Collector):
    """Gauges read from the running objects at scrape time (nothing to keep in sync)."""

    def __init__(self) -> None:
        self.jobs: JobQueue | None = None
        self.models: ModelManager | None = None
        self.live: Any = None

    def describe(self) -> Iterable[Any]:
        return []  # dynamic: no names reserved at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.jobs is not None:
            jobs = self.jobs
            yield GaugeMetricFamily(
                "whisper_jobs_queued", "Jobs waiting in the queue now", value=len(jobs.pending)
            )
            yield GaugeMetricFamily(
                "whisper_jobs_running", "Jobs being transcribed now", value=len(jobs.running)
            )
            yield GaugeMetricFamily(
                "whisper_queue_capacity", "Most jobs that may wait (MAX_QUEUE)", jobs.max_queue
            )
            yield GaugeMetricFamily(
                "whisper_workers", "Inference workers (WORKER_PROCESSES)", value=jobs.workers
            )
            yield GaugeMetricFamily(
                "whisper_realtime_factor",
                "Smoothed audio seconds per second of work per worker (used for ETAs)",
                value=jobs.speed.value,
            )
        if self.live is not None:
            yield GaugeMetricFamily(
                "whisper_live_sessions",
                "Live speech sessions running now",
                value=int(getattr(self.live, "active", 0)),
            )
        if self.models is not None:
            loaded = list(self.models.loaded.items())
            count = GaugeMetricFamily("whisper_models_loaded", "Models loaded in memory now")
            count.add_metric([], len(loaded))
            yield count
            ram = GaugeMetricFamily(
                "whisper_model_ram_bytes",
                "Resident memory a loaded model added when it was loaded (estimate)",
                labels=["model"],
            )
            users = GaugeMetricFamily(
                "whisper_model_users",
                "Jobs and live sessions using a loaded model now",
                labels=["model"],
            )
            idle = GaugeMetricFamily(
                "whisper_model_idle_seconds",
                "Seconds since a loaded model was last used (0 while in use)",
                labels=["model"],
            )
            now = time.monotonic()
            for name, item in loaded:
                ram.add_metric([name], item.ram_mb * 1024**2)
                users.add_metric([name], item.users)
                idle.add_metric([name], 0 if item.users else max(0.0, now - item.idle_since))
            yield ram
            yield users
            yield idle
            yield GaugeMetricFamily(
                "whisper_model_idle_timeout_seconds",
                "MODEL_IDLE_TIMEOUT: a model unused this long is unloaded (0 = never)",
                value=self.models.idle_timeout,
            )
