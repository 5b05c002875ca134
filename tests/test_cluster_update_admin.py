"""A rolling update of a cluster from the admin panel (issue 16): real appliance apps on one
real PostgreSQL server, each with its own DATA_DIR and update spool. The root updater cannot
restart a service here, so the test plays its part on the spool as the real one does: it takes
the request a node wrote and answers in status.json (`Spool.write_status`), after stopping and
starting that node when the update "restarts" it. What is checked: one node at a time in the
plan's order (never two draining), a draining node's /health is 503, the first failure stops
the rest, a node that dies in its turn or before it does not block the cluster, and the admin
API refuses bad input, anonymous callers and a second update with JSON errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from quart import Quart

from appliance import __version__
from appliance.core.auth import PASSWORD_FILE
from appliance.system.config import Settings
from appliance.system.update import spool as update_spool
from appliance.system.update.history import UpdateHistory
from appliance.web import cluster
from appliance.web.app import create_app
from appliance.web.cluster import ClusterUpdates, of_app
from tests.conftest import make_settings
from tests.pgserver import PgServer
from tests.test_admin import Admin
from tests.test_admin_updates import bundle, bundle_bytes
from tests.test_auth import admin_password, login

SOURCE = "https://releases.example.org/whisper/9.9.9/"
FAST = {  # the loop's clock, shortened (appliance.web.cluster.Timing)
    "CLUSTER_TICK": 0.05,
    "CLUSTER_TURN_LEASE": 2.0,
    "CLUSTER_UPDATE_TIMEOUT": 30.0,
    "CLUSTER_NODE_STALE": 1.5,
    "CLUSTER_JOB_WAIT": 1.0,
}
WAIT = 20.0


class Node:
    """One appliance on the shared database, stopped and started again as its updater would."""

    def __init__(self, data_dir: Path, url: str, password: Path, **config: float) -> None:
        self.settings: Settings = make_settings(data_dir, database_url=url)
        self.password = password  # written by the node that created the admin account
        self.config = {**FAST, **config}
        self.app: Quart | None = None
        self._running: Any = None

    async def start(self) -> None:
        self.app = create_app(self.settings)
        self.app.config.update(self.config)
        self._running = self.app.test_app()
        await self._running.__aenter__()

    async def stop(self) -> None:
        if self._running is not None:
            await self._running.__aexit__(None, None, None)
            self._running = None

    @property
    def cluster(self) -> ClusterUpdates:
        assert self.app is not None
        found = of_app(self.app.extensions)
        assert found is not None
        return found

    @property
    def spool(self) -> Path:
        return update_spool.spool_dir(self.settings.data_dir)

    async def health(self) -> tuple[int, str]:
        assert self.app is not None
        response = await self.app.test_client().get("/health")
        return response.status_code, (await response.get_json())["status"]

    async def admin(self) -> Admin:
        assert self.app is not None
        client = self.app.test_client()
        return Admin(client, await login(client, self.password.read_text().strip()))


@pytest.fixture
async def start_nodes(
    shared_pg: PgServer, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[list[Node]]]]:
    url = shared_pg.new_database()
    started: list[Node] = []

    async def start(count: int, **config: float) -> list[Node]:
        for i in range(count):
            node = Node(tmp_path / f"node{i}", url, tmp_path / "node0" / PASSWORD_FILE, **config)
            await node.start()  # one after another: node0 creates the admin account
            started.append(node)
        return started

    yield start
    for node in reversed(started):
        await node.stop()


class Watch:
    """Samples every node's drain flag: which drained, in what order, how many at once."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.order: list[str] = []
        self.most_at_once = 0
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            running = [of_app(n.app.extensions) for n in self.nodes if n.app is not None]
            draining = [c.node for c in running if c is not None and c.draining]
            self.most_at_once = max(self.most_at_once, len(draining))
            self.order += [d for d in draining if d not in self.order]
            await asyncio.sleep(0.005)

    def stop(self) -> None:
        self._task.cancel()


