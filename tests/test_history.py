"""History store on both backends, a real SQLite file and a real PostgreSQL server: migrations,
search, retention, revisions, and PostgreSQL's concurrent editors."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from appliance.core import history as module
from appliance.core.db import POSTGRESQL, SQLITE, AnyDatabase, Database, open_database
from appliance.core.engines.base import Segment, Transcript, Word
from appliance.core.history import History, RevisionConflict, SearchError
from tests.pgserver import PgServer


def transcript(text: str) -> Transcript:
    segment = Segment(0, 0.0, 1.5, text, (Word(0.0, 0.5, text.split()[0], 0.9),))
    return Transcript(text, [segment], "en", 1.5)


def edit(text: str) -> list[dict[str, object]]:
    return [{"id": 0, "start": 0.0, "end": 1.0, "text": f" {text}"}]


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server = PgServer.start()
    yield server
    server.stop()


@pytest.fixture(params=[SQLITE, POSTGRESQL])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AnyDatabase]:
    """An open, empty database of each backend (PostgreSQL: a new database on the module's
    server, started only when a test asks for it)."""
    url = request.getfixturevalue("pg").new_database() if request.param == POSTGRESQL else ""
    database = await open_database(url, tmp_path / "history.db")
    assert database.dialect == request.param
    yield database
    await database.close()


@pytest.fixture
async def history(db: AnyDatabase) -> History:
    store = History(db)
    await store.migrate()
    return store


async def test_migrations_and_roundtrip(db: AnyDatabase) -> None:
    history = History(db)
    await history.migrate()
    await history.migrate()  # idempotent
    before = time.time()
    entry_id = await history.add(
        transcript("hello brave new world"),
        source="live",
        model="tiny.en",
        filename="a.wav",
        timings={"rtf": 9.5},
    )
    entry = await history.get(entry_id)
    assert entry is not None
    assert entry["source"] == "live"
    assert entry["duration"] == 1.5 and entry["revision"] == 0
    assert before <= entry["created"] <= time.time()  # full precision (not a 4-byte REAL)
    assert entry["segments"][0]["words"][0]["word"] == "hello"
    assert entry["timings"] == {"rtf": 9.5}
    assert entry["speakers"] == {}
    back = await history.transcript(entry_id)
    assert back is not None and back.segments[0].words[0].probability == 0.9
    assert await history.get("missing") is None


@pytest.mark.sqlite_only
async def test_sqlite_file_is_wal_and_owner_only(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    await History(db).migrate()
    async with db.conn.execute("PRAGMA journal_mode") as cur:
        assert (await cur.fetchone())[0] == "wal"
    assert (tmp_path / "a.db").stat().st_mode & 0o777 == 0o600
    await db.close()


async def test_newer_schema_is_refused(db: AnyDatabase) -> None:
    await db.migrate("history", ["CREATE TABLE x(a INTEGER)", "CREATE TABLE y(a INTEGER)"])
    with pytest.raises(RuntimeError, match="newer than this release"):
        await db.migrate("history", ["CREATE TABLE x(a INTEGER)"])


async def test_readiness_probe_sees_a_database_it_cannot_write(db: AnyDatabase) -> None:
    """`writable` (the /health probe) is false, not an error, on either backend."""
    read_only, writable = (
        ("PRAGMA query_only = ON", "PRAGMA query_only = OFF")
        if db.dialect == "sqlite"
        else ("SET default_transaction_read_only = on", "SET default_transaction_read_only = off")
    )
    assert await db.writable()
    await db.conn.execute(read_only)
    await db.conn.commit()
    assert not await db.writable()
    await db.conn.execute(writable)
    await db.conn.commit()
    assert await db.writable()


@pytest.mark.parametrize(
    ("query", "found"),
    [
        ("quick", ["quicksilver moves", "the quick brown fox"]),
        ("QUICK Brown", ["the quick brown fox"]),
        ("brown fox", ["the quick brown fox"]),
        ("fox brown", ["the quick brown fox"]),  # every term, in any order
        ("brown-fox", ["the quick brown fox"]),  # punctuation inside a term: a phrase
        ("fox-brown", []),
        ("brown fo", ["the quick brown fox"]),  # the last word is a prefix
        ("bro fox", []),  # the others are not
        ("bro-fox", []),
        ("brown-fo", ["the quick brown fox"]),
        ("sleep", ["lazy dogs sleep"]),
        ("dog", ["lazy dogs sleep"]),
        ("dog lazy", []),
        ("quick !!", ["the quick brown fox"]),  # punctuation only: ignored, and no prefix
        ("notes.txt", ["lazy dogs sleep"]),  # file names are searched too
        ("notes", ["lazy dogs sleep"]),
        ("txt", ["lazy dogs sleep"]),
        ("notes txt", ["lazy dogs sleep"]),
        ("it's", ["it's snake_case"]),
        ("snake", ["it's snake_case"]),
        ("case", ["it's snake_case"]),
        ("2024 01", ["quicksilver moves"]),
        ("2024-01-05", ["quicksilver moves"]),
    ],
)
async def test_search_semantics(history: History, query: str, found: list[str]) -> None:
    """What FTS5 does on SQLite, PostgreSQL's search does the same for these."""
    await history.add(transcript("the quick brown fox"), source="api", model="m")
    await history.add(
        transcript("lazy dogs sleep"), source="upload", model="m", filename="notes.txt"
    )
    await history.add(
        transcript("quicksilver moves"), source="api", model="m", filename="2024-01-05.wav"
    )
    await history.add(transcript("it's snake_case"), source="api", model="m")
    items, total = await history.list(query)
    assert sorted(i["text"] for i in items) == found
    assert total == len(found)


