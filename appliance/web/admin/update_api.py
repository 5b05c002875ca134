"""The admin API of self-update: the state of releases and requests, and asking the privileged
updater (whisper-appliance-update.service) to apply an update or roll back.

The web process never changes code or releases itself: it writes one request into the spool
(appliance.system.update.spool) and the systemd path unit starts the root updater, which
reports back in status.json and the update_history table.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict
from quart import Blueprint, Response, current_app, jsonify, request
from quart_schema import DataSource, document_request, document_response, tag

from appliance import __version__
from appliance.system.update import history as update_history
from appliance.system.update import spool as update_spool
from appliance.system.update.releases import DEFAULT_ROOT, ReleaseTree
from appliance.web import cluster
from appliance.web.admin import updates
from appliance.web.api.validation import read_form, validate_json
from appliance.web.errors import APIError
from appliance.web.services import services
from appliance.web.upload import Upload, receive_upload

log = logging.getLogger(__name__)
# nested in the guarded /admin blueprint by `appliance.web.admin.init_app`
blueprint = Blueprint("update_api", __name__)

# app.config key: the largest release bundle accepted for upload (the wheelhouse is ~330 MB)
MAX_BUNDLE_CONFIG = "UPDATE_MAX_BUNDLE_BYTES"
DEFAULT_MAX_BUNDLE = 4 * 1024**3
HISTORY_ROWS = 50
_BUNDLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,190}\.release\.tar$")


class UpdateState(BaseModel):
    current_version: str
    releases: list[str] = Field(description="Installed releases under /opt/whisper-appliance")
    state: str = Field(description="idle, pending (waits for the updater) or running")
    pending: dict[str, Any] | None = Field(description="The request waiting for the updater")
    status: dict[str, Any] | None = Field(description="The updater's report on the last request")
    history: list[dict[str, Any]] = Field(description="update_history rows, newest first")


class ApplyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(
        None, description="http(s) URL of a release; default: the release UPDATE_SOURCE offers"
    )


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to_version: str | None = Field(None, description="An installed release; default: previous")


class BundleForm(BaseModel):
    file: bytes = Field(description="A signed whisper-appliance-<version>.release.tar bundle")


class Accepted(BaseModel):
    request: dict[str, Any]


DrainSeconds = Annotated[
    float,
    Field(
        ge=0,
        le=cluster.MAX_DRAIN_SECONDS,
        description="How long each node answers /health with 503 before its update (HAProxy)",
    ),
]


class ClusterState(BaseModel):
    cluster: bool = Field(description="False on a single appliance (SQLite): nothing else then")
    node: str | None = Field(description="This node's id")
    nodes: list[dict[str, Any]] = Field(description="Registered nodes: version, state, last seen")
    update: dict[str, Any] | None = Field(description="The latest rolling update")


class ClusterUpdateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(
        None, description="http(s) URL of a release; default: the release UPDATE_SOURCE offers"
    )
    drain_seconds: Annotated[DrainSeconds, Strict()] = cluster.DEFAULT_DRAIN_SECONDS


class ClusterBundleForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: bytes | None = Field(
        None, description="A signed whisper-appliance-<version>.release.tar bundle"
    )
    drain_seconds: DrainSeconds = cluster.DEFAULT_DRAIN_SECONDS  # form fields are text


class ClusterAccepted(BaseModel):
    update: dict[str, Any]


def _spool() -> Path:
    return update_spool.ensure(services().settings.data_dir)


def _releases() -> ReleaseTree:
    """Read-only use: list the releases under the install root (UPDATER_ROOT, as the unit)."""
    return ReleaseTree(Path(os.environ.get("UPDATER_ROOT") or DEFAULT_ROOT))


def _lock() -> asyncio.Lock:
    return services().update_request_lock


def _state(spool: Path) -> dict[str, Any]:
    return {
        "current_version": __version__,
        "releases": _releases().installed(),
        "state": update_spool.busy(spool) or "idle",
        "pending": update_spool.read_pending(spool),
        "status": update_spool.read_status(spool),
        "history": update_history.read_only(services().settings.db_path, HISTORY_ROWS),
    }


def _accepted(req: update_spool.UpdateRequest) -> Response:
    response = jsonify({"request": req.as_dict()})
    response.status_code = 202
    return response


def _refuse_if_busy(spool: Path) -> None:
    state = update_spool.busy(spool)
    if state is not None:
        raise APIError(409, f"update_{state}", f"an update request is {state}: wait for it")


async def _refuse_during_cluster_update() -> None:
    """A node's own apply, upload or rollback while the cluster's rolling update runs would race
    its hand-over to this node's updater: refused until the rolling update ends."""
    found = cluster.of_app(current_app.extensions)
    if found is not None and await found.running() is not None:
        raise cluster.ClusterUpdateRunning(
            "a rolling update of the cluster is running: wait for it to end"
        )