async def until(what: str, check: Callable[[], Awaitable[Any]], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return result


async def take_request(node: Node, source: str = SOURCE) -> update_spool.UpdateRequest:
    """What the root updater does first: take the request the node wrote (an apply)."""

    async def written() -> bool:
        return (node.spool / update_spool.REQUEST).exists()

    await until(f"a request on {node.settings.data_dir.name}", written)
    req = update_spool.parse_request((node.spool / update_spool.REQUEST).read_bytes())
    (node.spool / update_spool.REQUEST).unlink()
    assert (req.action, req.source) == ("apply", source)
    return req


def report(node: Node, req: update_spool.UpdateRequest, state: str, to_version: str | None) -> None:
    """The updater's last word, as `appliance.system.update.cli` writes it."""
    spool = update_spool.Spool(node.spool)
    try:
        spool.write_status(
            {"id": req.id, "state": state, "message": f"{state} (test)", "to_version": to_version}
        )
    finally:
        spool.close()


async def latest(node: Node) -> dict[str, Any]:
    found = (await node.cluster.describe())["update"]
    assert found is not None
    return dict(found)


async def finished(node: Node) -> dict[str, Any] | None:
    update = await latest(node)
    return update if update["state"] != "running" else None


async def start_update(node: Node, **body: Any) -> dict[str, Any]:
    code, reply = await (await node.admin()).call(
        "POST", "/admin/api/cluster/update", json={"source": SOURCE, "drain_seconds": 0.3, **body}
    )
    assert code == 202, reply
    return dict(reply["update"])


# --- the rolling update ---------------------------------------------------------------------
async def test_one_node_at_a_time_in_order_and_done_after_the_restart(
    start_nodes: Callable[..., Awaitable[list[Node]]],
) -> None:
    nodes = await start_nodes(3)
    by_id = {n.cluster.node: n for n in nodes}
    code, state = await (await nodes[0].admin()).call("GET", "/admin/api/cluster")
    assert code == 200 and state["cluster"] is True
    assert sorted(n["node"] for n in state["nodes"] if n["alive"]) == sorted(by_id)
    watch = Watch(nodes)
    update = await start_update(nodes[0])
    plan = update["plan"]
    assert sorted(plan) == sorted(by_id) and update["state"] == "running"
    for turn, node_id in enumerate(plan):
        node = by_id[node_id]
        req = await take_request(node)
        # its turn: drained (HAProxy sees 503 "draining"), nobody else is, nor has a request
        assert await node.health() == (503, "draining")
        for other in nodes:
            if other is not node:
                assert (await other.health())[1] != "draining"
                assert not (other.spool / update_spool.REQUEST).exists()
        if turn == 1:  # the updater stops the service, switches, starts it, health-gates it
            await node.stop()
            await node.start()
            assert not node.cluster.draining
        report(node, req, "succeeded", __version__)

        async def turn_over(node_id: str = node_id) -> bool:
            outcome = (await latest(nodes[0]))["nodes"].get(node_id, {})
            return bool(outcome.get("state") == "done")

        await until(f"the end of {node_id}'s turn", turn_over)
        assert (await node.health())[1] != "draining"
    done = await until("the update's end", lambda: finished(nodes[0]))
    watch.stop()
    assert done["state"] == "done" and done["error"] is None
    assert done["target_version"] == __version__
    assert watch.order == plan and watch.most_at_once == 1
    restarted = done["nodes"][plan[1]]
    assert (restarted["from_version"], restarted["to_version"]) == (__version__, __version__)


async def test_the_first_failure_stops_the_rest(
    start_nodes: Callable[..., Awaitable[list[Node]]],
) -> None:
    nodes = await start_nodes(2)
    by_id = {n.cluster.node: n for n in nodes}
    watch = Watch(nodes)
    plan = (await start_update(nodes[1]))["plan"]
    first, second = by_id[plan[0]], by_id[plan[1]]
    req = await take_request(first)
    report(first, req, "rolled_back", "9.9.9")  # the new release was not healthy
    failed = await until("the failure", lambda: finished(second))
    assert failed["state"] == "failed" and "rolled_back (test)" in failed["error"]
    assert failed["current_node"] == plan[0]
    assert failed["nodes"][plan[0]]["state"] == "failed"
    await asyncio.sleep(20 * FAST["CLUSTER_TICK"])  # the second node had every chance
    watch.stop()
    assert plan[1] not in failed["nodes"]
    assert not (second.spool / update_spool.REQUEST).exists()
    assert watch.order == [plan[0]]
    assert not first.cluster.draining  # the old release serves again
    # a new update may start once this one failed
    assert (await start_update(nodes[0]))["state"] == "running"


async def test_a_node_that_dies_in_its_turn_fails_the_update(
    start_nodes: Callable[..., Awaitable[list[Node]]],
) -> None:
    nodes = await start_nodes(2, CLUSTER_UPDATE_TIMEOUT=1.0)
    by_id = {n.cluster.node: n for n in nodes}
    plan = (await start_update(nodes[0]))["plan"]
    dying, survivor = by_id[plan[0]], by_id[plan[1]]
    await take_request(dying)
    await dying.stop()  # and its updater never reports
    failed = await until("the deadline", lambda: finished(survivor))
    assert failed["state"] == "failed"
    assert f"node {plan[0]} did not finish its turn in time" in failed["error"]
    assert failed["nodes"][plan[0]]["state"] == "failed"
    assert not survivor.cluster.draining
    assert not (survivor.spool / update_spool.REQUEST).exists()


async def test_a_node_whose_updater_never_reports_serves_again(
    start_nodes: Callable[..., Awaitable[list[Node]]],
) -> None:
    (node,) = await start_nodes(1, CLUSTER_UPDATE_TIMEOUT=1.0)
    await start_update(node)
    await take_request(node)  # and the updater hangs: the service is never restarted
    assert await node.health() == (503, "draining")
    failed = await until("the deadline", lambda: finished(node))
    assert "did not finish its turn in time" in failed["error"]

    async def serving() -> bool:
        return not node.cluster.draining

    await until("the node to serve again", serving)
    assert (await node.health())[1] != "draining"


async def test_a_node_dead_before_its_turn_fails_the_update(
    start_nodes: Callable[..., Awaitable[list[Node]]],
) -> None:
    nodes = await start_nodes(2)
    by_id = {n.cluster.node: n for n in nodes}
    plan = (await start_update(nodes[0]))["plan"]
    first, dead = by_id[plan[0]], by_id[plan[1]]
    await dead.stop()  # in the plan (seen just now), gone before its turn
    report(first, await take_request(first), "succeeded", __version__)
    failed = await until("the dead node's turn", lambda: finished(first))
    assert failed["state"] == "failed"
    assert f"node {plan[1]} is not answering" in failed["error"]
    assert failed["nodes"][plan[0]]["state"] == "done"


async def test_an_update_refused_as_already_installed_counts_as_done(
    start_nodes: Callable[..., Awaitable[list[Node]]],
) -> None:
    (node,) = await start_nodes(1)
    update = await start_update(node)
    req = await take_request(node)
    # what the updater leaves when the release is the running one: a history row naming the
    # release it read, and a status without a version (a refusal installed nothing)
    UpdateHistory(node.settings.data_dir).record(
        None,
        action="apply",
        from_version=__version__,
        to_version=__version__,
        source=SOURCE,
        status="refused",
        message=f"{__version__} is already the running release",
        request_id=req.id,
    )
    report(node, req, "refused", None)
    done = await until("the update's end", lambda: finished(node))
    assert (done["id"], done["state"]) == (update["id"], "done")
    assert done["nodes"][node.cluster.node]["message"] == f"already on {__version__}"


async def test_an_uploaded_bundle_reaches_every_node(
    start_nodes: Callable[..., Awaitable[list[Node]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster, "BUNDLE_CHUNK", 1000)  # several chunks
    nodes = await start_nodes(2)
    by_id = {n.cluster.node: n for n in nodes}
    name = "whisper-appliance-9.9.9.release.tar"
    data = bundle_bytes() * 2
    code, reply = await (await nodes[1].admin()).call(
        "POST",
        "/admin/api/cluster/upload",
        files=bundle(data, name),
        form={"drain_seconds": "0.2"},
    )
    assert code == 202, reply
    update = reply["update"]
    assert (update["source"], update["bundle"], update["drain_seconds"]) == (name, True, 0.2)
    assert stored_chunks(nodes[0]) == -(-len(data) // 1000)
    assert list(nodes[1].settings.tmp_dir.iterdir()) == []
    for node_id in update["plan"]:
        node = by_id[node_id]

        async def written(node: Node = node) -> list[Path]:
            return list(node.spool.glob("upload-*.release.tar"))

        (upload,) = await until("the bundle in the spool", written)
        req = await take_request(node, upload.name)
        assert upload.read_bytes() == data  # the whole bundle, byte for byte
        upload.unlink()  # the updater consumes it
        report(node, req, "succeeded", __version__)
    assert (await until("the update's end", lambda: finished(nodes[0])))["state"] == "done"

    async def chunks_gone() -> bool:
        return stored_chunks(nodes[0]) == 0

    await until("the bundle's removal", chunks_gone)


def stored_chunks(node: Node) -> int:
    with psycopg.connect(node.settings.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM cluster_update_bundles").fetchone()
    assert row is not None
    return int(row[0])


# --- the admin API --------------------------------------------------------------------------
BAD: list[dict[str, Any]] = [
    {"data": b""},
    {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
    {"json": []},
    {"json": SOURCE},
    {"json": {"source": 5}},
    {"json": {"source": ""}},
    {"json": {"source": "file:///etc/shadow"}},
    {"json": {"source": f"upload-{'ab' * 16}.release.tar"}},
    {"json": {"source": "http://user:secret@example.org/"}},
    {"json": {"source": SOURCE, "drain_seconds": "6"}},
    {"json": {"source": SOURCE, "drain_seconds": True}},
    {"json": {"source": SOURCE, "drain_seconds": -1}},
    {"json": {"source": SOURCE, "drain_seconds": 10_000}},
    {"json": {"source": SOURCE, "nodes": ["x"]}},
    {"json": {}},  # no UPDATE_SOURCE configured: no release to update to
]


BAD_UPLOADS: list[tuple[str, dict[str, Any], int]] = [
    ("no multipart", {"json": {"file": "x"}}, 415),
    ("wrong field", {"files": {"bundle": bundle()["file"]}}, 400),
    ("not a tar", {"files": bundle(b"PK\x03\x04" + b"\0" * 600)}, 400),
    ("a .tar", {"files": bundle(name="release.tar")}, 400),
    ("drain not a number", {"files": bundle(), "form": {"drain_seconds": "soon"}}, 400),
    ("drain too long", {"files": bundle(), "form": {"drain_seconds": "601"}}, 400),
    ("unknown field", {"files": bundle(), "form": {"nodes": "all"}}, 400),
]


async def test_bad_input_and_callers_are_refused_with_json_errors(
    start_nodes: Callable[..., Awaitable[list[Node]]],
) -> None:
    (node,) = await start_nodes(1)
    assert node.app is not None
    admin = await node.admin()
    for kwargs in BAD:
        code, body = await admin.call("POST", "/admin/api/cluster/update", **kwargs)
        assert 400 <= code < 500 and code != 409, (kwargs, code, body)
        assert body["error"]["code"] and body["error"]["message"], kwargs
    anonymous = node.app.test_client()
    for method, path in (
        ("GET", "/admin/api/cluster"),
        ("POST", "/admin/api/cluster/update"),
        ("POST", "/admin/api/cluster/upload"),
    ):
        response = await anonymous.open(path, method=method, json={"source": SOURCE})
        assert response.status_code == 401
        assert (await response.get_json())["error"]["code"] == "login_required"
    code, body = await Admin(admin.client, "wrong").call(
        "POST", "/admin/api/cluster/update", json={"source": SOURCE}
    )
    assert (code, body["error"]["code"]) == (403, "csrf_failed")
    assert (await node.cluster.describe())["update"] is None  # nothing was started
    for what, kwargs, status in BAD_UPLOADS:
        code, body = await admin.call("POST", "/admin/api/cluster/upload", **kwargs)
        assert code == status, (what, code, body)
        assert body["error"]["code"] and body["error"]["message"], what
    assert list(node.settings.tmp_dir.iterdir()) == []
    assert stored_chunks(node) == 0
    await start_update(node, drain_seconds=60)
    code, body = await admin.call("POST", "/admin/api/cluster/update", json={"source": SOURCE})
    assert (code, body["error"]["code"]) == (409, "cluster_update_running")
    # nor does the node update or roll back alone while the rolling update runs
    for path, kwargs in (
        ("/admin/api/updates/apply", {"json": {"source": SOURCE}}),
        ("/admin/api/updates/rollback", {"json": {}}),
    ):
        code, body = await admin.call("POST", path, **kwargs)
        assert (code, body["error"]["code"]) == (409, "cluster_update_running"), path


async def test_a_single_appliance_has_no_cluster(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", database_url="")
    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        admin = Admin(client, await login(client, admin_password(settings)))
        code, body = await admin.call("GET", "/admin/api/cluster")
        assert (code, body) == (200, {"cluster": False, "node": None, "nodes": [], "update": None})
        code, body = await admin.call("POST", "/admin/api/cluster/update", json={"source": SOURCE})
        assert (code, body["error"]["code"]) == (409, "not_a_cluster")
        assert of_app(app.extensions) is None
