"""Transcription history: every finished upload, API call and live session, in SQLite or in
the cluster's shared PostgreSQL database.

Search covers the text and the file name: FTS5 on SQLite, on PostgreSQL a generated `tsvector`
column (the 'simple' configuration: no stemming, like FTS5's unicode61) with a GIN index.
Retention (days, max rows) is applied after each insert and at start.

Search semantics, the same on both: every term must match, a term of several words is a phrase,
the last word is a prefix match, and user input is never query syntax. Where PostgreSQL differs
from FTS5's unicode61 tokenizer:
- ASCII punctuation is a word break on both (it is translated to spaces in the indexed column
  and in the query, so `fox.wav`, `a-b`, e-mail addresses and URLs are words as in FTS5, not
  the single tokens of PostgreSQL's parser); other punctuation and symbols are split off by
  PostgreSQL's parser, which follows the database's LC_CTYPE (in the C locale it takes every
  non-ASCII character for a letter).
- diacritics are not folded (`cafe` does not find `café`); non-ASCII letters are lower-cased
  only when the database's LC_CTYPE is not C.
- a last term that PostgreSQL's parser splits further (`«word»`) prefix-matches each part.
- a text whose index would pass PostgreSQL's 1 MB `tsvector` limit (some 1 MB of distinct
  words, far beyond a real transcript) is searchable in its first 100,000 characters only.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import string
import time
import uuid
from dataclasses import asdict, fields
from typing import Any

import psycopg

from appliance.core.db import POSTGRESQL, SQLITE, AnyDatabase
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

# ASCII punctuation breaks words in PostgreSQL's search, in the index and in the query alike.
_WORD_BREAKS = string.punctuation
_AS_SPACES = str.maketrans(_WORD_BREAKS, " " * len(_WORD_BREAKS))
_INDEXED_PREFIX = 100_000  # characters indexed of a text too large for one tsvector

# PostgreSQL: always a new database, so one migration makes the current schema. The editor's
# SQLite triggers are PL/pgSQL triggers here; `transcript_revisions` has a foreign key instead
# of the delete trigger (PostgreSQL alters a CHECK without rebuilding the table, so nothing
# drops `transcripts`), which also stops an edit from leaving revisions of an entry deleted
# while it ran. `search` is generated from the file name (first: tsvector positions stop at
# 16,383, and a phrase query needs them) and the text.
PG_MIGRATIONS = [
    f"""
    CREATE FUNCTION transcripts_search(filename text, body text) RETURNS tsvector
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
    DECLARE
        words text := translate(filename || ' ' || body, $p${_WORD_BREAKS}$p$,
            repeat(' ', {len(_WORD_BREAKS)}));
    BEGIN
        RETURN to_tsvector('simple', words);
    EXCEPTION WHEN program_limit_exceeded THEN  -- over the 1 MB a tsvector may hold
        RETURN to_tsvector('simple', left(words, {_INDEXED_PREFIX}));
    END $fn$;
    CREATE TABLE transcripts (
        id TEXT PRIMARY KEY,
        created DOUBLE PRECISION NOT NULL,
        source TEXT NOT NULL
            CHECK (source IN ('upload', 'api', 'live', 'asr', 'wyoming', 'realtime', 'inbox')),
        filename TEXT NOT NULL DEFAULT '',
        duration DOUBLE PRECISION NOT NULL DEFAULT 0,
        model TEXT NOT NULL,
        language TEXT NOT NULL DEFAULT '',
        task TEXT NOT NULL DEFAULT 'transcribe',
        text TEXT NOT NULL,
        segments TEXT NOT NULL DEFAULT '[]',
        timings TEXT NOT NULL DEFAULT '{{}}',
        revision INTEGER NOT NULL DEFAULT 0,
        speakers TEXT NOT NULL DEFAULT '{{}}',
        search tsvector GENERATED ALWAYS AS (transcripts_search(filename, text)) STORED
    );
    CREATE INDEX transcripts_created ON transcripts(created);
    CREATE INDEX transcripts_search ON transcripts USING GIN (search);
    CREATE TABLE transcript_revisions (
        entry_id TEXT NOT NULL REFERENCES transcripts(id) ON DELETE CASCADE,
        revision INTEGER NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        note TEXT NOT NULL DEFAULT '',
        text TEXT NOT NULL,
        segments TEXT NOT NULL DEFAULT '[]',
        speakers TEXT NOT NULL DEFAULT '{{}}',
        PRIMARY KEY (entry_id, revision)
    );
    CREATE FUNCTION transcript_revisions_original() RETURNS trigger
    LANGUAGE plpgsql AS $fn$
    BEGIN
        INSERT INTO transcript_revisions
            (entry_id, revision, created, note, text, segments, speakers)
        SELECT id, 0, created, 'original', text, segments, speakers
        FROM transcripts WHERE id = NEW.entry_id
        ON CONFLICT DO NOTHING;
        RETURN NEW;
    END $fn$;
    CREATE TRIGGER transcript_revisions_original BEFORE INSERT ON transcript_revisions
    FOR EACH ROW WHEN (NEW.revision = 1) EXECUTE FUNCTION transcript_revisions_original();
    CREATE FUNCTION transcript_revisions_latest() RETURNS trigger
    LANGUAGE plpgsql AS $fn$
    BEGIN
        UPDATE transcripts SET text = NEW.text, segments = NEW.segments,
            speakers = NEW.speakers, revision = NEW.revision
        WHERE id = NEW.entry_id;
        RETURN NULL;
    END $fn$;
    CREATE TRIGGER transcript_revisions_latest AFTER INSERT ON transcript_revisions
    FOR EACH ROW WHEN (NEW.revision > 0) EXECUTE FUNCTION transcript_revisions_latest();
    """  # noqa: S608 (this module's constants only)
]
MIGRATIONS_BY_DIALECT = {SQLITE: MIGRATIONS, POSTGRESQL: PG_MIGRATIONS}

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


def _terms(q: str) -> list[str]:
    """The search terms: whitespace-separated, without what is never searchable."""
    return _NOT_SEARCHABLE.sub(" ", q).split()


def _fts_query(terms: list[str]) -> str:
    """Quote each term so user input can never be FTS5 syntax; prefix-match the last one."""
    quoted = ['"' + t.replace('"', '""') + '"' for t in terms]
    quoted[-1] += "*"
    return " ".join(quoted)


def _tsquery(terms: list[str]) -> str:
    """The terms as text for `to_tsquery('simple', ...)`: each a phrase of its words, all
    required, the last word a prefix. ASCII punctuation breaks words here as in the index,
    which leaves no quote or backslash: every quoted word is a plain lexeme, never syntax.
    Terms of punctuation only drop out, as in FTS5 (an all-punctuation query finds nothing),
    and as there, the term before a last one that dropped out is no prefix."""
    phrases = [[f"'{word}'" for word in t.translate(_AS_SPACES).split()] for t in terms]
    if phrases[-1]:
        phrases[-1][-1] += ":*"
    return " & ".join(" <-> ".join(words) for words in phrases if words)


# a query that cannot run: FTS5's errors; PostgreSQL's too large a tsquery (54000), too deep
# a one to evaluate (54001: some 20,000 terms), a syntax or data error
_SEARCH_ERRORS = (
    sqlite3.OperationalError,
    UnicodeError,
    psycopg.errors.ProgramLimitExceeded,
    psycopg.errors.StatementTooComplex,
    psycopg.errors.SyntaxError,
    psycopg.DataError,
)


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
    def __init__(self, db: AnyDatabase, retention_days: int = 0, max_rows: int = 0) -> None:
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
        await self.db.migrate("history", MIGRATIONS_BY_DIALECT)
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
        terms = _terms(q)
        args: tuple[Any, ...] = ()
        if not terms:
            where = ""
        elif self.db.dialect == POSTGRESQL:
            where, args = "WHERE search @@ to_tsquery('simple', ?)", (_tsquery(terms),)
        else:
            where = (
                "WHERE rowid IN (SELECT rowid FROM transcripts_fts WHERE transcripts_fts MATCH ?)"
            )
            args = (_fts_query(terms),)
        try:
            row = await self._row(
                f"SELECT count(*) FROM transcripts {where}",  # noqa: S608
                args,
            )
        except _SEARCH_ERRORS as exc:
            if not terms:
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
        segments = "segments::json" if self.db.dialect == POSTGRESQL else "segments"
        rows = await self._rows(
            "SELECT revision, created, note, length(text) AS chars,"  # noqa: S608
            f" json_array_length({segments}) AS segment_count"
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
        None for an unknown entry. On PostgreSQL two such INSERTs can run at once: the second
        waits for the first's revision row, and ON CONFLICT makes it insert nothing.
        """
        try:
            cur = await self.db.conn.execute(
                "INSERT INTO transcript_revisions"
                " (entry_id, revision, created, note, text, segments, speakers)"
                " SELECT id, revision + 1, ?, ?, ?, ?, ? FROM transcripts"
                " WHERE id = ? AND revision = ? ON CONFLICT DO NOTHING",
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
            saved = cur.rowcount == 1
        except psycopg.errors.ForeignKeyViolation:
            saved = False  # PostgreSQL: the entry was deleted while this edit waited for it
        if saved:
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
                "DELETE FROM transcripts WHERE id NOT IN "
                "(SELECT id FROM transcripts ORDER BY created DESC LIMIT ?)",
                (self.max_rows,),
            )
            removed += cur.rowcount
        if removed:
            await self.db.conn.commit()
        return removed
