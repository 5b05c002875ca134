"""Transcription history in SQLite: every finished upload, API call and live session.

FTS5 indexes the text and file name for search; retention (days, max rows) is applied after
each insert and at start.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
import uuid
from dataclasses import asdict, fields
from typing import Any

from appliance.core.db import Database
from appliance.core.engines.base import Segment, Transcript, Word
from appliance.exceptions import ApplianceError

# The triggers that keep the FTS index in step with `transcripts` (version 1) and the editor's
# triggers (version 3). A table rebuild (versions 2 and 4) must create them again, with the
# same text: one definition each, so the rebuilt schema cannot drift from the original.
_FTS_TRIGGERS = """CREATE TRIGGER transcripts_ai AFTER INSERT ON transcripts BEGIN
        INSERT INTO transcripts_fts(rowid, text, filename)
        VALUES (new.rowid, new.text, new.filename);
    END;
    CREATE TRIGGER transcripts_ad AFTER DELETE ON transcripts BEGIN
        INSERT INTO transcripts_fts(transcripts_fts, rowid, text, filename)
        VALUES ('delete', old.rowid, old.text, old.filename);
    END;
    """
_EDIT_TRIGGERS = (
    "CREATE TRIGGER transcripts_au AFTER UPDATE OF text, filename ON transcripts BEGIN"
    """
        INSERT INTO transcripts_fts(transcripts_fts, rowid, text, filename)
        VALUES ('delete', old.rowid, old.text, old.filename);
        INSERT INTO transcripts_fts(rowid, text, filename)
        VALUES (new.rowid, new.text, new.filename);
    END;
    CREATE TRIGGER transcripts_ad_revisions AFTER DELETE ON transcripts BEGIN
        DELETE FROM transcript_revisions WHERE entry_id = old.id;
    END;
    CREATE TRIGGER transcript_revisions_original BEFORE INSERT ON transcript_revisions
    WHEN new.revision = 1 BEGIN
        INSERT OR IGNORE INTO transcript_revisions
            (entry_id, revision, created, note, text, segments, speakers)
        SELECT id, 0, created, 'original', text, segments, speakers
        FROM transcripts WHERE id = new.entry_id;
    END;
    CREATE TRIGGER transcript_revisions_latest AFTER INSERT ON transcript_revisions
    WHEN new.revision > 0 BEGIN
        UPDATE transcripts SET text = new.text, segments = new.segments,
            speakers = new.speakers, revision = new.revision
        WHERE id = new.entry_id;
    END;
    """
)


def _script(*parts: str) -> str:
    """One migration from its own statements and the shared trigger definitions."""
    return "".join(parts)


MIGRATIONS = [
    _script(
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
    """,
        _FTS_TRIGGERS,
    ),
    # issue 14: transcripts also come from /asr (whisper-asr-webservice API), Wyoming and the
    # OpenAI Realtime API. SQLite cannot alter a CHECK: the table is rebuilt (rowids kept,
    # so the FTS index stays valid; DROP TABLE fires no triggers).
    _script(
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
    """,
        _FTS_TRIGGERS,
    ),
    # issue 15: the transcript editor. `transcripts` keeps the latest text (so search and
    # exports follow edits) plus its revision number and speaker names; every revision,
    # the original (0) included, is a row of `transcript_revisions`. The original is copied
    # there only at the first edit. Each edit or restore is one INSERT whose triggers update
    # `transcripts`, so a write is atomic and conditional on the revision it was based on.
    # No foreign key: a later table rebuild (DROP TABLE) would cascade; a trigger does not fire.
    _script(
        """
    ALTER TABLE transcripts ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE transcripts ADD COLUMN speakers TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE transcript_revisions (
        entry_id TEXT NOT NULL,
        revision INTEGER NOT NULL,
        created REAL NOT NULL,
        note TEXT NOT NULL DEFAULT '',
        text TEXT NOT NULL,
        segments TEXT NOT NULL DEFAULT '[]',
        speakers TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (entry_id, revision)
    ) WITHOUT ROWID;
    """,
        _EDIT_TRIGGERS,
    ),
    # issue 15: files dropped into WATCH_DIR (appliance/web/inbox.py) are transcribed as 'inbox'.
    # The table is rebuilt as in version 2; the revision triggers name `transcripts` in their
    # bodies, so they are dropped first (a rename re-parses them) and made again after.
    _script(
        """
    DROP TRIGGER transcript_revisions_original;
    DROP TRIGGER transcript_revisions_latest;
    CREATE TABLE transcripts_v3 (
        id TEXT NOT NULL UNIQUE,
        created REAL NOT NULL,
        source TEXT NOT NULL
            CHECK (source IN ('upload', 'api', 'live', 'asr', 'wyoming', 'realtime', 'inbox')),
        filename TEXT NOT NULL DEFAULT '',
        duration REAL NOT NULL DEFAULT 0,
        model TEXT NOT NULL,
        language TEXT NOT NULL DEFAULT '',
        task TEXT NOT NULL DEFAULT 'transcribe',
        text TEXT NOT NULL,
        segments TEXT NOT NULL DEFAULT '[]',
        timings TEXT NOT NULL DEFAULT '{}',
        revision INTEGER NOT NULL DEFAULT 0,
        speakers TEXT NOT NULL DEFAULT '{}'
    );
    INSERT INTO transcripts_v3 (rowid, id, created, source, filename, duration, model, language,
        task, text, segments, timings, revision, speakers)
    SELECT rowid, id, created, source, filename, duration, model, language, task, text,
        segments, timings, revision, speakers FROM transcripts;
    DROP TABLE transcripts;
    ALTER TABLE transcripts_v3 RENAME TO transcripts;
    CREATE INDEX transcripts_created ON transcripts(created);
    """,
        _FTS_TRIGGERS,
        _EDIT_TRIGGERS,
    ),
]

_COLUMNS = "id, created, source, filename, duration, model, language, task, text, revision"

# Bounds of an edit (PATCH /api/history/{id}); the API turns a violation into a 4xx.
MAX_SEGMENTS = 10_000
MAX_SEGMENT_TEXT = 2_000
MAX_TOTAL_TEXT = 1_000_000
MAX_SPEAKERS = 100
MAX_REVISIONS = 100  # kept per entry besides the original
MAX_SPEAKER_LABEL = 100
_SEGMENT_FIELDS = {f.name for f in fields(Segment)}
_WORD_FIELDS = {f.name for f in fields(Word)}
Rows = list[dict[str, Any]]


def segments_to_json(segments: list[Segment]) -> str:
    return json.dumps([asdict(s) for s in segments])


def segments_from_json(data: str) -> list[Segment]:
    """Segments as stored; keys `Segment` does not know (an editor's `speaker` label on a
    release whose `Segment` has no such field) are left out rather than refused."""
    out = []
    for raw in json.loads(data):
        words = tuple(
            Word(**{k: v for k, v in w.items() if k in _WORD_FIELDS}) for w in raw.pop("words", ())
        )
        raw["tokens"] = tuple(raw.get("tokens", ()))
        known = {k: v for k, v in raw.items() if k in _SEGMENT_FIELDS}
        out.append(Segment(words=words, **known))
    return out


# Control characters (NUL ends an FTS5 string early) and lone surrogates (not encodable as
# UTF-8): never part of a search term, so they separate terms.
_NOT_SEARCHABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class SearchError(ApplianceError, ValueError):
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


class EditError(ValueError):
    """An edit refused at the edge: an HTTP status, a stable code and a message."""

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_edit") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class RevisionConflict(Exception):
    """The edit was based on a revision that is no longer the latest."""

    def __init__(self, current: int) -> None:
        super().__init__(f"the entry is at revision {current}")
        self.current = current


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EditError(f"{where} must be a number of seconds")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise EditError(f"{where} must be a finite number of seconds, not negative")
    return round(number, 3)


def _label(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise EditError(f"{where} must be a string")
    value = value.strip()
    if len(value) > MAX_SPEAKER_LABEL or _NOT_SEARCHABLE.search(value):
        raise EditError(
            f"{where} must be at most {MAX_SPEAKER_LABEL} characters, without control characters"
        )
    return value


def validate_speakers(raw: object) -> dict[str, str]:
    """`{"label": "display name"}`; an empty name drops the mapping."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise EditError("speakers must be an object mapping speaker labels to names")
    if len(raw) > MAX_SPEAKERS:
        raise EditError(f"at most {MAX_SPEAKERS} speakers", status=413, code="too_many_speakers")
    out: dict[str, str] = {}
    for key, value in raw.items():
        label = _label(key, "a speaker label")
        name = _label(value, f"the name of speaker {label[:40]!r}")
        if label and name:
            out[label] = name
    return out


def validate_segments(
    raw: object, base: list[dict[str, Any]], duration: float
) -> list[dict[str, Any]]:
    """The edited segments, checked and normalised, ready to store.

    Each item: `start`, `end` (seconds, `0 <= start <= end <=` the audio's duration, starts in
    order), `text` (string), optional `speaker` (label or null) and `id` (the base segment it
    came from: its word timings and scores are kept when the text is unchanged).
    """
    if not isinstance(raw, list):
        raise EditError("segments must be a list")
    if len(raw) > MAX_SEGMENTS:
        raise EditError(f"at most {MAX_SEGMENTS} segments", status=413, code="too_many_segments")
    limit = max([float(duration or 0)] + [float(s.get("end", 0) or 0) for s in base])
    limit = round(limit, 3) if limit > 0 else 86_400.0
    by_id = {s.get("id"): s for s in base}
    out: list[dict[str, Any]] = []
    total = 0
    previous_start = 0.0
    for index, item in enumerate(raw):
        where = f"segment {index + 1}"
        if not isinstance(item, dict):
            raise EditError(f"{where} must be an object")
        start = _number(item.get("start"), f"{where}: start")
        end = _number(item.get("end"), f"{where}: end")
        if start > end:
            raise EditError(f"{where}: start ({start}) is after end ({end})")
        if end > limit + 0.001:
            raise EditError(f"{where}: end ({end}) is past the end of the audio ({limit})")
        if start < previous_start:
            raise EditError(f"{where}: starts before the segment above it (keep them in order)")
        previous_start = start
        text = item.get("text")
        if not isinstance(text, str):
            raise EditError(f"{where}: text must be a string")
        text = text.strip()
        if len(text) > MAX_SEGMENT_TEXT:
            raise EditError(
                f"{where}: text longer than {MAX_SEGMENT_TEXT} characters",
                status=413,
                code="text_too_long",
            )
        total += len(text)
        if total > MAX_TOTAL_TEXT:
            raise EditError(
                f"the text is longer than {MAX_TOTAL_TEXT} characters",
                status=413,
                code="text_too_long",
            )
        segment: dict[str, Any] = {"id": index, "start": start, "end": end}
        segment["text"] = f" {text}" if text else ""
        source_id = item.get("id")
        source = by_id.get(source_id) if isinstance(source_id, int) else None
        if source is not None and str(source.get("text", "")).strip() == text:
            for key in ("avg_logprob", "no_speech_prob", "compression_ratio", "temperature"):
                if key in source:
                    segment[key] = source[key]
            segment["tokens"] = source.get("tokens", [])
            segment["words"] = [
                w
                for w in source.get("words", [])
                if isinstance(w, dict) and start - 0.001 <= w.get("start", -1) <= end + 0.001
            ]
        speaker = item.get("speaker")
        if speaker is not None:
            label = _label(speaker, f"{where}: speaker")
            if label:
                segment["speaker"] = label
        out.append(segment)
    return out


def segments_text(segments: list[dict[str, Any]]) -> str:
    return "".join(str(s.get("text", "")) for s in segments).strip()


class History:
    def __init__(self, db: Database, retention_days: int = 0, max_rows: int = 0) -> None:
        self.db = db
        self.retention_days = retention_days
        self.max_rows = max_rows

    async def _row(self, sql: str, args: tuple[Any, ...]) -> Any:
        """The first row of a query, or None."""
        async with self.db.conn.execute(sql, args) as cur:
            return await cur.fetchone()

    async def _rows(self, sql: str, args: tuple[Any, ...]) -> Rows:
        """Every row of a query, as dicts."""
        async with self.db.conn.execute(sql, args) as cur:
            return [dict(r) for r in await cur.fetchall()]

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
            row = await self._row(
                f"SELECT count(*) FROM transcripts {where}",  # noqa: S608
                args,
            )
        except (sqlite3.OperationalError, UnicodeError) as exc:
            if not match:
                raise
            raise SearchError(f"cannot search for {q!r}: {exc}") from None
        total = int(row[0]) if row else 0
        rows = await self._rows(
            f"SELECT {_COLUMNS} FROM transcripts {where} ORDER BY created DESC LIMIT ? OFFSET ?",  # noqa: S608
            (*args, limit, offset),
        )
        return rows, total

    async def get(self, entry_id: str) -> dict[str, Any] | None:
        row = await self._row(
            f"SELECT {_COLUMNS}, segments, timings, speakers FROM transcripts WHERE id = ?",  # noqa: S608
            (entry_id,),
        )
        if row is None:
            return None
        entry = dict(row)
        entry["segments"] = json.loads(entry["segments"])
        entry["timings"] = json.loads(entry["timings"])
        entry["speakers"] = json.loads(entry["speakers"])
        return entry

    async def transcript(self, entry_id: str) -> Transcript | None:
        row = await self._row(
            "SELECT text, segments, language, duration FROM transcripts WHERE id = ?", (entry_id,)
        )
        if row is None:
            return None
        return Transcript(row[0], segments_from_json(row[1]), row[2], row[3])

    async def speaker_names(self, entry_id: str) -> dict[str, str]:
        """Speaker label -> display name, as renamed in the editor (latest revision)."""
        row = await self._row("SELECT speakers FROM transcripts WHERE id = ?", (entry_id,))
        names = json.loads(row[0]) if row else {}
        return names if isinstance(names, dict) else {}

    async def revisions(self, entry_id: str) -> Rows | None:
        """Every revision, oldest first (without segments); None for an unknown entry."""
        entry = await self.get(entry_id)
        if entry is None:
            return None
        rows = await self._rows(
            "SELECT revision, created, note, length(text) AS chars,"
            " json_array_length(segments) AS segment_count"
            " FROM transcript_revisions WHERE entry_id = ? ORDER BY revision",
            (entry_id,),
        )
        if not rows:
            rows = [
                {
                    "revision": 0,
                    "created": entry["created"],
                    "note": "original",
                    "chars": len(entry["text"]),
                    "segment_count": len(entry["segments"]),
                }
            ]
        for row in rows:
            row["latest"] = row["revision"] == entry["revision"]
        return rows

    async def revision(self, entry_id: str, number: int) -> dict[str, Any] | None:
        """One revision with its text, segments and speaker names; None if there is none."""
        row = await self._row(
            "SELECT revision, created, note, text, segments, speakers"
            " FROM transcript_revisions WHERE entry_id = ? AND revision = ?",
            (entry_id, number),
        )
        if row is not None:
            out = dict(row)
        else:
            entry = await self.get(entry_id)
            if entry is None or number != 0 or entry["revision"] != 0:
                return None
            return {
                "revision": 0,
                "created": entry["created"],
                "note": "original",
                "text": entry["text"],
                "segments": entry["segments"],
                "speakers": entry["speakers"],
            }
        out["segments"] = json.loads(out["segments"])
        out["speakers"] = json.loads(out["speakers"])
        return out

    async def _current_revision(self, entry_id: str) -> int | None:
        row = await self._row("SELECT revision FROM transcripts WHERE id = ?", (entry_id,))
        return None if row is None else int(row[0])

    async def save_revision(
        self,
        entry_id: str,
        base_revision: int,
        segments: Rows,
        speakers: dict[str, str],
        note: str = "edit",
    ) -> int | None:
        """Store an edit as revision `base_revision + 1` and make it the latest.

        One conditional INSERT (its triggers keep the original and update the entry), so two
        editors of the same revision cannot both win: the second gets `RevisionConflict`.
        None for an unknown entry.
        """
        cur = await self.db.conn.execute(
            "INSERT INTO transcript_revisions"
            " (entry_id, revision, created, note, text, segments, speakers)"
            " SELECT id, revision + 1, ?, ?, ?, ?, ? FROM transcripts"
            " WHERE id = ? AND revision = ?",
            (
                time.time(),
                note,
                segments_text(segments),
                json.dumps(segments),
                json.dumps(speakers),
                entry_id,
                base_revision,
            ),
        )
        if cur.rowcount == 1:
            # storage stays bounded: the original and the latest MAX_REVISIONS edits
            await self.db.conn.execute(
                "DELETE FROM transcript_revisions WHERE entry_id = ? AND revision > 0"
                " AND revision <= ?",
                (entry_id, base_revision + 1 - MAX_REVISIONS),
            )
            await self.db.conn.commit()
            return base_revision + 1
        await self.db.conn.commit()
        current = await self._current_revision(entry_id)
        if current is None:
            return None
        raise RevisionConflict(current)

    async def restore(
        self, entry_id: str, number: int, base_revision: int | None = None
    ) -> int | None:
        """Make revision `number` the latest again, as a new revision (nothing is lost).

        None when the entry or the revision does not exist; `RevisionConflict` when
        `base_revision` is given and stale. Restoring the latest revision changes nothing.
        """
        current = await self._current_revision(entry_id)
        if current is None:
            return None
        if base_revision is not None and base_revision != current:
            raise RevisionConflict(current)
        if number == current:
            return current
        old = await self.revision(entry_id, number)
        if old is None:
            return None
        return await self.save_revision(
            entry_id, current, old["segments"], old["speakers"], note=f"restored {number}"
        )

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
