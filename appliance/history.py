"""Transcription history in SQLite: every finished upload, API call and live session.

FTS5 indexes the text and file name for search; retention (days, max rows) is applied after
each insert and at start.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import uuid
from dataclasses import asdict
from typing import Any

from appliance.db import Database
from appliance.engines.base import Segment, Transcript, Word

MIGRATIONS = [
    """
    CREATE TABLE transcripts (
        id TEXT NOT NULL UNIQUE,
        created REAL NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('upload', 'api', 'live')),
        filename TEXT NOT NULL DEFAULT '',
        duration REAL NOT NULL DEFAULT 0,
        model TEXT NOT NULL,
        language TEXT NOT NULL DEFAULT '',
        task TEXT NOT NULL DEFAULT 'transcribe',
        text TEXT NOT NULL,
        segments TEXT NOT NULL DEFAULT '[]',
        timings TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX transcripts_created ON transcripts(created);
    CREATE VIRTUAL TABLE transcripts_fts USING fts5(
        text, filename, content='transcripts', content_rowid='rowid'
    );
    CREATE TRIGGER transcripts_ai AFTER INSERT ON transcripts BEGIN
        INSERT INTO transcripts_fts(rowid, text, filename)
        VALUES (new.rowid, new.text, new.filename);
    END;
    CREATE TRIGGER transcripts_ad AFTER DELETE ON transcripts BEGIN
        INSERT INTO transcripts_fts(transcripts_fts, rowid, text, filename)
        VALUES ('delete', old.rowid, old.text, old.filename);
    END;
    """,
    # issue 14: transcripts also come from /asr (whisper-asr-webservice API), Wyoming and the
    # OpenAI Realtime API. SQLite cannot alter a CHECK: the table is rebuilt (rowids kept,
    # so the FTS index stays valid; DROP TABLE fires no triggers).
    """
    CREATE TABLE transcripts_v2 (
        id TEXT NOT NULL UNIQUE,
        created REAL NOT NULL,
        source TEXT NOT NULL
            CHECK (source IN ('upload', 'api', 'live', 'asr', 'wyoming', 'realtime')),
        filename TEXT NOT NULL DEFAULT '',
        duration REAL NOT NULL DEFAULT 0,
        model TEXT NOT NULL,
        language TEXT NOT NULL DEFAULT '',
        task TEXT NOT NULL DEFAULT 'transcribe',
        text TEXT NOT NULL,
        segments TEXT NOT NULL DEFAULT '[]',
        timings TEXT NOT NULL DEFAULT '{}'
    );
    INSERT INTO transcripts_v2 (rowid, id, created, source, filename, duration, model, language,
        task, text, segments, timings)
    SELECT rowid, id, created, source, filename, duration, model, language, task, text,
        segments, timings FROM transcripts;
    DROP TABLE transcripts;
    ALTER TABLE transcripts_v2 RENAME TO transcripts;
    CREATE INDEX transcripts_created ON transcripts(created);
    CREATE TRIGGER transcripts_ai AFTER INSERT ON transcripts BEGIN
        INSERT INTO transcripts_fts(rowid, text, filename)
        VALUES (new.rowid, new.text, new.filename);
    END;
    CREATE TRIGGER transcripts_ad AFTER DELETE ON transcripts BEGIN
        INSERT INTO transcripts_fts(transcripts_fts, rowid, text, filename)
        VALUES ('delete', old.rowid, old.text, old.filename);
    END;
    """,
]

_COLUMNS = "id, created, source, filename, duration, model, language, task, text"


def segments_to_json(segments: list[Segment]) -> str:
    return json.dumps([asdict(s) for s in segments])


def segments_from_json(data: str) -> list[Segment]:
    out = []
    for raw in json.loads(data):
        words = tuple(Word(**w) for w in raw.pop("words", ()))
        raw["tokens"] = tuple(raw.get("tokens", ()))
        out.append(Segment(words=words, **raw))
    return out


# Control characters (NUL ends an FTS5 string early) and lone surrogates (not encodable as
# UTF-8): never part of a search term, so they separate terms.
_NOT_SEARCHABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class SearchError(ValueError):
    """The search text could not be run as a full-text query."""


def _fts_query(q: str) -> str:
    """Quote each term so user input can never be FTS5 syntax; prefix-match the last one."""
    q = _NOT_SEARCHABLE.sub(" ", q)
    terms = [t.replace('"', '""') for t in q.split() if t.strip()]
    if not terms:
        return ""
    quoted = [f'"{t}"' for t in terms]
    quoted[-1] += "*"
    return " ".join(quoted)


class History:
    def __init__(self, db: Database, retention_days: int = 0, max_rows: int = 0) -> None:
        self.db = db
        self.retention_days = retention_days
        self.max_rows = max_rows

    async def migrate(self) -> None:
        await self.db.migrate("history", MIGRATIONS)
        await self.apply_retention()

    async def add(
        self,
        transcript: Transcript,
        *,
        source: str,
        model: str,
        filename: str = "",
        task: str = "transcribe",
        timings: dict[str, float] | None = None,
    ) -> str:
        entry_id = uuid.uuid4().hex
        await self.db.conn.execute(
            "INSERT INTO transcripts (id, created, source, filename, duration, model, language,"
            " task, text, segments, timings) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry_id,
                time.time(),
                source,
                filename,
                transcript.duration,
                model,
                transcript.language,
                task,
                transcript.text,
                segments_to_json(transcript.segments),
                json.dumps(timings or {}),
            ),
        )
        await self.db.conn.commit()
        await self.apply_retention()
        return entry_id

    async def list(
        self, q: str = "", limit: int = 20, offset: int = 0
    ) -> tuple[list[dict[str, Any]], int]:
        match = _fts_query(q)
        if match:
            where = (
                "WHERE rowid IN (SELECT rowid FROM transcripts_fts WHERE transcripts_fts MATCH ?)"
            )
            args: tuple[Any, ...] = (match,)
        else:
            where, args = "", ()
        try:
            async with self.db.conn.execute(
                f"SELECT count(*) FROM transcripts {where}",  # noqa: S608
                args,
            ) as cur:
                row = await cur.fetchone()
        except (sqlite3.OperationalError, UnicodeError) as exc:
            if not match:
                raise
            raise SearchError(f"cannot search for {q!r}: {exc}") from None
        total = int(row[0]) if row else 0
        async with self.db.conn.execute(
            f"SELECT {_COLUMNS} FROM transcripts {where} ORDER BY created DESC LIMIT ? OFFSET ?",  # noqa: S608
            (*args, limit, offset),
        ) as cur:
            rows = [dict(r) for r in await cur.fetchall()]
        return rows, total

    async def get(self, entry_id: str) -> dict[str, Any] | None:
        async with self.db.conn.execute(
            f"SELECT {_COLUMNS}, segments, timings FROM transcripts WHERE id = ?",  # noqa: S608
            (entry_id,),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        entry = dict(row)
        entry["segments"] = json.loads(entry["segments"])
        entry["timings"] = json.loads(entry["timings"])
        return entry

    async def transcript(self, entry_id: str) -> Transcript | None:
        async with self.db.conn.execute(
            "SELECT text, segments, language, duration FROM transcripts WHERE id = ?", (entry_id,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return Transcript(row[0], segments_from_json(row[1]), row[2], row[3])

    async def delete(self, entry_id: str) -> bool:
        cur = await self.db.conn.execute("DELETE FROM transcripts WHERE id = ?", (entry_id,))
        await self.db.conn.commit()
        return cur.rowcount > 0

    async def apply_retention(self) -> int:
        removed = 0
        if self.retention_days:
            cutoff = time.time() - self.retention_days * 86400
            cur = await self.db.conn.execute("DELETE FROM transcripts WHERE created < ?", (cutoff,))
            removed += cur.rowcount
        if self.max_rows:
            cur = await self.db.conn.execute(
                "DELETE FROM transcripts WHERE rowid NOT IN "
                "(SELECT rowid FROM transcripts ORDER BY created DESC LIMIT ?)",
                (self.max_rows,),
            )
            removed += cur.rowcount
        if removed:
            await self.db.conn.commit()
        return removed
