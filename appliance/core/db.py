"""The appliance's database and per-component schema migrations: one SQLite file (aiosqlite,
WAL) by default, or a shared PostgreSQL server (psycopg 3) when `DATABASE_URL` names one, so
that several appliances behind a load balancer share history, keys, sessions and the job queue.

Each component (history, auth, settings, ...) owns an ordered list of migration scripts per
dialect; the `schema_version` table remembers how many of each were applied, so components
evolve independently and a database from any older release upgrades itself at start.

Components talk to `Database.conn`, which has aiosqlite's shape on both backends (`execute`
awaitable or `async with`, `fetchone`/`fetchall`/`rowcount`, `commit`): SQL is written with `?`
placeholders, and `Database.dialect` says where the two differ (full-text search, upserts of
SQLite-only syntax). Errors of either driver are `DB_ERRORS`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import threading
from collections.abc import Coroutine, Generator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite
import psycopg
from psycopg import sql as pgsql
from psycopg.pq import TransactionStatus

from appliance import schema
from appliance.exceptions import ApplianceError

log = logging.getLogger(__name__)

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
DB_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
"""What either driver raises for a failed statement or a lost connection."""

Migrations = Sequence[str] | Mapping[str, Sequence[str]]
"""One list for both dialects, or one list per dialect: `{"sqlite": [...], "postgresql": [...]}`."""


class StartupError(ApplianceError):
    """The appliance cannot start: the database or DATA_DIR is unusable (the message says why)."""


def migrations_for(dialect: str, migrations: Migrations) -> Sequence[str]:
    if isinstance(migrations, Mapping):
        return migrations[dialect]
    return migrations


async def open_database(url: str | None, path: Path) -> Database | PostgresDatabase:
    """PostgreSQL when `url` is set (`DATABASE_URL`), else the SQLite file at `path`."""
    if url:
        return await PostgresDatabase.open(url)
    return await Database.open(path)


class _Probed:
    """What both databases do the same way through their `conn`."""

    conn: aiosqlite.Connection | PgConnection

    async def writable(self) -> bool:
        """Readiness probe: can this node write (disk full, a read-only mount, locks, a lost
        PostgreSQL server all fail here)?"""
        try:
            await self.conn.execute(
                "INSERT INTO schema_version(component, version) VALUES ('_probe', 0)"
                " ON CONFLICT(component) DO UPDATE SET version = 0"
            )
            await self.conn.commit()
        except DB_ERRORS:
            return False
        return True

    async def close(self) -> None:
        await self.conn.close()


class Database(_Probed):
    """An open SQLite connection plus the migration bookkeeping."""

    conn: aiosqlite.Connection

    dialect = SQLITE

    def __init__(self, connection: aiosqlite.Connection, path: Path) -> None:
        self.conn = connection
        self.path: Path | None = path

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Open (or create) the database; StartupError if it cannot be used.

        On any failure the connection and its thread are closed again: aiosqlite's worker
        thread is not a daemon, and a left-over one kept the process alive after a failed
        start instead of letting it exit (a systemd unit hung until its start timeout).
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create {path.parent}: {exc}") from exc
        connecting = aiosqlite.connect(path)
        # belt and braces: whatever fails later, this thread must never hold the process
        thread = getattr(connecting, "_thread", None)
        if isinstance(thread, threading.Thread):
            thread.daemon = True
        try:
            conn = await connecting
        except (sqlite3.Error, OSError) as exc:
            raise StartupError(f"cannot open the database {path}: {exc}") from exc
        try:
            conn.row_factory = aiosqlite.Row
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA busy_timeout=5000")
            await conn.execute(schema.CREATE_TABLE)
            await conn.commit()
            await asyncio.to_thread(_owner_only, path)
        except (sqlite3.Error, OSError) as exc:
            await conn.close()
            raise StartupError(f"cannot use the database {path}: {exc}") from exc
        except BaseException:
            await conn.close()
            raise
        return cls(conn, path)

    async def migrate(self, component: str, migrations: Migrations) -> int:
        """Apply the migrations of `component` not applied yet; return its schema version."""
        migrations = migrations_for(self.dialect, migrations)
        async with self.conn.execute(schema.SELECT_VERSION, (component,)) as cur:
            row = await cur.fetchone()
        current = int(row[0]) if row else 0
        newer = f"this release knows ({len(migrations)}): restore the matching release or backup"
        for version, script in schema.pending(component, current, migrations, newer=newer):
            log.info("migrating %s schema to version %d", component, version)
            await self.conn.executescript(script)
        return len(migrations)


def _owner_only(path: Path) -> None:
    """The WAL and shared-memory files hold the same data as the database itself."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists():
            file.chmod(0o600)


# --- PostgreSQL -------------------------------------------------------------------------------

_MIGRATION_LOCK = 0x5748_4953  # pg_advisory_lock key: one node migrates, the others wait


