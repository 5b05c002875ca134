"""The update history: one store, written by the root updater, read by the admin panel.

The table `update_history` (database component "updates") lives in the service's own SQLite
file in DATA_DIR, so a rollback carries it across a database restore. The updater opens that
file as root: it checks every file SQLite would open (no link, no hard link), works with the
service user's rights while it does, and hands created files back to the service user
(`UpdateHistory`). The web process only reads it (`read_only`), and never migrates it.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any

from appliance import schema
from appliance.system.update.errors import UnsafeDataFile

COMPONENT = "updates"
MIGRATIONS = [
    """
    CREATE TABLE update_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        started REAL NOT NULL,
        finished REAL,
        action TEXT NOT NULL,          -- apply | rollback
        from_version TEXT,
        to_version TEXT,
        source TEXT,
        status TEXT NOT NULL,          -- running | succeeded | refused | failed
                                       -- | rolled_back | rollback_failed
        message TEXT,
        db_backup TEXT
    );
    CREATE INDEX update_history_started ON update_history(started)
    """,
    # the admin panel's request (appliance.system.update.spool) that started the attempt
    "ALTER TABLE update_history ADD COLUMN request_id TEXT",
]
HISTORY_COLUMNS = (
    "id",
    "started",
    "finished",
    "action",
    "from_version",
    "to_version",
    "source",
    "status",
    "message",
    "db_backup",
    "request_id",
)
DB_NAME = "appliance.db"
# the database and the files SQLite keeps beside it (all in DATA_DIR: the service user's)
DB_SIDE_FILES = ("", "-wal", "-shm", "-journal")


class UpdateHistory:
    """The service user's database as root sees it, and the update history in it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.db_path = data_dir / DB_NAME

    def check_db_files(self) -> bool:
        """Whether the database exists; raises UnsafeDataFile unless it and the files SQLite
        keeps beside it are absent or plain files (no symlink, no hard link, no FIFO): the
        service user owns DATA_DIR and must not steer what root opens or writes."""
        exists = False
        for suffix in DB_SIDE_FILES:
            path = self.db_path.with_name(DB_NAME + suffix)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise UnsafeDataFile(
                    f"{path} is not a plain file (a link?): the updater will not open it"
                )
            exists = exists or suffix == ""
        return exists

    def connect(self) -> sqlite3.Connection:
        self.check_db_files()
        return sqlite3.connect(self.db_path, timeout=10)

    @contextmanager
    def as_data_owner(self) -> Iterator[None]:
        """Work on the service user's files with the service user's rights (effective uid and
        gid, no supplementary groups): a link swapped in after `check_db_files` then reaches
        only what the service user could reach anyway. Nested use is a no-op. Without
        CAP_SETUID/CAP_SETGID (an older unit), or when DATA_DIR is root's, root carries on
        with the checks alone."""
        owner = self._data_owner()
        if owner is None or os.geteuid() != 0:
            yield
            return
        groups, egid = os.getgroups(), os.getegid()
        dropped = False
        try:
            os.setgroups([])
            os.setegid(owner[1])
            os.seteuid(owner[0])
            dropped = True
        except PermissionError as exc:
            _restore_ids(egid, groups)
            print(f"updater: working on DATA_DIR as root: {exc}", file=sys.stderr)
        try:
            yield
        finally:
            if dropped:
                os.seteuid(0)
                _restore_ids(egid, groups)

    def _data_owner(self) -> tuple[int, int] | None:
        """(uid, gid) of DATA_DIR when someone other than root owns it."""
        try:
            st = os.lstat(self.data_dir)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode) or st.st_uid == 0:
            return None
        return st.st_uid, st.st_gid

    def ensure_schema(self) -> None:
        """The component's migrations, applied as appliance.core.db.Database.migrate does."""
        try:
            with self.as_data_owner(), closing(self.connect()) as conn:
                conn.isolation_level = None
                conn.execute(schema.CREATE_TABLE)
                row = conn.execute(schema.SELECT_VERSION, (COMPONENT,)).fetchone()
                current = int(row[0]) if row else 0
                newer = f"this updater knows ({len(MIGRATIONS)})"
                for _, script in schema.pending(COMPONENT, current, MIGRATIONS, newer=newer):
                    conn.executescript(script)
        finally:
            self.fix_owner()

    @contextmanager
    def db(self) -> Iterator[sqlite3.Connection]:
        self.ensure_schema()
        try:
            with self.as_data_owner(), closing(self.connect()) as conn, conn:
                yield conn
        finally:
            self.fix_owner()

    def fix_owner(self) -> None:
        """Files root creates in the data dir must stay the service user's (it owns the dir).

        Through descriptors only: each file is opened in the directory without following a
        link (O_NOFOLLOW, dir_fd), checked (a regular file with one name) and changed with
        fchown: a link planted under one of these names is never followed."""
        if os.geteuid() != 0:
            return
        try:
            dir_fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            owner = os.fstat(dir_fd)
            for suffix in DB_SIDE_FILES:
                try:
                    fd = os.open(
                        DB_NAME + suffix,
                        os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY,
                        dir_fd=dir_fd,
                    )
                except OSError:  # absent, or a link (ELOOP): left alone
                    continue
                try:
                    st = os.fstat(fd)
                    if (
                        stat.S_ISREG(st.st_mode)
                        and st.st_nlink == 1
                        and (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid)
                    ):
                        os.fchown(fd, owner.st_uid, owner.st_gid)
                        os.fchmod(fd, 0o600)  # as the service keeps them
                finally:
                    os.close(fd)
        finally:
            os.close(dir_fd)

    def record(self, row_id: int | None, **values: Any) -> int | None:
        """Insert (row_id None) or update a history row; history never blocks an update."""
        try:
            with self.db() as conn:
                if row_id is None:
                    values.setdefault("started", time.time())
                    cols = ", ".join(values)
                    marks = ", ".join("?" for _ in values)
                    cur = conn.execute(
                        f"INSERT INTO update_history ({cols}) VALUES ({marks})",  # noqa: S608
                        tuple(values.values()),
                    )
                    return cur.lastrowid
                sets = ", ".join(f"{k} = ?" for k in values)
                conn.execute(
                    f"UPDATE update_history SET {sets} WHERE id = ?",  # noqa: S608
                    (*values.values(), row_id),
                )
                return row_id
        except (sqlite3.Error, OSError, RuntimeError) as exc:
            print(f"updater: cannot write the update history: {exc}", file=sys.stderr)
            return row_id

    def rows(self, limit: int = 100) -> list[dict[str, Any]]:
        """The history rows, newest first: for people to read. The service user can write
        them, so nothing here is ever used as a path or a rollback target."""
        try:
            if not self.check_db_files():
                return []
            with self.as_data_owner(), closing(self.connect()) as conn:
                conn.row_factory = sqlite3.Row
                rows = conn.execute(
                    "SELECT * FROM update_history ORDER BY id DESC LIMIT ?", (limit,)
                ).fetchall()
        except sqlite3.OperationalError:  # no table yet
            return []
        except UnsafeDataFile as exc:
            print(f"updater: not reading the update history: {exc}", file=sys.stderr)
            return []
        finally:
            self.fix_owner()
        return [dict(r) for r in rows]

    def mark_interrupted(self) -> int:
        """Mark attempts left `running` as failed (the caller holds the update lock)."""
        with self.db() as conn:
            cur = conn.execute(
                "UPDATE update_history SET status = 'failed', finished = ?,"
                " message = 'interrupted: the updater stopped before it finished'"
                " WHERE status = 'running'",
                (time.time(),),
            )
            return cur.rowcount

    def replace_rows(self, rows: list[dict[str, Any]]) -> None:
        """Put the history back as it was (after a database restore), oldest row first."""
        with self.db() as conn:
            conn.execute("DELETE FROM update_history")
            marks = ", ".join("?" for _ in HISTORY_COLUMNS)
            conn.executemany(
                f"INSERT INTO update_history ({', '.join(HISTORY_COLUMNS)}) VALUES ({marks})",  # noqa: S608
                [tuple(r.get(c) for c in HISTORY_COLUMNS) for r in reversed(rows)],
            )


def read_only(db_path: Path, limit: int) -> list[dict[str, Any]]:
    """The history rows, newest first, for the web process: read-only, never migrated."""
    if not db_path.exists():
        return []
    try:
        with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT * FROM update_history ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
    except sqlite3.Error:  # no table yet: never updated
        return []
    return [dict(r) for r in rows]


def _restore_ids(egid: int, groups: list[int]) -> None:
    with suppress(PermissionError):
        os.setegid(egid)
        os.setgroups(groups)
