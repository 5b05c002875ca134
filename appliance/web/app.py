"""The app factory: `create_app(settings)` builds the Quart app; resources live on the app.

Long-lived services (database, history, model manager, job queue) are created in
`before_serving` and closed in `after_serving`. Feature modules (UI, live speech, TLS, admin,
security) each expose `init_app(app)` and are wired in `_init_features` below.
"""

from __future__ import annotations

import asyncio
import logging

from quart import Quart, Response, render_template
from quart_schema import Info, QuartSchema

from appliance import __version__
from appliance.core.db import Database, StartupError
from appliance.core.engines import create_engine
from appliance.core.history import History
from appliance.core.jobs import Job, JobQueue
from appliance.core.model_manager import ModelManager
from appliance.system.config import Settings
from appliance.web import api
from appliance.web.errors import register_error_handlers
from appliance.web.services import Services
from appliance.web.upload import prepare_tmp_dir

log = logging.getLogger(__name__)


async def start_services(settings: Settings) -> Services:
    """Open the database, prepare directories and start the job workers.

    Any failure closes the database again, so the process can exit (StartupError).
    """
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        prepare_tmp_dir(settings.tmp_dir)
    except OSError as exc:
        raise StartupError(f"DATA_DIR {settings.data_dir} is not usable: {exc}") from exc
    db = await Database.open(settings.db_path)
    try:
        return await _start_on(settings, db)
    except BaseException:
        await db.close()
        raise


async def _start_on(settings: Settings, db: Database) -> Services:
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
    )
    jobs.max_audio_duration = settings.max_audio_duration
    await jobs.start()
    return Services(settings=settings, db=db, history=history, models=models, jobs=jobs)


async def _warm_up(services: Services) -> None:
    name = services.extras.get("default_model") or services.settings.whisper_model
    try:
        async with services.models.use(name):
            log.info("default model %s is ready", name)
    except Exception:
        log.exception("could not warm up the default model %s", name)


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

    @app.before_serving
    async def _startup() -> None:
        try:
            services = await start_services(settings)
        except Exception as exc:  # the database, DATA_DIR, a migration: say it, then exit
            log.critical("cannot start: %s", exc)
            raise
        app.extensions["appliance"] = services
        services.extras["warm_up"] = asyncio.create_task(_warm_up(services))
        services.ready = True
        if settings.wyoming_enabled:  # issue 14: Home Assistant (Wyoming) on its own TCP port
            from appliance.web import wyoming_server

            services.extras["wyoming"] = await wyoming_server.start(services)
        if settings.watch_dir is not None:  # issue 15: the inbox folder (WATCH_DIR)
            from appliance.web import inbox

            services.extras["inbox"] = await inbox.start(services)

    @app.after_serving
    async def _shutdown() -> None:
        services: Services = app.extensions["appliance"]
        services.ready = False
        wyoming = services.extras.get("wyoming")
        if wyoming is not None:  # first: its requests hold models and wait for jobs
            await wyoming.stop()
        inbox = services.extras.get("inbox")
        if inbox is not None:  # before the jobs: its claims resume at the next start
            await inbox.stop()
        await services.jobs.stop()
        services.models.close()
        await services.db.close()

    @app.after_request
    async def _no_sniff(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    _init_features(app)
    return app


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
    # issue 15: webhooks when a job finishes (started after every other service)
    from appliance.web import webhooks

    webhooks.init_app(app)