@functools.lru_cache(maxsize=2048)  # the same few hundred statements, translated once each
def to_pyformat(query: str) -> str:
    """`?` placeholders as psycopg's `%s`, `%` as `%%`; nothing inside quotes or comments is
    touched (a `?` in a string literal stays a character)."""
    out: list[str] = []
    quote = ""
    i = 0
    while i < len(query):
        ch = query[i]
        if quote:
            out.append("%%" if ch == "%" else ch)
            if ch == quote:
                quote = ""
        elif ch in ("'", '"'):
            quote = ch
            out.append(ch)
        elif ch == "-" and query.startswith("--", i):
            end = query.find("\n", i)
            end = len(query) if end < 0 else end
            out.append(query[i:end].replace("%", "%%"))
            i = end
            continue
        elif ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
        i += 1
    return "".join(out)


class Row(tuple[Any, ...]):
    """A result row readable by position and by column name, like `sqlite3.Row`."""

    _names: tuple[str, ...]

    def __new__(cls, names: tuple[str, ...], values: Sequence[Any]) -> Row:
        row = super().__new__(cls, values)
        row._names = names
        return row

    def keys(self) -> list[str]:
        return list(self._names)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._names.index(key))
            except ValueError:
                raise IndexError(f"no such column: {key}") from None
        return tuple.__getitem__(self, key)


def _row_factory(cursor: Any) -> Any:
    names = tuple(c.name for c in cursor.description or ())
    return lambda values: Row(names, values)


class PgCursor:
    """The results of one statement, already fetched (aiosqlite's cursor shape)."""

    def __init__(self, rows: list[Row], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    async def fetchone(self) -> Row | None:
        return self._rows.pop(0) if self._rows else None

    async def fetchall(self) -> list[Row]:
        rows, self._rows = self._rows, []
        return rows

    def __aiter__(self) -> PgCursor:
        return self

    async def __anext__(self) -> Row:
        if not self._rows:
            raise StopAsyncIteration
        return self._rows.pop(0)

    async def close(self) -> None:
        self._rows = []


class _Statement:
    """What `PgConnection.execute` returns: awaited, the cursor; `async with`, the same."""

    def __init__(self, run: Coroutine[Any, Any, PgCursor]) -> None:
        self._run = run

    def __await__(self) -> Generator[Any, None, PgCursor]:
        return self._run.__await__()

    async def __aenter__(self) -> PgCursor:
        cursor: PgCursor = await self._run
        return cursor

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


class PgConnection:
    """One psycopg connection with aiosqlite's interface, so components need no second code
    path: statements open a transaction that `commit` ends, as with sqlite3. A plain read that
    starts outside a transaction is committed at once (an idle-in-transaction connection would
    hold back VACUUM and the DDL of another node's migration). A connection that broke (the
    server restarted, a failover) is opened again: a statement outside a transaction that
    meets the break runs once more on the new one; inside a transaction it fails with a
    `psycopg.Error`. A failed statement ends its whole transaction (PostgreSQL aborts it), so
    when that transaction held earlier statements, the next `commit` fails too instead of
    returning as if they were kept (the connection is shared, as aiosqlite's is)."""

    def __init__(self, url: str, conn: psycopg.AsyncConnection[Any]) -> None:
        self.url = url
        self.raw = conn
        self._lock = asyncio.Lock()
        self._closed = False
        self._lost = False  # a transaction with statements in it ended without a commit

    @classmethod
    async def connect(cls, url: str) -> Self:
        return cls(url, await cls._open(url))

    @staticmethod
    async def _open(url: str) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            url, autocommit=False, row_factory=_row_factory, connect_timeout=10
        )
        await conn.execute("SET TIME ZONE 'UTC'")
        await conn.commit()
        return conn

    async def _usable(self) -> psycopg.AsyncConnection[Any]:
        if self._closed:  # as aiosqlite: a closed database stays closed
            raise ValueError("the database is closed")
        if self.raw.closed or self.raw.broken:
            log.warning("the PostgreSQL connection was lost: connecting again")
            self.raw = await self._open(self.url)
        return self.raw

    async def _execute(self, query: str, args: Sequence[Any] | None) -> PgCursor:
        params = tuple(args) if args else None
        text = (to_pyformat(query) if params is not None else query).encode()  # bytes: no % pass
        read = query.lstrip()[:6].upper() in ("SELECT", "VALUES")
        async with self._lock:
            conn = await self._usable()
            idle = conn.info.transaction_status == TransactionStatus.IDLE
            try:
                return await self._run(conn, text, params, commit=idle and read)
            except psycopg.Error:
                await self._failed(conn, idle)
                if not (idle and conn.closed):
                    raise
            # the connection broke under a statement that began its own transaction, which
            # never committed: nothing is lost by running it once more on a new connection
            conn = await self._usable()
            try:
                return await self._run(conn, text, params, commit=read)
            except psycopg.Error:
                await self._failed(conn, idle=True)
                raise

    @staticmethod
    async def _run(
        conn: psycopg.AsyncConnection[Any],
        text: bytes,
        params: tuple[Any, ...] | None,
        *,
        commit: bool,
    ) -> PgCursor:
        cur = await conn.execute(text, params)
        rows = await cur.fetchall() if cur.description else []
        rowcount = cur.rowcount
        if commit:
            await conn.commit()
        return PgCursor(rows, rowcount)

    async def _failed(self, conn: psycopg.AsyncConnection[Any], idle: bool) -> None:
        """After a failed statement: its transaction is over (rolled back here, or gone with
        the connection); `commit` must say so if it held earlier statements."""
        if not conn.closed:
            await conn.rollback()
        self._lost = self._lost or not idle

    def execute(self, query: str, args: Sequence[Any] | None = None) -> _Statement:
        return _Statement(self._execute(query, args))

    async def executescript(self, script: str) -> None:
        """Several statements, no parameters, as one transaction."""
        async with self._lock:
            conn = await self._usable()
            idle = conn.info.transaction_status == TransactionStatus.IDLE
            try:
                await conn.execute(script.encode())
                await conn.commit()
            except psycopg.Error:
                await self._failed(conn, idle)
                raise

    async def commit(self) -> None:
        async with self._lock:
            if self._lost:  # what ran since belongs to the same unit of work: gone too
                self._lost = False
                if not self.raw.closed:
                    await self.raw.rollback()
                raise psycopg.OperationalError(
                    "the transaction was rolled back (a statement in it failed, or the"
                    " connection to PostgreSQL was lost): nothing was committed"
                )
            if not self.raw.closed:
                await self.raw.commit()

    async def rollback(self) -> None:
        async with self._lock:
            self._lost = False
            if not self.raw.closed:
                await self.raw.rollback()

    async def close(self) -> None:
        self._closed = True
        await self.raw.close()


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "DATABASE_URL (unparsable)"
    host = info.get("host", "local socket")
    user, port, name = info.get("user", ""), info.get("port", 5432), info.get("dbname", "")
    return f"postgresql://{user}@{host}:{port}/{name}"


