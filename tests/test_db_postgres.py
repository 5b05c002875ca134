"""The PostgreSQL side of the database layer (`appliance.core.db`) on a real server: the `?` to
`%s` translation, rows like `sqlite3.Row`, no connection left idle in a transaction, recovery
from a failed statement and from a server restart, migrations under the advisory lock when
nodes start together, and start-up errors that never show the password."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest

from appliance.core.db import PostgresDatabase, StartupError, open_database, to_pyformat
from tests.pgserver import PgServer, _as_postgres, pg_binary

ITEMS = {"postgresql": ["CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"]}


@pytest.fixture(scope="module")
def server() -> Iterator[PgServer]:
    pg = PgServer.start()
    yield pg
    pg.stop()


@pytest.fixture
async def db(server: PgServer, tmp_path: Path) -> AsyncIterator[PostgresDatabase]:
    database = await open_database(server.new_database(), tmp_path / "unused.db")
    assert isinstance(database, PostgresDatabase)
    await database.migrate("items", ITEMS)
    yield database
    await database.close()


async def backend_state(server: PgServer, db: PostgresDatabase) -> str:
    """What the server sees the appliance's connection doing (`idle`, `idle in transaction`)."""
    pid = db.conn.raw.info.backend_pid
    async with await psycopg.AsyncConnection.connect(server.url(), autocommit=True) as admin:
        cur = await admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = await cur.fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("SELECT ? , ?", "SELECT %s , %s"),
        ("SELECT '?' , ?", "SELECT '?' , %s"),  # a ? in a string literal stays a character
        ("SELECT 'it''s ?', ?", "SELECT 'it''s ?', %s"),  # doubled quote inside
        ('SELECT "odd?name" FROM t WHERE a = ?', 'SELECT "odd?name" FROM t WHERE a = %s'),
        ("SELECT 5 % 2, ?", "SELECT 5 %% 2, %s"),
        ("SELECT '100%' WHERE a LIKE ?", "SELECT '100%%' WHERE a LIKE %s"),
        ("SELECT ? -- really?\n, ?", "SELECT %s -- really?\n, %s"),
        ("SELECT ? -- 50% off", "SELECT %s -- 50%% off"),
        ("SELECT 1 - ?", "SELECT 1 - %s"),  # one minus is no comment
    ],
)
def test_to_pyformat(query: str, expected: str) -> None:
    assert to_pyformat(query) == expected


async def test_placeholders_percent_and_comments_reach_the_server_intact(
    db: PostgresDatabase,
) -> None:
    cur = await db.conn.execute(
        "SELECT '?' AS q, '100%' AS pct, ? || '%' AS arg, 7 % 4 AS m -- a ? and a %\n",
        ("50",),
    )
    assert tuple(await cur.fetchall()) == (("?", "100%", "50%", 3),)
    # no parameters: the text goes as it is
    cur = await db.conn.execute("SELECT '?%' AS raw")
    assert (await cur.fetchone()) == ("?%",)


async def test_rows_read_by_index_name_and_as_dict(db: PostgresDatabase) -> None:
    await db.conn.execute("INSERT INTO item(id, name) VALUES (?, ?), (?, ?)", (1, "a", 2, "b"))
    await db.conn.commit()
    async with db.conn.execute("SELECT id, name FROM item ORDER BY id") as cur:
        rows = await cur.fetchall()
    assert [(r[0], r["name"]) for r in rows] == [(1, "a"), (2, "b")]
    assert dict(rows[0]) == {"id": 1, "name": "a"} and rows[1].keys() == ["id", "name"]
    id_, name = rows[1]
    assert (id_, name) == (2, "b")
    with pytest.raises(IndexError, match="no such column: nope"):
        rows[0]["nope"]
    assert [tuple(r) async for r in await db.conn.execute("SELECT id FROM item")] == [(1,), (2,)]


