"""The appliance's one SQLite file (aiosqlite, WAL) and per-component schema migrations.

Each component (history, auth, settings, ...) owns an ordered list of migration scripts; the
`schema_version` table remembers how many of each were applied, so components evolve
independently and a database from any older release upgrades itself at start.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import aiosqlite

from appliance import schema
from appliance.exceptions import ApplianceError

log = logging.getLogger(__name__)


class StartupError(ApplianceError):
    """The appliance cannot start: the database or DATA_DIR is unusable (the message says why)."""


class Database:
    """An open connection plus the migration bookkeeping."""

    def __init__(self, connection: aiosqlite.Connection, path: Path) -> None:
        self.conn = connection
        self.path = path

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

    async def migrate(self, component: str, migrations: Sequence[str]) -> int:
        """Apply the migrations of `component` not applied yet; return its schema version."""
        async with self.conn.execute(schema.SELECT_VERSION, (component,)) as cur:
            row = await cur.fetchone()
        current = int(row[0]) if row else 0
        newer = f"this release knows ({len(migrations)}): restore the matching release or backup"
        for version, script in schema.pending(component, current, migrations, newer=newer):
            log.info("migrating %s schema to version %d", component, version)
            await self.conn.executescript(script)
        return len(migrations)

    async def writable(self) -> bool:
        """Readiness probe: can we write (disk full, read-only mount and locks all fail here)?"""
        try:
            await self.conn.execute(
                "INSERT INTO schema_version(component, version) VALUES ('_probe', 0)"
                " ON CONFLICT(component) DO UPDATE SET version = 0"
            )
            await self.conn.commit()
        except aiosqlite.Error:
            return False
        return True

    async def close(self) -> None:
        await self.conn.close()


def _owner_only(path: Path) -> None:
    """The WAL and shared-memory files hold the same data as the database itself."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if file.exists():
            file.chmod(0o600)
