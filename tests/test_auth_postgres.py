"""Auth on a shared PostgreSQL database as a cluster uses it: two `Auth` instances with their
own DATA_DIR and connection are two nodes. A session, an API key or its revocation made on one
holds on the other, and the signing secrets live in the database, not in either DATA_DIR."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.core import auth as auth_mod
from appliance.core.auth import Auth, reset_admin_password
from appliance.core.db import PostgresDatabase
from appliance.web import webhooks
from tests.pgserver import PgServer


@dataclass
class Node:
    db: PostgresDatabase
    data_dir: Path


@pytest.fixture
async def nodes(shared_pg: PgServer, tmp_path: Path) -> AsyncIterator[tuple[Node, Node]]:
    """Two nodes on one new database, neither started yet."""
    url = shared_pg.new_database()
    first, second = await PostgresDatabase.open(url), await PostgresDatabase.open(url)
    try:
        yield Node(first, tmp_path / "node1"), Node(second, tmp_path / "node2")
    finally:
        await first.close()
        await second.close()


async def start(*nodes: Node) -> list[Auth]:
    """Start the nodes together, as a cluster's nodes do after a deployment."""
    return list(await asyncio.gather(*(Auth.open(n.db, n.data_dir) for n in nodes)))


def password_files(*nodes: Node) -> list[Path]:
    return [p for n in nodes if (p := n.data_dir / auth_mod.PASSWORD_FILE).exists()]


async def test_a_session_made_on_one_node_holds_on_the_other(nodes: tuple[Node, Node]) -> None:
    one, two = await start(*nodes)
    cookie = await one.create_session("192.0.2.1")
    on_two = await two.session(cookie)
    assert on_two is not None
    # the CSRF token the page of node one carries is accepted by node two
    on_one = await one.session(cookie)
    assert on_one is not None and on_one.csrf == on_two.csrf
    assert two.check_csrf(on_two.csrf, on_one.csrf)
    # a logout on node two ends it on node one
    await two.end_session(on_two)
    assert await one.session(cookie) is None
    # neither node keeps a signing secret of its own
    assert not [n for n in nodes if (n.data_dir / auth_mod.SECRET_FILE).exists()]


async def test_api_keys_and_their_revocation_hold_on_every_node(
    nodes: tuple[Node, Node],
) -> None:
    one, two = await start(*nodes)
    row, key = await one.create_key("ci")
    assert await two.verify_key(key) == row["id"]
    assert [k["id"] for k in await two.list_keys()] == [row["id"]]
    assert await two.revoke_key(row["id"])
    assert await one.verify_key(key) is None
    assert await two.verify_key(key) is None
    assert not await one.revoke_key(row["id"])  # revoked once, by whichever node


async def test_first_start_of_two_nodes_stores_one_password(nodes: tuple[Node, Node]) -> None:
    one, two = await start(*nodes)
    (written,) = password_files(*nodes)  # only the node whose password was stored
    password = written.read_text().strip()
    assert await one.check_password(password)
    assert await two.check_password(password)
    assert one.secret == two.secret


async def test_the_webhook_secret_is_the_clusters(nodes: tuple[Node, Node]) -> None:
    await start(*nodes)
    secrets = [await webhooks.load_secret(n.db, n.data_dir) for n in nodes]
    assert secrets[0] == secrets[1] and len(secrets[0]) == 64
    assert not [n for n in nodes if (n.data_dir / webhooks.SECRET_FILE).exists()]
    # a distinct secret from the sessions' one
    async with nodes[0].db.conn.execute("SELECT count(DISTINCT value) FROM auth_secrets") as cur:
        assert (await cur.fetchone()) == (2,)


async def test_reset_admin_password_on_the_cluster(nodes: tuple[Node, Node]) -> None:
    one, two = await start(*nodes)
    (first,) = password_files(*nodes)
    old = first.read_text().strip()
    cookie = await two.create_session("192.0.2.2")
    # the command on node one, while the nodes run
    elsewhere = nodes[0].data_dir / "cli"
    sqlite_file = elsewhere / "appliance.db"
    path = await reset_admin_password(nodes[0].db.conn.url, sqlite_file, elsewhere)
    assert not sqlite_file.exists()  # the shared database was changed, not a local one
    new = path.read_text().strip()
    assert new != old
    assert await two.check_password(new) and not await two.check_password(old)
    assert await two.session(cookie) is None  # every node's sessions ended
    assert await one.check_password(new)


def test_reset_admin_password_says_when_the_database_is_unreachable(tmp_path: Path) -> None:
    url = f"postgresql://postgres@/whisper?host={tmp_path}&port=5432"  # no server there
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "reset-admin-password"],
        env={**os.environ, "DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("whisper-appliance: cannot connect to postgresql://")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / auth_mod.PASSWORD_FILE).exists()