async def test_rowcount(db: PostgresDatabase) -> None:
    cur = await db.conn.execute("INSERT INTO item(id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    assert cur.rowcount == 3
    cur = await db.conn.execute("UPDATE item SET name = ? WHERE id >= ?", ("x", 2))
    assert cur.rowcount == 2
    cur = await db.conn.execute("DELETE FROM item WHERE id = ?", (99,))
    assert cur.rowcount == 0
    await db.conn.commit()


async def test_a_read_outside_a_transaction_leaves_the_connection_idle(
    server: PgServer, db: PostgresDatabase
) -> None:
    async with db.conn.execute("SELECT count(*) FROM item") as cur:
        assert (await cur.fetchone()) == (0,)
    assert await backend_state(server, db) == "idle"
    # a write opens a transaction that only commit ends (as with sqlite3), and a read inside
    # it does not end it
    await db.conn.execute("INSERT INTO item(id, name) VALUES (1, 'a')")
    await db.conn.execute("SELECT count(*) FROM item")
    assert await backend_state(server, db) == "idle in transaction"
    await db.conn.commit()
    assert await backend_state(server, db) == "idle"


async def test_a_failed_statement_rolls_back_and_the_connection_keeps_working(
    server: PgServer, db: PostgresDatabase
) -> None:
    await db.conn.execute("INSERT INTO item(id, name) VALUES (1, 'a')")
    await db.conn.commit()
    with pytest.raises(psycopg.errors.UniqueViolation):  # the first of its transaction
        await db.conn.execute("INSERT INTO item(id, name) VALUES (1, 'again')")
    assert await backend_state(server, db) == "idle"  # not "idle in transaction (aborted)"
    await db.conn.execute("INSERT INTO item(id, name) VALUES (2, 'b')")
    await db.conn.commit()
    # a failure after other writes: PostgreSQL aborts the whole transaction, and the commit
    # says so (with SQLite the earlier writes would have stayed)
    await db.conn.execute("INSERT INTO item(id, name) VALUES (3, 'c')")
    with pytest.raises(psycopg.errors.UniqueViolation):
        await db.conn.execute("INSERT INTO item(id, name) VALUES (1, 'again')")
    await db.conn.execute("INSERT INTO item(id, name) VALUES (4, 'd')")
    with pytest.raises(psycopg.OperationalError, match="nothing was committed"):
        await db.conn.commit()
    await db.conn.execute("INSERT INTO item(id, name) VALUES (5, 'e')")
    await db.conn.commit()
    cur = await db.conn.execute("SELECT id FROM item ORDER BY id")
    assert [r[0] for r in await cur.fetchall()] == [1, 2, 5]


async def test_the_connection_comes_back_after_a_server_restart(
    server: PgServer, db: PostgresDatabase
) -> None:
    await db.conn.execute("INSERT INTO item(id, name) VALUES (1, 'a')")
    await db.conn.commit()
    before = db.conn.raw.info.backend_pid
    subprocess.run(
        [*_as_postgres(), pg_binary("pg_ctl"), "-D", str(server.root / "data"), "-m", "fast",
         "-l", str(server.root / "server.log"), "-w", "-t", "60", "restart"],
        check=True, capture_output=True,
    )  # fmt: skip
    # the statement outside a transaction runs on a new connection, nothing lost in between
    cur = await db.conn.execute("SELECT name FROM item WHERE id = ?", (1,))
    assert (await cur.fetchone()) == ("a",)
    assert db.conn.raw.info.backend_pid != before
    await db.conn.execute("INSERT INTO item(id, name) VALUES (2, 'b')")
    await db.conn.commit()
    assert await db.writable()


async def test_a_break_inside_a_transaction_fails_the_statement(
    server: PgServer, db: PostgresDatabase
) -> None:
    """The transaction's earlier writes are gone with the connection: that is an error, never
    a silent new transaction that commits half of the work."""
    await db.conn.execute("INSERT INTO item(id, name) VALUES (1, 'a')")
    async with await psycopg.AsyncConnection.connect(server.url(), autocommit=True) as admin:
        pid = db.conn.raw.info.backend_pid
        await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        await db.conn.execute("INSERT INTO item(id, name) VALUES (2, 'b')")
    cur = await db.conn.execute("SELECT count(*) FROM item")
    assert (await cur.fetchone()) == (0,)


async def test_a_commit_after_the_connection_was_lost_fails(
    server: PgServer, db: PostgresDatabase
) -> None:
    """The write went with the connection: commit must say so, not return as if it was kept,
    also when another user of the shared connection met the break first."""
    for other_first in (False, True):
        await db.conn.execute("INSERT INTO item(id, name) VALUES (1, 'a')")
        async with await psycopg.AsyncConnection.connect(server.url(), autocommit=True) as admin:
            pid = db.conn.raw.info.backend_pid
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        if other_first:
            with pytest.raises(psycopg.OperationalError):
                await db.conn.execute("SELECT count(*) FROM item")
        with pytest.raises(psycopg.OperationalError):
            await db.conn.commit()
        await db.conn.commit()  # nothing pending any more: a no-op, as after a rollback
    cur = await db.conn.execute("SELECT count(*) FROM item")
    assert (await cur.fetchone()) == (0,)


async def test_nodes_starting_together_migrate_each_step_once(server: PgServer) -> None:
    url = server.new_database()
    steps = {
        "postgresql": [
            "CREATE TABLE log (step INTEGER)",
            "INSERT INTO log VALUES (2); SELECT pg_sleep(0.2)",  # a slow one
            "INSERT INTO log VALUES (3)",
        ]
    }

    async def node() -> int:
        database = await PostgresDatabase.open(url)
        try:
            return await database.migrate("shared", steps)
        finally:
            await database.close()

    # a CREATE TABLE without the advisory lock fails now and then when several start together
    assert await asyncio.gather(*(node() for _ in range(6))) == [3] * 6
    async with await psycopg.AsyncConnection.connect(url) as check:
        cur = await check.execute("SELECT step FROM log ORDER BY step")
        assert await cur.fetchall() == [(2,), (3,)]
        cur = await check.execute("SELECT version FROM schema_version WHERE component = 'shared'")
        assert await cur.fetchall() == [(3,)]


async def test_a_failed_migration_leaves_the_version_and_the_lock(db: PostgresDatabase) -> None:
    broken = {"postgresql": [*ITEMS["postgresql"], "ALTER TABLE item ADD COLUMN x NOT_A_TYPE"]}
    with pytest.raises(psycopg.errors.UndefinedObject):
        await db.migrate("items", broken)
    assert await db.migrate("items", ITEMS) == 1  # the lock is free again, version still 1
    cur = await db.conn.execute("SELECT version FROM schema_version WHERE component = 'items'")
    assert (await cur.fetchone()) == (1,)


async def test_a_database_newer_than_the_release_is_refused(db: PostgresDatabase) -> None:
    with pytest.raises(RuntimeError, match=r"'items' is version 1, newer than this release"):
        await db.migrate("items", {"postgresql": []})
    assert await db.migrate("items", ITEMS) == 1  # and the lock was given back


@pytest.mark.parametrize(
    ("url", "start"),
    [
        (
            "postgresql://whisper:Se%3Dcr3t-pw@/whisper?host={dir}&port=1",
            "cannot connect to postgresql://whisper@{dir}:1/whisper: ",
        ),
        # libpq quotes an unparsable URL whole in its own message
        (
            "postgresql://whisper:Se%3Dcr3t-pw@[::1/whisper",
            "DATABASE_URL is not a valid PostgreSQL URL",
        ),
    ],
)
async def test_an_unusable_url_stops_the_start_without_the_password(
    url: str, start: str, tmp_path: Path
) -> None:
    with pytest.raises(StartupError) as caught:
        await open_database(url.format(dir=tmp_path), tmp_path / "unused.db")
    message = str(caught.value)
    assert message.startswith(start.format(dir=tmp_path)), message
    assert "cr3t" not in message


async def test_a_refused_login_stops_the_start_without_the_password(
    server: PgServer, tmp_path: Path
) -> None:
    url = f"postgresql://whisper:Se%3Dcr3t-pw@/nosuchdb?host={server.socket_dir}&port={server.port}"
    with pytest.raises(StartupError) as caught:
        await open_database(url, tmp_path / "unused.db")
    message = str(caught.value)
    assert '"whisper"' in message and "cr3t" not in message  # the server's reason, no password
