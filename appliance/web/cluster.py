"""Rolling update of a cluster from the admin panel (issue 16): one node at a time, drained in
HAProxy first, gated by each node's root updater, stopped on the first failure. PostgreSQL only:
a single appliance (SQLite) has no cluster and none of this runs.

Shared state, in the cluster's database:

- `cluster_nodes`: every node registers itself (its `DATA_DIR/node-id`, the job queue's id,
  hostname, version, state) and beats every `Timing.tick`; a node not seen for
  `Timing.node_stale` is gone.
- `cluster_updates`: what the admin panel of any node creates: the release, the plan (the
  nodes alive then, by hostname and id: the turn order), the drain time, the state (running,
  failed, done), the node whose turn it is with the turn's deadline, each node's outcome and
  the error. A partial unique index admits one running update: two admins clicking at once
  get one update and one 409.
- The release is an http(s) URL every node's root updater fetches, or an uploaded bundle kept
  in `cluster_update_bundles` in chunks while the update runs (as the job queue keeps audio:
  any node reads it with nothing shared but the database). Each node's updater verifies the
  signature itself, as for a single node's update.

No coordinator: each node's loop reads the running update. The first node of the plan without
an outcome takes its turn with one conditional UPDATE (`current_node IS NULL`), so two nodes
never hold a turn, and never drain, at once. The holder (1) drains: /health answers 503
`{"status": "draining"}` so HAProxy takes it out (the default wait, 6 s, is its 3 failed
checks 2 s apart), then it waits (bounded) for the jobs it runs; what still runs when the
updater stops the service goes back to the queue (the job queue's graceful stop); (2) hands
the release to its root updater with the same spool request as the single-node update, and
fixes the turn's deadline (`Timing.update_timeout`: install, restart, health gate); (3) the
updater reports in the spool's status.json and the node's update history; whichever process
of the node reads it ends the turn: the new release after the restart marks it done, the old
one after a rollback or a refusal marks the whole update failed, and nobody takes another turn.
A node that runs another version than the one the updater installed, or than the nodes before
it got, fails it too.

A dead node never blocks the cluster forever: any node marks the update failed when the
current turn's deadline passed (renewed each tick while the holder drains, fixed once its
updater has the request) or when the next node of the plan has stopped beating. Failing is
the safe end: the cluster keeps serving on the nodes that are up, and the admin decides.
Times are the database's clock (nodes' clocks may differ).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from appliance import __version__
from appliance.core.db import DB_ERRORS, PostgresDatabase
from appliance.exceptions import ApplianceError
from appliance.system.update import history as update_history
from appliance.system.update import spool as update_spool

log = logging.getLogger(__name__)

CLUSTER = "cluster_updates"  # the app.extensions key of this node's ClusterUpdates (PostgreSQL)
DEFAULT_DRAIN_SECONDS = 6.0  # HAProxy: a node is out after 3 failed checks, 2 s apart
MAX_DRAIN_SECONDS = 600.0
FORGET_NODES_AFTER = 7 * 86400  # node rows not seen for a week (a node rebuilt, removed)
BUNDLE_CHUNK = 1 << 20  # bytes per cluster_update_bundles row
HAND_OVER_ERRORS: tuple[type[Exception], ...] = (
    update_spool.SpoolBusy,
    update_spool.RequestError,
    OSError,
    *DB_ERRORS,
)
FINAL = ("succeeded", "refused", "failed", "rolled_back", "rollback_failed")

MIGRATIONS = [
    """
    CREATE TABLE cluster_nodes (
        node TEXT PRIMARY KEY,
        hostname TEXT NOT NULL,
        version TEXT NOT NULL,
        state TEXT NOT NULL,  -- serving | draining | updating
        started DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE cluster_updates (
        id TEXT PRIMARY KEY,
        created DOUBLE PRECISION NOT NULL,
        requested_on TEXT NOT NULL,
        source TEXT NOT NULL,  -- the URL, or the uploaded bundle's file name
        bundle BOOLEAN NOT NULL DEFAULT false,  -- the release is in cluster_update_bundles
        drain_seconds DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL,  -- running | failed | done
        plan JSONB NOT NULL,  -- node ids in turn order
        nodes JSONB NOT NULL DEFAULT '{}'::jsonb,  -- node id -> its outcome
        current_node TEXT,
        turn_until DOUBLE PRECISION,
        target_version TEXT,
        error TEXT,
        finished DOUBLE PRECISION
    );
    CREATE TABLE cluster_update_bundles (
        update_id TEXT NOT NULL REFERENCES cluster_updates (id) ON DELETE CASCADE,
        chunk INTEGER NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (update_id, chunk)
    );
    -- an uploaded release is kept while its update runs, no longer
    CREATE FUNCTION cluster_drop_bundle() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM cluster_update_bundles WHERE update_id = NEW.id;
        RETURN NULL;
    END $$;
    CREATE TRIGGER cluster_update_ended AFTER UPDATE OF state ON cluster_updates
        FOR EACH ROW WHEN (NEW.state <> 'running') EXECUTE FUNCTION cluster_drop_bundle();
    CREATE UNIQUE INDEX cluster_updates_one_running ON cluster_updates (state)
        WHERE state = 'running';
    -- the database's clock, in seconds: nodes' clocks may differ
    CREATE FUNCTION cluster_now() RETURNS double precision LANGUAGE sql VOLATILE
        AS $$ SELECT extract(epoch FROM clock_timestamp())::float8 $$;
    """
]


class NotACluster(ApplianceError):
    status, code = 409, "not_a_cluster"


class ClusterUpdateRunning(ApplianceError):
    status, code = 409, "cluster_update_running"


@dataclass(frozen=True)
class Timing:
    """The loop's clock (seconds); tests shorten it through the app's config."""

    tick: float = 2.0
    turn_lease: float = 30.0  # a draining node renews its turn this far ahead every tick
    update_timeout: float = 1800.0  # from handing over to the updater's report
    node_stale: float = 30.0  # a node not seen this long is gone
    job_wait: float = 300.0  # longest wait for the node's running jobs while it drains

    @classmethod
    def from_config(cls, config: Any) -> Timing:
        """`CLUSTER_<FIELD>` app.config keys over the defaults."""
        defaults = cls()
        return cls(
            **{
                name: float(config.get(f"CLUSTER_{name.upper()}", getattr(defaults, name)))
                for name in cls.__dataclass_fields__
            }
        )


class ClusterUpdates:
    """This node's part: register, beat, take its turn, report; and the admin panel's view."""

    def __init__(
        self,
        db: PostgresDatabase,
        *,
        node: str,
        data_dir: Path,
        db_path: Path,
        running_jobs: Callable[[], int],
        claim_jobs: Callable[[bool], None],
        request_lock: asyncio.Lock,
        timing: Timing | None = None,
        version: str = __version__,
    ) -> None:
        self.db = db
        self.node = node
        self.data_dir = data_dir
        self.db_path = db_path  # the node's SQLite file: the root updater's history is there
        self.running_jobs = running_jobs
        self.claim_jobs = claim_jobs  # False while draining: queued jobs go to the other nodes
        self.request_lock = request_lock  # the admin panel's single-node requests use it too
        self.timing = timing or Timing()
        self.version = version
        self.hostname = socket.gethostname()[:200]
        self.started = time.time()
        self.state = "serving"  # draining and updating answer /health with 503
        self._loop: asyncio.Task[None] | None = None
        self._turn: asyncio.Task[None] | None = None

    @property
    def draining(self) -> bool:
        return self.state != "serving"

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.db.migrate("cluster", MIGRATIONS)
        await self._write(
            "DELETE FROM cluster_nodes WHERE last_seen < cluster_now() - ?", (FORGET_NODES_AFTER,)
        )
        await self._beat()
        self._loop = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop; a turn under way resumes at the next start (or its deadline ends it)."""
        for task in (self._turn, self._loop):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop = self._turn = None

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except DB_ERRORS as exc:  # the database is away for a moment: next tick
                log.warning("cluster update loop: %s", exc)
            await asyncio.sleep(self.timing.tick)

    # --- one round of the loop ---------------------------------------------------------------
    async def step(self) -> None:
        await self._beat()
        update = await self.running()
        if update is not None and update["overdue"] and await self._expire(update):
            update = None
        mine = update is not None and update["current_node"] == self.node
        if self.draining and not mine:  # the update ended without this node (a deadline)
            await self._abandon()
        if update is None:
            return
        if mine:
            await self._own_turn(update)
        elif update["current_node"] is None:
            await self._next_turn(update)

    async def _beat(self) -> None:
        await self._write(
            "INSERT INTO cluster_nodes (node, hostname, version, state, started, last_seen)"
            " VALUES (?, ?, ?, ?, ?, cluster_now()) ON CONFLICT (node) DO UPDATE SET"
            " hostname = excluded.hostname, version = excluded.version, state = excluded.state,"
            " started = excluded.started, last_seen = excluded.last_seen",
            (self.node, self.hostname, self.version, self.state, self.started),
        )

    async def _expire(self, update: dict[str, Any]) -> int:
        """A turn past its deadline: its node died, hung, or its updater never reported."""
        return await self._write(
            "UPDATE cluster_updates SET state = 'failed', finished = cluster_now(),"
            " error = 'node ' || current_node || ' did not finish its turn in time"
            " (no report from it or its updater)',"
            " nodes = nodes || jsonb_build_object(current_node,"
            " coalesce(nodes -> current_node, '{}'::jsonb) || '{\"state\": \"failed\"}'::jsonb)"
            " WHERE id = ? AND state = 'running' AND turn_until < cluster_now()",
            (update["id"],),
        )

    async def _next_turn(self, update: dict[str, Any]) -> None:
        outcomes: dict[str, Any] = update["nodes"]
        waiting = [n for n in update["plan"] if outcomes.get(n, {}).get("state") != "done"]
        if not waiting:
            return
        nxt = waiting[0]
        if nxt == self.node:
            entry = {"state": "draining", "from_version": self.version, "started": time.time()}
            taken = await self._write(
                "UPDATE cluster_updates SET current_node = ?, turn_until = cluster_now() + ?,"
                " nodes = nodes || jsonb_build_object(?::text, ?::jsonb)"
                " WHERE id = ? AND state = 'running' AND current_node IS NULL",
                (self.node, self.timing.turn_lease, self.node, json.dumps(entry), update["id"]),
            )
            if taken:
                log.info("cluster update %s: this node's turn", update["id"])
                self._start_turn(update, entry)
            return
        alive = await self._fetch(
            "SELECT node FROM cluster_nodes WHERE node = ? AND last_seen > cluster_now() - ?",
            (nxt, self.timing.node_stale),
        )
        if not alive:
            message = f"node {nxt} is not answering (no heartbeat): its turn cannot start"
            await self._write(
                "UPDATE cluster_updates SET state = 'failed', finished = cluster_now(), error = ?,"
                " nodes = nodes || jsonb_build_object(?::text, ?::jsonb)"
                " WHERE id = ? AND state = 'running' AND current_node IS NULL",
                (message, nxt, json.dumps({"state": "failed", "message": message}), update["id"]),
            )

    async def _own_turn(self, update: dict[str, Any]) -> None:
        mine: dict[str, Any] = update["nodes"].get(self.node, {})
        if mine.get("state") == "draining":
            if self._turn is None or self._turn.done():  # restarted while draining: resume
                self._start_turn(update, mine)
            await self._write(
                "UPDATE cluster_updates SET turn_until = cluster_now() + ?"
                " WHERE id = ? AND state = 'running' AND current_node = ?",
                (self.timing.turn_lease, update["id"], self.node),
            )
        elif mine.get("state") == "updating":
            await self._report(update, mine)

    # --- the turn ---------------------------------------------------------------------------
    def _start_turn(self, update: dict[str, Any], entry: dict[str, Any]) -> None:
        self.state = "draining"
        self.claim_jobs(False)
        self._turn = asyncio.create_task(self._drain_and_hand_over(update, entry))

    async def _abandon(self) -> None:
        """Serve again: whatever this node's turn was waiting for, it is over."""
        if self._turn is not None and not self._turn.done():
            self._turn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._turn
        await self._serve()

    async def _drain_and_hand_over(self, update: dict[str, Any], entry: dict[str, Any]) -> None:
        try:
            await self._beat()
            await asyncio.sleep(float(update["drain_seconds"]))  # HAProxy's checks see 503
            deadline = time.monotonic() + self.timing.job_wait
            # polled: the job queue has no "idle" event, and a second of delay costs nothing
            while self.running_jobs() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(min(1.0, self.timing.tick))
            await self._hand_over(update, entry)
        except DB_ERRORS as exc:  # the loop resumes the turn while its lease holds
            log.warning("cluster update %s: %s", update["id"], exc)

    async def _hand_over(self, update: dict[str, Any], entry: dict[str, Any]) -> None:
        req_id = update_spool.new_id()
        entry = {
            **entry,
            "state": "updating",
            "request": req_id,
            "from_version": self.version,
        }
        # recorded first: a request the updater acts on always belongs to a live turn
        recorded = await self._write(
            "UPDATE cluster_updates SET turn_until = cluster_now() + ?,"
            " nodes = nodes || jsonb_build_object(?::text, ?::jsonb)"
            " WHERE id = ? AND state = 'running' AND current_node = ?",
            (self.timing.update_timeout, self.node, json.dumps(entry), update["id"], self.node),
        )
        if not recorded:  # failed meanwhile (a deadline): serve again
            await self._serve()
            return
        spool = await asyncio.to_thread(update_spool.ensure, self.data_dir)
        bundle = spool / update_spool.upload_name(req_id)
        try:
            if update["bundle"]:
                await self._fetch_bundle(update["id"], bundle)
                source = bundle.name
            else:
                source = update_spool.check_url(update["source"])
            req = update_spool.make_request("apply", source=source, request_id=req_id)
            async with self.request_lock:
                await asyncio.to_thread(update_spool.submit, spool, req)
        except HAND_OVER_ERRORS as exc:
            bundle.unlink(missing_ok=True)
            await self._end_turn(update, entry, f"cannot hand the release to the updater: {exc}")
            return
        self.state = "updating"
        await self._beat()
        log.info("cluster update %s: the updater has request %s", update["id"], req_id)

    async def _fetch_bundle(self, update_id: str, target: Path) -> None:
        """The uploaded release, a chunk at a time, into the spool (where uploads go)."""
        chunk = 0
        with target.open("xb") as out:
            while rows := await self._fetch(
                "SELECT data FROM cluster_update_bundles WHERE update_id = ? AND chunk = ?",
                (update_id, chunk),
            ):
                await asyncio.to_thread(out.write, rows[0]["data"])
                chunk += 1
        if not chunk:
            raise OSError("the uploaded release is gone from the database")

    async def _report(self, update: dict[str, Any], mine: dict[str, Any]) -> None:
        """The updater's outcome of this node's request, once it is there, ends the turn."""
        found = await asyncio.to_thread(self._updater_outcome, str(mine.get("request")))
        if found is None:
            return  # not reported yet: the turn's deadline covers an updater that never does
        status, to_version, message = found
        ok = to_version == self.version and status in ("succeeded", "refused")
        if status == "refused" and ok:
            message = f"already on {to_version}"
        elif status == "succeeded" and not ok:
            message = f"the updater installed {to_version}, but this node runs {self.version}"
        target = update["target_version"]
        if ok and target is not None and target != to_version:
            ok, message = False, f"installed {to_version}, the nodes before it {target}"
        entry = {**mine, "to_version": to_version, "message": message[:500]}
        await self._end_turn(update, entry, None if ok else message, to_version)

    def _updater_outcome(self, request_id: str) -> tuple[str, str | None, str] | None:
        """(state, installed or offered version, message) from the spool's status.json and
        the node's update history, once the updater finished this request; else None."""
        status = update_spool.read_status(update_spool.spool_dir(self.data_dir))
        if status is None or status.get("id") != request_id or status.get("state") not in FINAL:
            return None
        to_version = status.get("to_version")
        if to_version is None:  # a refusal after reading the manifest: the history has it
            for row in update_history.read_only(self.db_path, 20):
                if row.get("request_id") == request_id:
                    to_version = row.get("to_version")
                    break
        return str(status["state"]), to_version, str(status.get("message") or "")

    async def _end_turn(
        self,
        update: dict[str, Any],
        entry: dict[str, Any],
        error: str | None,
        to_version: str | None = None,
    ) -> None:
        """Done (next node, or the whole update) or failed (the whole update stops)."""
        others = [n for n in update["plan"] if n != self.node]
        last = all(update["nodes"].get(n, {}).get("state") == "done" for n in others)
        state = "failed" if error else "done" if last else "running"
        entry = {**entry, "state": "failed" if error else "done", "finished": time.time()}
        if error:
            log.warning("cluster update %s failed on this node: %s", update["id"], error)
        args = (state, error, state, state, to_version, self.node, json.dumps(entry))
        await self._write(
            "UPDATE cluster_updates SET state = ?, error = ?, turn_until = NULL,"
            " current_node = CASE WHEN ? = 'failed' THEN current_node END,"  # who failed
            " finished = CASE WHEN ? <> 'running' THEN cluster_now() END,"
            " target_version = coalesce(target_version, ?),"
            " nodes = nodes || jsonb_build_object(?::text, ?::jsonb)"
            " WHERE id = ? AND state = 'running' AND current_node = ?",
            (*args, update["id"], self.node),
        )
        await self._serve()

    async def _serve(self) -> None:
        self.state = "serving"
        self.claim_jobs(True)
        await self._beat()

    # --- the admin panel ----------------------------------------------------------------------
    async def create(
        self, source: str, drain_seconds: float, bundle: Path | None = None
    ) -> dict[str, Any]:
        """A new rolling update over the nodes alive now (ClusterUpdateRunning if one runs):
        to the release at the URL `source`, or to the uploaded `bundle` file (`source` is then
        its name, for people)."""
        if bundle is None:
            source = update_spool.check_url(source)
        await self._beat()
        if await self.running() is not None:
            raise ClusterUpdateRunning("a cluster update is running: wait for it")
        plan = [
            row["node"]
            for row in await self._fetch(
                "SELECT node FROM cluster_nodes WHERE last_seen > cluster_now() - ?"
                " ORDER BY hostname, node",
                (self.timing.node_stale,),
            )
        ]
        update_id = update_spool.new_id()
        row = (update_id, self.node, source, bundle is not None, drain_seconds, json.dumps(plan))
        try:
            await self._insert(row, bundle)
        except psycopg.errors.UniqueViolation:  # another admin, on another node, just now
            raise ClusterUpdateRunning("a cluster update is running: wait for it") from None
        log.info("cluster update %s to %s over %s", update_id, source, ", ".join(plan))
        rows = await self._fetch("SELECT * FROM cluster_updates WHERE id = ?", (update_id,))
        return dict(rows[0])

    async def _insert(self, row: tuple[Any, ...], bundle: Path | None) -> None:
        """The update's row and its bundle in one transaction, on a connection of its own: no
        node sees the update before all of the release, and no other component's statement
        lands in the transaction while the chunks go in."""
        async with (
            await psycopg.AsyncConnection.connect(self.db.conn.url, connect_timeout=10) as conn,
            conn.transaction(),
        ):
            await conn.execute(
                "INSERT INTO cluster_updates"
                " (id, created, requested_on, source, bundle, drain_seconds, state, plan)"
                " VALUES (%s, cluster_now(), %s, %s, %s, %s, 'running', %s::jsonb)",
                row,
            )
            if bundle is None:
                return
            with bundle.open("rb") as upload:
                chunk = 0
                while data := await asyncio.to_thread(upload.read, BUNDLE_CHUNK):
                    await conn.execute(
                        "INSERT INTO cluster_update_bundles (update_id, chunk, data)"
                        " VALUES (%s, %s, %s)",
                        (row[0], chunk, data),
                    )
                    chunk += 1

    async def describe(self) -> dict[str, Any]:
        """The nodes (alive or not) and the latest cluster update, for the Updates page."""
        nodes = await self._fetch(
            "SELECT node, hostname, version, state, last_seen, cluster_now() - last_seen AS age"
            " FROM cluster_nodes ORDER BY hostname, node",
            (),
        )
        latest = await self._fetch("SELECT * FROM cluster_updates ORDER BY created DESC LIMIT 1")
        return {
            "node": self.node,
            "nodes": [
                {**dict(n), "alive": n["age"] < self.timing.node_stale, "age": round(n["age"], 1)}
                for n in nodes
            ],
            "update": dict(latest[0]) if latest else None,
        }

    # --- statements ---------------------------------------------------------------------------
    async def running(self) -> dict[str, Any] | None:
        """The rolling update under way, if one is."""
        rows = await self._fetch(
            "SELECT *, turn_until < cluster_now() AS overdue"
            " FROM cluster_updates WHERE state = 'running'"
        )
        return dict(rows[0]) if rows else None

    async def _fetch(self, query: str, args: tuple[Any, ...] | None = None) -> list[Any]:
        async with self.db.conn.execute(query, args) as cur:
            return list(await cur.fetchall())

    async def _write(self, query: str, args: tuple[Any, ...]) -> int:
        """One statement, committed; the rows it changed."""
        async with self.db.conn.execute(query, args) as cur:
            count = cur.rowcount
        await self.db.conn.commit()
        return count


def of_app(extensions: Mapping[str, Any]) -> ClusterUpdates | None:
    """The running node's `ClusterUpdates` (from `app.extensions`); None on SQLite."""
    found = extensions.get(CLUSTER)
    return found if isinstance(found, ClusterUpdates) else None