async def _submit(spool: Path, req: update_spool.UpdateRequest) -> None:
    # SpoolBusy is an ApplianceError (409 update_pending): the error handler answers
    await asyncio.to_thread(update_spool.submit, spool, req)
    log.info("update requested: %s %s", req.action, req.source or req.to_version or "")


async def _default_source() -> str:
    source = services().settings.update_source
    if not source:
        raise APIError(400, "no_update_source", "no UPDATE_SOURCE configured: give a source URL")
    check = await updates.check(source, __version__)
    if check["url"]:
        return str(check["url"])
    if re.match(r"^https?://", source):
        return source
    raise APIError(
        400, "no_update_source", "UPDATE_SOURCE is not an http(s) URL: give a source URL"
    )


@blueprint.get("/api/updates")
@tag(["admin"])
@document_response(UpdateState)
async def update_state() -> Response:
    """Installed releases, the pending request, the updater's last report and the history."""
    return jsonify(await asyncio.to_thread(_state, _spool()))


@blueprint.post("/api/updates/apply")
@tag(["admin"])
@validate_json(ApplyBody)
@document_response(Accepted, 202)
async def apply_update(data: ApplyBody) -> Response:
    """Ask the updater to install a release from a URL (default: from UPDATE_SOURCE)."""
    spool = _spool()
    await _refuse_during_cluster_update()
    async with _lock():
        _refuse_if_busy(spool)
        source = data.source
        if source is None:
            source = await _default_source()
        try:
            req = update_spool.make_request("apply", source=update_spool.check_url(source))
        except update_spool.RequestError as exc:
            raise APIError(400, "invalid_source", str(exc)) from None
        await _submit(spool, req)
    return _accepted(req)


@blueprint.post("/api/updates/upload")
@tag(["admin"])
@document_request(BundleForm, source=DataSource.FORM_MULTIPART)
@document_response(Accepted, 202)
async def upload_update() -> Response:
    """Upload a signed release bundle (air-gapped sites) and ask the updater to install it."""
    spool = _spool()
    _refuse_if_busy(spool)  # before receiving hundreds of MB
    await _refuse_during_cluster_update()
    upload = await _receive_bundle()
    try:
        assert upload.file_path is not None
        async with _lock():
            _refuse_if_busy(spool)
            req_id = update_spool.new_id()
            bundle = spool / update_spool.upload_name(req_id)
            await asyncio.to_thread(os.replace, upload.file_path, bundle)
            upload.file_path = None
            try:
                req = update_spool.make_request("apply", source=bundle.name, request_id=req_id)
                await _submit(spool, req)
            except BaseException:
                bundle.unlink(missing_ok=True)
                raise
    finally:
        upload.discard()
    log.info("release bundle %s uploaded (%d bytes)", upload.file_name, upload.file_size)
    return _accepted(req)