HOSTILE = [
    '"',
    "'",
    "''",
    "*",
    ":*",
    "&|!():*",
    "!quick",
    "a & b | !c",
    "<->",
    "<2>",
    "-",
    "OR",
    "NEAR(",
    "NEAR(a b)",
    "'; DROP TABLE transcripts; --",
    "\\",
    "\\'",
    "a\\",
    "\x00",
    "quick\x00",
    "\ud800",
    "quick\udfff",
    "\x1b[31m",
    "a" * 500,
    "a" * 3000,  # longer than a PostgreSQL lexeme may be
    "a" * 10_000,
    "x " * 5_000,
    "&|" * 5_000,
    " ".join(f"x{i}" for i in range(20_000)),  # too deep a tsquery for PostgreSQL's stack
    "«»",
    "é",
]


async def test_hostile_searches_give_results_or_a_search_error(history: History) -> None:
    for text in ("the quick brown fox", "lazy dogs sleep", "quicksilver moves"):
        await history.add(transcript(text), source="api", model="m")
    for hostile in HOSTILE:
        try:
            items, total = await history.list(hostile)
        except SearchError:
            continue
        assert len(items) == total, hostile
        if hostile in ("\x00", "\ud800"):  # nothing searchable: no search
            assert total == 3
        elif "quick" not in hostile:
            assert total == 0, hostile
    # operators are literal characters around a term, never query syntax
    for query in ("!quick", "(quick)", "quick:*", "quick\\", "'quick'", '"quick"', "quick\x00"):
        assert (await history.list(query))[1] == 2, query
    assert (await history.list(""))[1] == 3  # the connection is still fine


async def test_retention_by_rows_and_age(db: AnyDatabase) -> None:
    history = History(db, max_rows=2)
    await history.migrate()
    for i in range(4):
        await history.add(transcript(f"entry number {i}"), source="api", model="m")
    items, total = await history.list()
    assert total == 2
    assert [i["text"] for i in items] == ["entry number 3", "entry number 2"]
    await db.conn.execute("UPDATE transcripts SET created = ?", (time.time() - 40 * 86400,))
    await db.conn.commit()
    aged = History(db, retention_days=30)
    assert await aged.apply_retention() == 2
    assert (await aged.list())[1] == 0


async def test_revisions_keep_the_original_and_follow_edits(history: History) -> None:
    entry_id = await history.add(transcript("the lazy dog"), source="api", model="m")
    assert await history.save_revision(entry_id, 0, edit("a zebra"), {"S1": "Ann"}) == 1
    with pytest.raises(RevisionConflict) as conflict:  # a second editor of revision 0
        await history.save_revision(entry_id, 0, edit("a tiger"), {})
    assert conflict.value.current == 1
    assert await history.save_revision("missing", 0, edit("x"), {}) is None
    entry = await history.get(entry_id)
    assert entry is not None
    assert (entry["text"], entry["revision"], entry["speakers"]) == ("a zebra", 1, {"S1": "Ann"})
    assert (await history.list("zebra"))[1] == 1 and (await history.list("lazy"))[1] == 0
    revisions = await history.revisions(entry_id)
    assert revisions is not None
    assert [(r["revision"], r["note"], r["chars"], r["segment_count"]) for r in revisions] == [
        (0, "original", 12, 1),
        (1, "edit", 7, 1),
    ]
    with pytest.raises(RevisionConflict):
        await history.restore(entry_id, 0, base_revision=0)
    assert await history.restore(entry_id, 0, base_revision=1) == 2
    assert (await history.list("lazy"))[1] == 1 and (await history.list("zebra"))[1] == 0
    restored = await history.revision(entry_id, 2)
    assert restored is not None and restored["note"] == "restored 0"
    assert await history.delete(entry_id)
    async with history.db.conn.execute("SELECT count(*) FROM transcript_revisions") as cur:
        assert (await cur.fetchone())[0] == 0  # revisions go with their entry
    assert not await history.delete(entry_id)