def _startup_error(doing: str, url: str, exc: psycopg.Error) -> StartupError:
    """StartupError naming the server, never the password: libpq quotes an unparsable URL whole
    in its message, so such a one is not shown at all."""
    try:
        password = psycopg.conninfo.conninfo_to_dict(url).get("password")
    except psycopg.ProgrammingError:
        return StartupError("DATABASE_URL is not a valid PostgreSQL URL")
    text = str(exc).strip()
    if password:
        text = text.replace(str(password), "***")
    return StartupError(f"cannot {doing} {redacted(url)}: {text}")


class PostgresDatabase(_Probed):
    """A shared PostgreSQL database with the SQLite `Database`'s interface."""

    conn: PgConnection

    dialect = POSTGRESQL
    path: Path | None = None

    def __init__(self, conn: PgConnection) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, url: str) -> PostgresDatabase:
        """Connect and make sure `schema_version` exists; StartupError if the server cannot be
        used (the message names the server, never the password)."""
        try:
            conn = await PgConnection.connect(url)
        except psycopg.Error as exc:
            raise _startup_error("connect to", url, exc) from None
        try:
            # concurrent CREATE TABLE IF NOT EXISTS of nodes starting together can collide
            await conn.executescript(
                f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK}); {schema.CREATE_TABLE}"
            )
        except psycopg.Error as exc:
            await conn.close()
            raise _startup_error("use the database", url, exc) from None
        return cls(conn)

    async def migrate(self, component: str, migrations: Migrations) -> int:
        """As `Database.migrate`, each migration one transaction, under an advisory lock so
        that nodes starting together migrate one after another."""
        scripts = migrations_for(self.dialect, migrations)
        newer = f"this release knows ({len(scripts)}): restore the matching release or backup"
        raw = await self.conn._usable()
        async with self.conn._lock:
            await raw.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
            try:
                cur = await raw.execute(to_pyformat(schema.SELECT_VERSION).encode(), (component,))
                row = await cur.fetchone()
                await raw.commit()
                current = int(row[0]) if row else 0
                # RuntimeError for a database newer than this release, before anything runs
                schema.pending(component, current, scripts, newer=newer)
                for version, script in enumerate(scripts[current:], start=current + 1):
                    log.info("migrating %s schema to version %d", component, version)
                    async with raw.transaction():
                        await raw.execute(script.encode())
                        await raw.execute(
                            pgsql.SQL(
                                "INSERT INTO schema_version(component, version) VALUES ({}, {})"
                                " ON CONFLICT(component) DO UPDATE SET version = excluded.version"
                            ).format(component, version)
                        )
            finally:
                if not raw.closed:
                    await raw.rollback()
                    await raw.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
                    await raw.commit()
        return len(scripts)


AnyDatabase = Database | PostgresDatabase
