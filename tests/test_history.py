"""History store on a real SQLite file: migrations, FTS search, retention."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.core.db import Database
from appliance.core.engines.base import Segment, Transcript, Word
from appliance.core.history import History


def transcript(text: str) -> Transcript:
    segment = Segment(0, 0.0, 1.5, text, (Word(0.0, 0.5, text.split()[0], 0.9),))
    return Transcript(text, [segment], "en", 1.5)


async def test_migrations_wal_and_roundtrip(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "a.db")
    history = History(db)
    await history.migrate()
    await history.migrate()  # idempotent
    async with db.conn.execute("PRAGMA journal_mode") as cur:
        assert (await cur.fetchone())[0] == "wal"
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
    assert entry["segments"][0]["words"][0]["word"] == "hello"
    assert entry["timings"] == {"rtf": 9.5}
    back = await history.transcript(entry_id)
    assert back is not None and back.segments[0].words[0].probability == 0.9
    assert (tmp_path / "a.db").stat().st_mode & 0o777 == 0o600
    await db.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "b.db")
    await db.migrate("history", ["CREATE TABLE x(a)", "CREATE TABLE y(a)"])
    with pytest.raises(RuntimeError, match="newer than this release"):
        await db.migrate("history", ["CREATE TABLE x(a)"])
    await db.close()


async def test_search_is_safe_and_prefix_matches(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "c.db")
    history = History(db)
    await history.migrate()
    for text in ("the quick brown fox", "lazy dogs sleep", "quicksilver moves"):
        await history.add(transcript(text), source="api", model="m")
    items, total = await history.list("quick")
    assert total == 2
    items, total = await history.list("brown fox")
    assert [i["text"] for i in items] == ["the quick brown fox"]
    for hostile in ('"', "*", "OR", "NEAR(", "'; DROP TABLE transcripts; --", "a" * 500):
        items, total = await history.list(hostile)
        assert total == 0
    _items, total = await history.list("")
    assert total == 3
    assert await history.delete(items[0]["id"] if items else "missing") is False
    await db.close()


async def test_retention_by_rows_and_age(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "d.db")
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
    await db.close()


async def test_rebuilt_tables_carry_the_shared_trigger_definitions(tmp_path: Path) -> None:
    """Versions 2 and 4 rebuild `transcripts` and create its triggers again from the same
    constants as versions 1 and 3: after every migration the triggers in the schema are exactly
    those definitions, statement for statement (each one stored once in sqlite_master)."""
    import re

    from appliance.core import history as module

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