async def _receive_bundle() -> Upload:
    """The request's file, streamed to the temp dir, if it looks like a release bundle (name,
    tar magic): the updater verifies the rest. Anything refused leaves no file behind."""
    limit = int(current_app.config.get(MAX_BUNDLE_CONFIG, DEFAULT_MAX_BUNDLE))
    try:
        upload = await receive_upload(
            request, services().settings.tmp_dir, min(limit, update_spool.MAX_ARTIFACT)
        )
    except OSError as exc:  # the disk filled up while the bundle arrived
        raise APIError(507, "insufficient_storage", f"cannot store the upload: {exc}") from None
    try:
        if not _BUNDLE_NAME.match(upload.file_name):
            raise APIError(
                400, "invalid_file_name", "upload a whisper-appliance-<version>.release.tar bundle"
            )
        assert upload.file_path is not None
        if not await asyncio.to_thread(_looks_like_tar, upload.file_path):
            raise APIError(400, "not_a_bundle", "the file is not a release bundle (a tar file)")
    except BaseException:
        upload.discard()
        raise
    return upload


def _looks_like_tar(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(257)
        return f.read(5) == b"ustar"


@blueprint.post("/api/updates/rollback")
@tag(["admin"])
@validate_json(RollbackBody)
@document_response(Accepted, 202)
async def rollback_update(data: RollbackBody) -> Response:
    """Ask the updater to go back to the previous (or a named, installed) release."""
    to_version = data.to_version
    try:
        if to_version is not None:
            update_spool.check_version(to_version)
        req = update_spool.make_request("rollback", to_version=to_version)
    except update_spool.RequestError as exc:
        raise APIError(400, "invalid_version", str(exc)) from None
    installed = await asyncio.to_thread(_releases().installed)
    if to_version is not None and to_version not in installed:
        raise APIError(400, "unknown_version", f"{to_version} is not an installed release")
    spool = _spool()
    await _refuse_during_cluster_update()
    async with _lock():
        _refuse_if_busy(spool)
        await _submit(spool, req)
    return _accepted(req)


# --- a rolling update of the cluster (PostgreSQL) -----------------------------------------------
def _cluster() -> cluster.ClusterUpdates:
    found = cluster.of_app(current_app.extensions)
    if found is None:
        raise APIError(409, "not_a_cluster", "this appliance is not part of a cluster")
    return found


@blueprint.get("/api/cluster")
@tag(["admin"])
@document_response(ClusterState)
async def cluster_state() -> Response:
    """The cluster's nodes and its latest rolling update (`cluster: false` on one appliance)."""
    found = cluster.of_app(current_app.extensions)
    if found is None:
        return jsonify({"cluster": False, "node": None, "nodes": [], "update": None})
    return jsonify({"cluster": True, **await found.describe()})


@blueprint.post("/api/cluster/update")
@tag(["admin"])
@validate_json(ClusterUpdateBody)
@document_response(ClusterAccepted, 202)
async def cluster_update(data: ClusterUpdateBody) -> Response:
    """Update every node of the cluster to a release URL (default: UPDATE_SOURCE's).

    One node at a time: drained, updated by its own updater, health-gated; the first failure
    stops the rest (`appliance.web.cluster`)."""
    nodes = _cluster()
    source = data.source
    if source is None:
        source = await _default_source()
    try:
        update_spool.check_url(source)
    except update_spool.RequestError as exc:
        raise APIError(400, "invalid_source", str(exc)) from None
    # ClusterUpdateRunning is an ApplianceError (409): the error handler answers
    return _cluster_accepted(await nodes.create(source, data.drain_seconds))


@blueprint.post("/api/cluster/upload")
@tag(["admin"])
@document_request(ClusterBundleForm, source=DataSource.FORM_MULTIPART)
@document_response(ClusterAccepted, 202)
async def cluster_upload() -> Response:
    """Upload a signed release bundle and update every node of the cluster to it.

    As `POST /admin/api/cluster/update`; the bundle is kept in the database until the update
    ends, so air-gapped nodes need nothing else."""
    nodes = _cluster()
    upload = await _receive_bundle()
    try:
        form = read_form(upload, ClusterBundleForm)
        assert upload.file_path is not None
        update = await nodes.create(upload.file_name, form.drain_seconds, upload.file_path)
    finally:
        upload.discard()
    log.info("cluster update with the uploaded %s (%d bytes)", upload.file_name, upload.file_size)
    return _cluster_accepted(update)


def _cluster_accepted(update: dict[str, Any]) -> Response:
    response = jsonify({"update": update})
    response.status_code = 202
    return response