async def test_a_text_too_large_for_one_tsvector_is_kept_and_searchable(
    history: History,
) -> None:
    """About 1 MB of distinct words passes the 1 MB a PostgreSQL tsvector holds: the entry and
    its edits are stored all the same, searchable in their first 100,000 characters."""
    words = " ".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(16_000))
    huge = f"beginning {words} ending"
    entry_id = await history.add(transcript(huge), source="api", model="m", filename="big.wav")
    entry = await history.get(entry_id)
    assert entry is not None and entry["text"] == huge
    assert (await history.list("beginning"))[1] == 1
    assert (await history.list("big.wav"))[1] == 1
    assert await history.save_revision(entry_id, 0, edit(f"edited {words}"), {}) == 1
    assert (await history.list("edited"))[1] == 1 and (await history.list("beginning"))[1] == 0


async def _lock_waiters(conn: psycopg.AsyncConnection[tuple[Any, ...]], count: int) -> None:
    """Until `count` statements of other connections wait for a lock."""
    for _ in range(400):
        cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
        row = await cur.fetchone()
        if row is not None and row[0] >= count:
            return
        await asyncio.sleep(0.025)
    pytest.fail(f"fewer than {count} statements wait for a lock")


async def test_two_editors_of_one_revision_at_once_on_postgresql(
    pg: PgServer, tmp_path: Path
) -> None:
    """Two nodes save an edit of revision 0 in the same instant, both having read revision 0:
    one wins, the other gets RevisionConflict (not a unique violation, not a lost edit)."""
    url = pg.new_database()
    dbs = [await open_database(url, tmp_path / "unused.db") for _ in range(2)]
    first, second = (History(db) for db in dbs)
    await first.migrate()
    entry_id = await first.add(transcript("the lazy dog"), source="api", model="m")
    async with await psycopg.AsyncConnection.connect(url) as holder:
        # the entry's row locked: both edits start, read revision 0, and wait
        await holder.execute("SELECT 1 FROM transcripts WHERE id = %s FOR UPDATE", (entry_id,))
        edits = [
            asyncio.ensure_future(store.save_revision(entry_id, 0, edit(text), {}))
            for store, text in ((first, "one"), (second, "two"))
        ]
        await _lock_waiters(holder, 2)
        await holder.rollback()
    results = await asyncio.gather(*edits, return_exceptions=True)
    assert 1 in results, results
    conflict = next(r for r in results if r != 1)
    assert isinstance(conflict, RevisionConflict) and conflict.current == 1, results
    revisions = await first.revisions(entry_id)
    assert revisions is not None and [r["revision"] for r in revisions] == [0, 1]
    for db in dbs:
        await db.close()


async def test_an_edit_of_an_entry_deleted_meanwhile_on_postgresql(
    pg: PgServer, tmp_path: Path
) -> None:
    """An edit waiting for an entry that another node deletes: None (as for an unknown
    entry), and no revisions left behind without their entry."""
    url = pg.new_database()
    db = await open_database(url, tmp_path / "unused.db")
    history = History(db)
    await history.migrate()
    entry_id = await history.add(transcript("the lazy dog"), source="api", model="m")
    async with await psycopg.AsyncConnection.connect(url) as holder:
        await holder.execute("DELETE FROM transcripts WHERE id = %s", (entry_id,))
        saving = asyncio.ensure_future(history.save_revision(entry_id, 0, edit("x"), {}))
        await _lock_waiters(holder, 1)
        await holder.commit()
    assert await saving is None
    async with db.conn.execute("SELECT count(*) FROM transcript_revisions") as cur:
        assert (await cur.fetchone())[0] == 0
    await db.close()


@pytest.mark.sqlite_only
async def test_rebuilt_tables_carry_the_shared_trigger_definitions(tmp_path: Path) -> None:
    """Versions 2 and 4 rebuild `transcripts` and create its triggers again from the same
    constants as versions 1 and 3: after every migration the triggers in the schema are exactly
    those definitions, statement for statement (each one stored once in sqlite_master)."""
    expected = {
        match.group(1): match.group(0)
        for match in re.finditer(
            r"CREATE TRIGGER (\w+).*?END", module._FTS_TRIGGERS + module._EDIT_TRIGGERS, re.S
        )
    }
    assert len(expected) == 6
    for version in range(1, len(module.MIGRATIONS) + 1):
        db = await Database.open(tmp_path / f"v{version}.db")
        await db.migrate("history", module.MIGRATIONS[:version])
        async with db.conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name IN "
            "('transcripts', 'transcript_revisions')"
        ) as cur:
            triggers = dict(await cur.fetchall())
        await db.close()
        names = {"transcripts_ai", "transcripts_ad"}
        if version >= 3:
            names |= set(expected) - names
        assert set(triggers) == names, version
        for name in names:
            assert triggers[name] == expected[name], (version, name)
