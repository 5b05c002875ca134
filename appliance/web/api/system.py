"""Health, status and the model list."""

from __future__ import annotations

import os
import shutil
import time

import psutil
from pydantic import BaseModel
from quart import Blueprint, Response, current_app, jsonify
from quart_schema import document_response, tag

from appliance import __version__
from appliance.web import cluster as cluster_updates
from appliance.web.services import services

blueprint = Blueprint("system", __name__)

MIN_FREE_DISK_MB = 200


class Health(BaseModel):
    status: str
    checks: dict[str, bool]
    version: str


@blueprint.get("/health")
@tag(["system"])
@document_response(Health, 200)
@document_response(Health, 503)
async def health() -> Response:
    """Liveness + readiness: the default model loaded, the database writable, disk free.
    A cluster node taking its turn in a rolling update answers 503 `draining`, so that the
    load balancer sends it nothing more (`appliance.web.cluster`)."""
    s = services()
    free_mb = shutil.disk_usage(s.settings.data_dir).free / 1024**2
    checks = {
        "started": s.ready,
        "model_loaded": s.models.ready,  # loaded, or unloaded only for idleness
        "database_writable": await s.db.writable(),
        "disk_free": free_mb >= MIN_FREE_DISK_MB,
    }
    cluster = cluster_updates.of_app(current_app.extensions)
    draining = cluster is not None and cluster.draining
    ok = all(checks.values()) and not draining
    state = "draining" if draining else "ok" if ok else "unavailable"
    response = jsonify({"status": state, "checks": checks, "version": __version__})
    response.status_code = 200 if ok else 503
    return response


@blueprint.get("/api/status")
@tag(["system"])
async def status() -> Response:
    """Version, uptime, engine, device, models, queue, CPU, RAM and disk."""
    s = services()
    mem = psutil.virtual_memory()
    disk = shutil.disk_usage(s.settings.data_dir)
    proc = psutil.Process()
    return jsonify(
        {
            "version": __version__,
            "uptime_seconds": round(time.time() - s.started, 1),
            "engine": s.settings.engine,
            # as resolved at start (DEVICE=auto picks cuda or cpu, each with its compute type)
            "device": getattr(s.models.engine, "device", "cpu"),
            "compute_type": getattr(s.models.engine, "compute_type", s.settings.compute_type),
            "default_model": s.default_model,
            "models": [m for m in s.models.status() if m["state"] != "not_downloaded"],
            "queue": s.jobs.stats(),
            "system": {
                "cpu_count": os.cpu_count(),
                "cpu_percent": psutil.cpu_percent(interval=None),
                "load_average": list(os.getloadavg()),
                "ram_total_mb": round(mem.total / 1024**2),
                "ram_available_mb": round(mem.available / 1024**2),
                "process_rss_mb": round(proc.memory_info().rss / 1024**2, 1),
                "disk_total_mb": round(disk.total / 1024**2),
                "disk_free_mb": round(disk.free / 1024**2),
            },
        }
    )


@blueprint.get("/api/models")
@tag(["system"])
async def models() -> Response:
    """The catalogue with each model's state, size, RAM need and languages."""
    return jsonify({"models": services().models.status()})
