"""The app factory: `create_app(settings)` builds the Quart app; resources live on the app.

`build_services(settings)` creates every long-lived part in one fixed order (database,
history, model manager, job queue, auth, rate limits, runtime settings, webhooks, Wyoming,
the inbox) in the app's `while_serving` lifespan: after every `before_serving` hook (the log
file is attached, the update spool prepared), and `stop_services` stops them in the reverse
order before any `after_serving` hook, once Quart has awaited (or cancelled) the background
tasks. Feature modules (UI, live speech, TLS, admin, security, metrics) each expose
`init_app(app)`, wired in `_init_features` below: they register routes and request hooks and
read what they need from the typed `Services`, never from each other's start-up hooks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

from quart import Quart, Response, render_template
from quart_schema import Info, QuartSchema

from appliance import __version__
from appliance.core.auth import Auth
from appliance.core.db import (
    POSTGRESQL,
    AnyDatabase,
    PostgresDatabase,
    StartupError,
    open_database,
)
from appliance.core.engines import create_engine
from appliance.core.history import History
from appliance.core.jobs import Job, JobQueue
from appliance.core.model_manager import ModelManager
from appliance.system.config import Settings
from appliance.web import api, metrics, webhooks
from appliance.web.cluster import CLUSTER, ClusterUpdates, Timing
from appliance.web.errors import register_error_handlers
from appliance.web.services import Limiters, Services
from appliance.web.settings_store import SettingsStore
from appliance.web.upload import prepare_tmp_dir

log = logging.getLogger(__name__)


async def build_services(settings: Settings) -> Services:
    """Open the database, prepare directories, then start everything else in a fixed order.

    Any failure stops what started and closes the database again, so the process can exit
    (StartupError).
    """
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        prepare_tmp_dir(settings.tmp_dir)
    except OSError as exc:
        raise StartupError(f"DATA_DIR {settings.data_dir} is not usable: {exc}") from exc
    db = await open_database(settings.database_url, settings.db_path)
    try:
        return await _build_on(settings, db)
    except BaseException:
        await db.close()
        raise


async def _build_on(settings: Settings, db: AnyDatabase) -> Services:
    history = History(db, settings.history_retention_days, settings.history_max_rows)
    await history.migrate()
    engine = create_engine(
        settings.engine,
        compute_type=settings.compute_type,
        cpu_threads=settings.cpu_threads,
        workers=settings.worker_processes,  # 0 = auto: one per core on CPU, fewer on a GPU
        cache_dir=settings.data_dir / "cache",
        device=settings.device,
        cuda_compute_type=settings.cuda_compute_type,
    )
    models = ModelManager(
        engine,
        settings.models_dir,
        cache_size=settings.model_cache_size,
        hub_url=settings.model_hub_url,
        idle_timeout=settings.model_idle_timeout,
    )

    async def save(job: Job) -> str | None:
        assert job.result is not None
        return await history.add(
            job.result,
            source=job.source,
            model=job.model,
            filename=job.filename,
            task=job.options.task,
            timings=job.timings,
        )

    jobs = JobQueue(
        models,
        db=db,
        jobs_dir=settings.jobs_dir,
        workers=settings.workers,
        max_queue=settings.max_queue,
        retention_hours=settings.job_retention_hours,
        on_done=save,
        load_result=history.transcript,
        lease_seconds=settings.job_lease_seconds,
    )
    jobs.max_audio_duration = settings.max_audio_duration
    auth = await Auth.open(db, settings.data_dir)
    services = Services(
        settings=settings,
        db=db,
        history=history,
        models=models,
        jobs=jobs,
        auth=auth,
        limiters=Limiters.from_settings(settings),
    )
    # the runtime settings (admin panel) are published before anything reads them
    store = SettingsStore(db, services)
    await store.load()
    if db.dialect == POSTGRESQL:  # other nodes change them too
        store.start_refreshing()
    await jobs.start()
    try:
        await _start_features(services)
    except BaseException:
        await stop_services(services, close_db=False)
        raise
    return services


async def _start_features(services: Services) -> None:
    """The optional features, once the core is up (each may read the job queue's history)."""
    settings = services.settings
    # issue 15: webhooks when a job finishes
    services.webhooks = webhooks.Dispatcher(services)
    await services.webhooks.start()
    if settings.wyoming_enabled:  # issue 14: Home Assistant (Wyoming) on its own TCP port
        from appliance.web import wyoming_server

        services.wyoming = await wyoming_server.start(services)
    if settings.watch_dir is not None:  # issue 15: the inbox folder (WATCH_DIR)
        from appliance.web import inbox

        services.inbox = await inbox.start(services)


async def stop_services(services: Services, *, close_db: bool = True) -> None:
    """Stop in the reverse order of `build_services`; what is pending resumes at next start."""
    services.ready = False
    if services.webhooks is not None:  # pending deliveries resume at the next start
        await services.webhooks.stop()
    if services.wyoming is not None:  # its requests hold models and wait for jobs
        await services.wyoming.stop()
    if services.inbox is not None:  # before the jobs: its claims resume at the next start
        await services.inbox.stop()
    await services.jobs.stop()
    store = getattr(services, "settings_store", None)  # unset if the start failed early
    if store is not None:
        await store.stop()
    services.models.close()
    if close_db:
        await services.db.close()


def create_app(settings: Settings | None = None) -> Quart:
    settings = settings or Settings.from_env()
    app = Quart(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=None,  # uploads are limited while streaming (appliance.web.upload)
        BODY_TIMEOUT=3600,  # a large file over a slow LAN
        RESPONSE_TIMEOUT=None,  # /transcribe waits for the job; the client decides
        JSON_SORT_KEYS=False,
    )
    app.extensions["settings"] = settings
    QuartSchema(
        app,
        info=Info(title="Whisper appliance", version=__version__),
        swagger_ui_path=None,  # our own /docs page serves vendored Swagger UI (no CDN)
        redoc_ui_path=None,
        scalar_ui_path=None,
    )
    register_error_handlers(app)
    api.register(app)

    @app.get("/docs")
    async def docs() -> str:
        """Swagger UI over /openapi.json, from assets served by the appliance."""
        return await render_template("docs.html")

    @app.while_serving
    async def _lifespan() -> AsyncGenerator[None, None]:
        try:
            services = await build_services(settings)
        except Exception as exc:  # the database, DATA_DIR, a migration: say it, then exit
            log.critical("cannot start: %s", exc)
            raise
        app.extensions["appliance"] = services
        metrics.bind(services, live=app.extensions.get("live"))
        services.warm_up()  # a Quart background task: awaited (then cancelled) at shutdown
        cluster = await _start_cluster(app, services)
        services.ready = True
        yield
        if cluster is not None:
            await cluster.stop()
        await stop_services(services)

    @app.after_request
    async def _no_sniff(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    _init_features(app)
    return app


async def _start_cluster(app: Quart, services: Services) -> ClusterUpdates | None:
    """On PostgreSQL: this node's part in rolling updates (`appliance.web.cluster`)."""
    if not isinstance(services.db, PostgresDatabase):
        return None
    cluster = ClusterUpdates(
        services.db,
        node=services.jobs.node,
        data_dir=services.settings.data_dir,
        db_path=services.settings.db_path,
        running_jobs=lambda: len(services.jobs.running),
        claim_jobs=services.jobs.claim,
        request_lock=services.update_request_lock,
        timing=Timing.from_config(app.config),
    )
    try:
        await cluster.start()
    except BaseException:
        await stop_services(services)
        raise
    app.extensions[CLUSTER] = cluster
    return cluster


def _init_features(app: Quart) -> None:
    """Each feature module registers its blueprints and start/stop hooks here."""
    # issue 14: /metrics; its request timer first, so requests refused below are timed too
    from appliance.web import metrics

    metrics.init_app(app)
    # issue 6 (security): logging first (request ids), then TLS routes, the request guard
    # (auth, API keys, rate limits, headers, runtime settings), then the admin panel
    from appliance.system import logging_setup
    from appliance.web import admin, security, tls

    logging_setup.init_app(app)
    tls.init_app(app)
    security.init_app(app)
    admin.init_app(app)
    # issue 5 (UI + live speech): the main page at / and the /ws/live WebSocket
    from appliance.web import live, ui

    ui.init_app(app)
    live.init_app(app)
    # issue 17: the documentation site (make docs) at /help/
    from appliance.web import help as help_site

    help_site.init_app(app)
