"""The privileged side of self-update: install a signed release, switch to it, prove it works,
and go back to the previous release and database by itself when it does not.

Runs as root (later: the oneshot `whisper-appliance-update.service`); the web process stays
unprivileged and only asks for an update. Layout under the root (default /opt/whisper-appliance,
the same as the Ansible role's):

    releases/<version>/venv/   one virtual environment per release (pip --no-index)
    releases/<version>/manifest.json(.sig)   what was installed, for audit
    current -> releases/<version>   the active release (the unit runs current/venv/bin/...)
    backups/appliance-<version>-<time>.db   SQLite backups taken when leaving <version>
    update-journal.json   every switch (from, to, the backup taken): what a rollback goes to
    staging/   verified downloads and unpacked wheelhouses (removed afterwards)

`apply`: verify (signature, checksum, versions, Python) -> install the new release beside the
running one -> stop the service -> back up the database (sqlite3 backup API) -> switch `current`
atomically -> restart -> wait for /health to report the new version -> a test transcription.
Any failure after the switch rolls back: previous `current`, database restored from the backup,
restart, health checked again. Update history lives in the database (component "updates"); it
is carried across a restore so a rollback never loses it.

Everything the service user can write is hostile here: the database (its history is written for
the admin panel and never read back as a path), the spool and DATA_DIR itself. The rollback
target and the backup to restore come only from the root-owned journal and release and backup
directories, each name checked; nothing in DATA_DIR is opened through a link or chowned by path.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import ipaddress
import json
import os
import re
import shlex
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
import wave
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from appliance.system.update import spool as update_spool
from appliance.system.update.release import (
    BUNDLE_SUFFIX,
    DEFAULT_KEY_DIR,
    MANIFEST,
    ReleaseError,
    VerifiedRelease,
    fetch_verified,
    load_trusted_keys,
    staging_dir,
    unpack_wheelhouse,
    version_key,
)

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
JOURNAL = "update-journal.json"  # under the install root: root's own record of every switch
JOURNAL_MAX_BYTES = 1024 * 1024
JOURNAL_ENTRIES = 200
# a release directory's name (what `release._check_version` accepts, and nothing else)
_RELEASE_NAME = re.compile(r"^[0-9][0-9A-Za-z.+-]{0,60}$")
# a database backup's name, as _backup_db makes them
_BACKUP_NAME = re.compile(r"^appliance-[0-9A-Za-z.+-]{1,100}\.db$")
_BACKUP_STAMP = r"-(\d{8}T\d{6}Z)(?:-(\d+))?\.db"
EXIT_OK, EXIT_FAILED, EXIT_ROLLBACK_FAILED = 0, 1, 3


class UpdateRefused(Exception):
    """Refused before anything changed."""


class UpdateFailed(Exception):
    """A step after the switch failed (the caller rolls back)."""


class UnsafeDataFile(OSError):
    """A file of the service user's that root must not open: a link, a hard link, not a file."""


def release_name_ok(name: object) -> bool:
    """A version-shaped directory name: no '/', no '..', nothing a path could be made of."""
    return isinstance(name, str) and bool(_RELEASE_NAME.match(name)) and ".." not in name


def _default_python() -> str:
    if Path("/usr/bin/python3").exists():
        return "/usr/bin/python3"
    return str(getattr(sys, "_base_executable", sys.executable))


@dataclass
class Config:
    """Where things are and how to drive the service; `from_env` reads UPDATER_* variables."""

    root: Path = Path("/opt/whisper-appliance")
    data_dir: Path = Path("/var/lib/whisper-appliance")
    key_dir: Path = DEFAULT_KEY_DIR
    restart_command: str = "systemctl restart whisper-appliance"
    stop_command: str = "systemctl stop whisper-appliance"
    url: str = "https://127.0.0.1:5001"
    keep: int = 3
    health_timeout: float = 180.0
    command_timeout: float = 300.0
    python: str = field(default_factory=_default_python)
    clip: Path | None = None
    expect: str | None = None
    api_key: str | None = None
    # False when the URL was derived from the service's own listener settings
    verify_tls: bool = True
    spool: Path | None = None  # default: DATA_DIR/update-requests

    @property
    def spool_dir(self) -> Path:
        return self.spool or update_spool.spool_dir(self.data_dir)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        cfg = cls()
        paths = {
            "UPDATER_ROOT": "root",
            "UPDATER_KEY_DIR": "key_dir",
            "UPDATER_CLIP": "clip",
            "UPDATER_SPOOL": "spool",
        }
        for var, attr in paths.items():
            if env.get(var):
                setattr(cfg, attr, Path(env[var]))
        data_dir = env.get("UPDATER_DATA_DIR") or env.get("DATA_DIR")
        if data_dir:
            cfg.data_dir = Path(data_dir)
        for var, attr in (
            ("UPDATER_RESTART_COMMAND", "restart_command"),
            ("UPDATER_STOP_COMMAND", "stop_command"),
            ("UPDATER_URL", "url"),
            ("UPDATER_PYTHON", "python"),
            ("UPDATER_EXPECT", "expect"),
        ):
            if var in env:
                setattr(cfg, attr, env[var])
        if "UPDATER_URL" not in env and (env.get("HTTPS_PORT") or env.get("HTTPS_ENABLED")):
            # the unit reads the service's env file: talk to the service where it listens
            cfg.url, cfg.verify_tls = service_url(env), False
        if env.get("UPDATER_KEEP"):
            cfg.keep = int(env["UPDATER_KEEP"])
        if env.get("UPDATER_HEALTH_TIMEOUT"):
            cfg.health_timeout = float(env["UPDATER_HEALTH_TIMEOUT"])
        if env.get("UPDATER_API_KEY_FILE"):
            cfg.api_key = Path(env["UPDATER_API_KEY_FILE"]).read_text().strip()
        return cfg


def service_url(env: Mapping[str, str]) -> str:
    """The service's own base URL from its listener settings (HTTPS_*, BIND_ADDRESS)."""
    https = env.get("HTTPS_ENABLED", "true").strip().lower() not in ("false", "0", "no", "off")
    port = env.get("HTTPS_PORT", "").strip() or "5001"
    bind = env.get("BIND_ADDRESS", "").strip()
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(bind, bind)  # noqa: S104
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if https else 'http'}://{host}:{port}"


@dataclass
class Outcome:
    status: str
    from_version: str | None
    to_version: str | None
    message: str
    exit_code: int = EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "message": self.message,
        }


def silence_wav(seconds: float = 1.0) -> bytes:
    """A short silent 16 kHz WAV: enough to prove decoding and inference run end to end."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * int(16000 * seconds))
    return buf.getvalue()


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


class Updater:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.root = cfg.root
        self.releases = cfg.root / "releases"
        self.current_link = cfg.root / "current"
        self.backups = cfg.root / "backups"
        self.db_path = cfg.data_dir / DB_NAME

    # --- state ------------------------------------------------------------------------------
    def current_release(self) -> Path | None:
        if not self.current_link.is_symlink() and not self.current_link.exists():
            return None
        target = self.current_link.resolve()
        return target if target.is_dir() else None

    def current_version(self) -> str | None:
        release = self.current_release()
        return release.name if release is not None else None

    def installed(self) -> list[str]:
        """Release directories: version-named, real directories (links do not count)."""
        if not self.releases.is_dir():
            return []
        names = [
            p.name
            for p in self.releases.iterdir()
            if release_name_ok(p.name) and _lstat_is(p, stat.S_ISDIR)
        ]
        return sorted(names, key=_safe_key)

    def release_dir(self, version: object) -> Path | None:
        """The directory of an installed release, where `version` names one: a version-shaped
        name, a real directory (no link) directly in the releases directory, owned by us
        (root). None for anything else: never a path built from what someone else wrote."""
        if not release_name_ok(version):
            return None
        assert isinstance(version, str)
        me = os.geteuid()
        try:
            top, st = os.lstat(self.releases), os.lstat(self.releases / version)
        except OSError:
            return None
        for s in (top, st):
            if not stat.S_ISDIR(s.st_mode) or s.st_uid != me:
                return None
        return self.releases / version

    def backup_file(self, name: object) -> Path | None:
        """A database backup taken by this updater, by file name: a regular file (no link,
        one name) directly in the backups directory, owned by us. None for anything else."""
        if not isinstance(name, str) or not _BACKUP_NAME.match(name) or ".." in name:
            return None
        me = os.geteuid()
        try:
            top, st = os.lstat(self.backups), os.lstat(self.backups / name)
        except OSError:
            return None
        if not stat.S_ISDIR(top.st_mode) or top.st_uid != me:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != me:
            return None
        return self.backups / name

    # --- the journal: root's own record of every switch -------------------------------------
    def journal(self) -> list[dict[str, Any]]:
        """The switches (`from_version`, `to_version`, `db_backup` file name, `action`, `at`),
        oldest first. Only a regular file owned by us is read; anything else counts as empty."""
        try:
            fd = os.open(self.root / JOURNAL, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return []
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                return []
            raw = f.read(JOURNAL_MAX_BYTES + 1)
        try:
            data = update_spool.load_json(raw, JOURNAL_MAX_BYTES, what="the journal")
        except ValueError:
            return []
        entries = data.get("switches") if isinstance(data, dict) else None
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []

    def _journal_add(
        self, action: str, from_version: str, to_version: str, backup: Path | None
    ) -> None:
        """Record a switch; like the history, the journal never fails an update that worked."""
        try:
            self._write_journal(action, from_version, to_version, backup)
        except OSError as exc:
            print(f"updater: cannot write the journal: {exc}", file=sys.stderr)

    def _write_journal(
        self, action: str, from_version: str, to_version: str, backup: Path | None
    ) -> None:
        entries = self.journal()
        entries.append(
            {
                "at": time.time(),
                "action": action,
                "from_version": from_version,
                "to_version": to_version,
                "db_backup": backup.name if backup is not None else None,
            }
        )
        body = json.dumps({"switches": entries[-JOURNAL_ENTRIES:]}, indent=1).encode()
        tmp = self.root / f".{JOURNAL}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(self.root / JOURNAL)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def status(self, limit: int = 20) -> dict[str, Any]:
        target = self._rollback_target()
        return {
            "current_version": self.current_version(),
            "installed": self.installed(),
            "rollback_to": target[0] if target else None,
            "history": self.history(limit),
        }

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".update.lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UpdateRefused("another update or rollback is running") from None
            yield

    # --- the service user's files in DATA_DIR ------------------------------------------------
    def _check_db_files(self) -> bool:
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

    def _connect(self) -> sqlite3.Connection:
        self._check_db_files()
        return sqlite3.connect(self.db_path, timeout=10)

    @contextmanager
    def _as_data_owner(self) -> Iterator[None]:
        """Work on the service user's files with the service user's rights (effective uid and
        gid, no supplementary groups): a link swapped in after `_check_db_files` then reaches
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
            st = os.lstat(self.cfg.data_dir)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode) or st.st_uid == 0:
            return None
        return st.st_uid, st.st_gid

    # --- history (database component "updates") ---------------------------------------------
    def _ensure_schema(self) -> None:
        """The component's migrations, as appliance.core.db.Database.migrate applies them."""
        try:
            with self._as_data_owner(), closing(self._connect()) as conn:
                conn.isolation_level = None
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version ("
                    " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
                )
                row = conn.execute(
                    "SELECT version FROM schema_version WHERE component = ?", (COMPONENT,)
                ).fetchone()
                current = int(row[0]) if row else 0
                if current > len(MIGRATIONS):
                    raise RuntimeError(
                        f"database schema of {COMPONENT!r} is version {current}, newer than this "
                        f"updater knows ({len(MIGRATIONS)})"
                    )
                for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
                    conn.executescript(
                        f"BEGIN;\n{script.rstrip().rstrip(';')};\n"
                        "INSERT INTO schema_version(component, version)"
                        f" VALUES ('{COMPONENT}', {version})"
                        " ON CONFLICT(component) DO UPDATE SET version = excluded.version;\nCOMMIT;"
                    )
        finally:
            self._fix_owner()

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        self._ensure_schema()
        try:
            with self._as_data_owner(), closing(self._connect()) as conn, conn:
                yield conn
        finally:
            self._fix_owner()

    def _fix_owner(self) -> None:
        """Files root creates in the data dir must stay the service user's (it owns the dir).

        Through descriptors only: each file is opened in the directory without following a
        link (O_NOFOLLOW, dir_fd), checked (a regular file with one name) and changed with
        fchown: a link planted under one of these names is never followed."""
        if os.geteuid() != 0:
            return
        try:
            dir_fd = os.open(self.cfg.data_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
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

    def _record(self, row_id: int | None, **values: Any) -> int | None:
        """Insert (row_id None) or update a history row; history never blocks an update."""
        try:
            with self._db() as conn:
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

    def record_refused(
        self,
        action: str,
        message: str,
        *,
        request_id: str | None = None,
        source: str | None = None,
        to_version: str | None = None,
    ) -> None:
        """A history row for a request refused before an apply or rollback got to write one."""
        now = time.time()
        self._record(
            None,
            started=now,
            finished=now,
            action=action,
            from_version=self.current_version(),
            to_version=to_version,
            source=source,
            status="refused",
            message=message,
            request_id=request_id,
        )

    def close_interrupted(self) -> int:
        """Mark attempts left `running` by a crash or a reboot as failed (under the lock)."""
        try:
            with self._locked(), self._db() as conn:
                cur = conn.execute(
                    "UPDATE update_history SET status = 'failed', finished = ?,"
                    " message = 'interrupted: the updater stopped before it finished'"
                    " WHERE status = 'running'",
                    (time.time(),),
                )
                return cur.rowcount
        except (UpdateRefused, sqlite3.Error, OSError, RuntimeError):
            return 0  # a running update holds the lock: its row is not a leftover

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        """The history rows, newest first: for people to read. The service user can write
        them, so nothing here is ever used as a path or a rollback target."""
        try:
            if not self._check_db_files():
                return []
            with self._as_data_owner(), closing(self._connect()) as conn:
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
            self._fix_owner()
        return [dict(r) for r in rows]

    # --- database backup and restore --------------------------------------------------------
    def _backup_db(self, label: str) -> Path | None:
        if not self._check_db_files():
            return None
        self.backups.mkdir(parents=True, exist_ok=True)
        self.backups.chmod(0o700)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.backups / f"appliance-{label}-{stamp}.db"
        n = 1
        while dest.exists():
            n += 1
            dest = self.backups / f"appliance-{label}-{stamp}-{n}.db"
        with closing(sqlite3.connect(dest)) as dst:
            # root's file, opened now; no journal beside it, so the copy below (made with the
            # service user's rights) writes only through this open file
            dst.execute("PRAGMA journal_mode=MEMORY")
            with self._as_data_owner(), closing(self._connect()) as src:
                src.backup(dst)
        dest.chmod(0o600)
        self._fix_owner()
        return dest

    def _restore_db(self, backup: Path) -> None:
        """Put the backup's content back into the live file, keeping the update history.
        `backup` is one of ours (`backup_file`), never a path read from the database."""
        if self.backup_file(backup.name) != backup:
            raise UnsafeDataFile(f"{backup} is not a database backup of this updater")
        rows = self.history(limit=1_000_000)
        # root's backup, opened (and read once) as root; read-only and immutable: nothing is
        # opened beside it while the live file is written with the service user's rights
        uri = f"file:{quote(str(backup))}?mode=ro&immutable=1"
        with closing(sqlite3.connect(uri, uri=True)) as src:
            src.execute("SELECT count(*) FROM sqlite_master").fetchone()
            with self._as_data_owner(), closing(self._connect()) as dst:
                src.backup(dst)
        with self._db() as conn:
            conn.execute("DELETE FROM update_history")
            marks = ", ".join("?" for _ in HISTORY_COLUMNS)
            conn.executemany(
                f"INSERT INTO update_history ({', '.join(HISTORY_COLUMNS)}) VALUES ({marks})",  # noqa: S608
                [tuple(r.get(c) for c in HISTORY_COLUMNS) for r in reversed(rows)],
            )

    # --- service ----------------------------------------------------------------------------
    def _run(self, command: str, what: str) -> None:
        if not command.strip():
            return
        try:
            result = subprocess.run(
                shlex.split(command),
                capture_output=True,
                text=True,
                timeout=self.cfg.command_timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UpdateFailed(f"{what} command {command!r} failed: {exc}") from None
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip()[-500:]
            raise UpdateFailed(f"{what} command {command!r} exited {result.returncode}: {tail}")

    def _client(self) -> httpx.Client:
        host = urlsplit(self.cfg.url).hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        # our own service on loopback, with the certificate of its own CA: no MITM to fear
        return httpx.Client(verify=self.cfg.verify_tls and not loopback, timeout=10)

    def check_service(self, version: str) -> str:
        """Wait for /health to be green on `version`, then transcribe the test clip."""
        base = self.cfg.url.rstrip("/")
        deadline = time.monotonic() + self.cfg.health_timeout
        last = "no answer"
        with self._client() as client:
            while True:
                try:
                    r = client.get(f"{base}/health")
                    running = _json_field(r, "version")
                    if r.status_code == 200 and running == version:
                        break
                    last = f"/health answered HTTP {r.status_code}, version {running}"
                except (httpx.HTTPError, ValueError) as exc:
                    last = f"/health: {exc.__class__.__name__}: {exc}"
                if time.monotonic() > deadline:
                    raise UpdateFailed(
                        f"not healthy on {version} after {self.cfg.health_timeout:.0f} s: {last}"
                    )
                time.sleep(1)
            clip = self.cfg.clip.read_bytes() if self.cfg.clip else silence_wav()
            name = self.cfg.clip.name if self.cfg.clip else "silence.wav"
            headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
            try:
                r = client.post(
                    f"{base}/transcribe",
                    files={"file": (name, clip, "audio/wav")},
                    headers=headers,
                    timeout=max(60.0, self.cfg.health_timeout),
                )
            except httpx.HTTPError as exc:
                raise UpdateFailed(f"test transcription: {exc.__class__.__name__}: {exc}") from None
        if r.status_code in (401, 403) and not self.cfg.api_key:
            return (
                "healthy; test transcription skipped: API keys are required (UPDATER_API_KEY_FILE)"
            )
        if r.status_code != 200:
            raise UpdateFailed(f"test transcription answered HTTP {r.status_code}: {r.text[:300]}")
        text = _json_field(r, "text")
        if not isinstance(text, str):
            raise UpdateFailed("test transcription returned no text")
        if self.cfg.expect and _words(self.cfg.expect) not in _words(text):
            raise UpdateFailed(
                f"test transcription gave {text[:200]!r}, expected {self.cfg.expect!r}"
            )
        return f"healthy; test transcription: {text.strip()[:120]!r}"

    # --- releases ---------------------------------------------------------------------------
    def _switch(self, release: Path) -> None:
        """Point `current` at the release atomically (rename over the old link)."""
        tmp = self.root / f".current.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:  # relative, as the tests copy roots around; Ansible's absolute links work too
            target = release.resolve().relative_to(self.root.resolve())
        except ValueError:
            target = release.resolve()
        tmp.symlink_to(target)
        tmp.replace(self.current_link)

    def _pip_env(self) -> dict[str, str]:
        # a machine-wide PIP_FIND_LINKS/PIP_INDEX_URL must not leak into an offline install
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        return env

    def _python_version(self) -> str:
        out = subprocess.run(
            [self.cfg.python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return out.stdout.strip()

    def _install(self, rel: VerifiedRelease, stage: Path) -> Path:
        version = rel.manifest.version
        wheelhouse = stage / "wheelhouse"
        unpack_wheelhouse(rel.tarball, wheelhouse)
        rel.tarball.unlink()
        target = self.releases / version
        if target.exists():  # a leftover of a failed attempt, or an old kept release
            shutil.rmtree(target)
        target.mkdir(parents=True)
        try:
            steps = [
                [self.cfg.python, "-I", "-m", "venv", str(target / "venv")],
                [
                    str(target / "venv" / "bin" / "python"),
                    "-I",
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--no-index",
                    "--no-cache-dir",
                    "--find-links",
                    str(wheelhouse),
                    f"whisper-appliance=={version}",
                ],
            ]
            for argv in steps:
                result = subprocess.run(
                    argv,
                    capture_output=True,
                    text=True,
                    env=self._pip_env(),
                    cwd=target,  # not the caller's directory: a source tree there shadows
                    timeout=1800,
                    check=False,
                )
                if result.returncode != 0:
                    tail = (result.stderr or result.stdout).strip()[-800:]
                    raise UpdateRefused(f"installing {version} failed: {argv[3]}: {tail}")
            probe = subprocess.run(
                [
                    str(target / "venv" / "bin" / "python"),
                    "-I",
                    "-c",
                    "from importlib.metadata import version; print(version('whisper-appliance'))",
                ],
                capture_output=True,
                text=True,
                cwd=target,
                timeout=120,
                check=False,
            )
            if probe.stdout.strip() != version:
                raise UpdateRefused(
                    f"the installed release reports version {probe.stdout.strip()!r}, "
                    f"not {version}: {probe.stderr.strip()[-300:]}"
                )
            (target / MANIFEST).write_bytes(rel.manifest_raw)
            sums = wheelhouse / "SHA256SUMS"
            if sums.is_file():  # the Ansible role's marker: same wheelhouse, no reinstall
                digest = hashlib.sha256(sums.read_text().rstrip().encode()).hexdigest()
                (target / ".wheelhouse.sha256").write_text(digest + "\n")
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return target

    def _rollback_target(self) -> tuple[str, Path | None] | None:
        """(version, database backup) that a manual rollback goes to.

        From root's own state only: the latest switch to the current release in the journal
        (its `from_version` an installed release, its backup one of ours); without one, the
        newest other installed release and the newest backup taken when it was left. Never
        from the database's history: the service user can write that."""
        current = self.current_version()
        if current is None:
            return None
        for entry in reversed(self.journal()):
            if entry.get("to_version") != current or entry.get("from_version") == current:
                continue
            if self.release_dir(entry.get("from_version")) is not None:
                return str(entry["from_version"]), self.backup_file(entry.get("db_backup"))
        others = [
            path
            for name in self.installed()
            if name != current and (path := self.release_dir(name)) is not None
        ]
        if not others:
            return None
        newest = max(others, key=lambda p: p.lstat().st_mtime)
        return newest.name, self._last_backup_of(newest.name)

    def _last_backup_of(self, version: str) -> Path | None:
        """The newest backup taken when `version` was left (appliance-<version>-<time>.db)."""
        if not self.backups.is_dir():
            return None
        pattern = re.compile(re.escape(f"appliance-{version}") + _BACKUP_STAMP)
        found = [m for p in self.backups.iterdir() if (m := pattern.fullmatch(p.name))]
        found.sort(key=lambda m: (m[1], int(m[2] or 1)))
        for match in reversed(found):
            backup = self.backup_file(match[0])
            if backup is not None:
                return backup
        return None

    def _prune(self, protect: set[str]) -> None:
        releases = [p for p in self.releases.iterdir() if p.is_dir() and p.name not in protect]
        releases = [p for p in releases if not p.name.startswith(".")]
        releases.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        room = max(0, self.cfg.keep - len(protect))
        for old in releases[room:]:
            shutil.rmtree(old, ignore_errors=True)
        if self.backups.is_dir():
            backups = sorted(self.backups.glob("appliance-*.db"), key=lambda p: p.stat().st_mtime)
            for old in backups[: max(0, len(backups) - self.cfg.keep)]:
                old.unlink(missing_ok=True)

    def _activate(self, release: Path, version: str, restore: Path | None) -> str:
        self._run(self.cfg.stop_command, "stop")
        if restore is not None:
            self._restore_db(restore)
        self._switch(release)
        self._run(self.cfg.restart_command, "restart")
        return self.check_service(version)

    # --- apply ------------------------------------------------------------------------------
    def apply(
        self,
        source: str,
        *,
        allow_downgrade: bool = False,
        consume: bool = False,
        request_id: str | None = None,
        label: str | None = None,
    ) -> Outcome:
        """`label` names the source in the history when `source` is not meant for people."""
        try:
            with self._locked():
                try:
                    return self._apply(source, allow_downgrade, request_id, label)
                finally:
                    if consume:  # processed (whatever the outcome): never picked up twice
                        _consume(Path(source))
        except UpdateRefused as exc:  # the lock is taken: leave the upload for its turn
            return Outcome("refused", self.current_version(), None, str(exc), EXIT_FAILED)

    def _apply(
        self, source: str, allow_downgrade: bool, request_id: str | None, label: str | None
    ) -> Outcome:
        previous = self.current_release()
        from_version = previous.name if previous else None
        row = self._record(
            None,
            action="apply",
            from_version=from_version,
            source=label or source,
            status="running",
            request_id=request_id,
        )

        def refuse(message: str) -> Outcome:
            self._record(row, status="refused", finished=time.time(), message=message)
            return Outcome("refused", from_version, None, message, EXIT_FAILED)

        with staging_dir(self.root / "staging") as stage:
            try:
                rel = fetch_verified(source, stage, load_trusted_keys(self.cfg.key_dir))
                manifest = rel.manifest
                self._record(row, to_version=manifest.version)
                self._check_versions(
                    manifest.version, manifest.min_from_version, from_version, allow_downgrade
                )
                python = self._python_version()
                if python != manifest.python:
                    raise UpdateRefused(
                        f"the release is built for Python {manifest.python}, "
                        f"{self.cfg.python} is {python}"
                    )
                self._check_db_files()
                new = self._install(rel, stage)
            except (ReleaseError, UpdateRefused, httpx.HTTPError, OSError) as exc:
                return refuse(str(exc) or exc.__class__.__name__)
            except subprocess.SubprocessError as exc:
                return refuse(f"{exc.__class__.__name__}: {exc}")
        to_version = manifest.version
        backup: Path | None = None
        try:
            self._run(self.cfg.stop_command, "stop")
            backup = self._backup_db(from_version or "none")
            self._record(row, db_backup=str(backup) if backup else None)
            self._switch(new)
            self._run(self.cfg.restart_command, "restart")
            message = self.check_service(to_version)
        except (UpdateFailed, OSError, sqlite3.Error) as exc:
            return self._roll_back_after(row, previous, new, backup, to_version, str(exc))
        if from_version is not None:
            self._journal_add("apply", from_version, to_version, backup)
        self._record(row, status="succeeded", finished=time.time(), message=message)
        self._prune({to_version} | ({from_version} if from_version else set()))
        return Outcome("succeeded", from_version, to_version, message)

    def _check_versions(
        self, new: str, min_from: str | None, current: str | None, allow_downgrade: bool
    ) -> None:
        if current is None:
            return
        if new == current:
            raise UpdateRefused(f"{new} is already the running release")
        try:
            older = version_key(new) < version_key(current)
            too_old = min_from is not None and version_key(current) < version_key(min_from)
        except ReleaseError:
            older, too_old = False, False
        if older and not allow_downgrade:
            raise UpdateRefused(f"{new} is older than the running {current} (use rollback)")
        if too_old:
            raise UpdateRefused(f"{new} can only be installed over {min_from} or newer")

    def _roll_back_after(
        self,
        row: int | None,
        previous: Path | None,
        failed: Path,
        backup: Path | None,
        to_version: str,
        reason: str,
    ) -> Outcome:
        from_version = previous.name if previous else None
        if previous is None:
            msg = f"{to_version} failed and there is no previous release to go back to: {reason}"
            self._record(row, status="failed", finished=time.time(), message=msg)
            return Outcome("failed", None, to_version, msg, EXIT_ROLLBACK_FAILED)
        try:
            check = self._activate(previous, previous.name, backup)
        except (UpdateFailed, OSError, sqlite3.Error) as exc:
            msg = (
                f"{to_version} failed ({reason}); rolling back to {previous.name} failed too: {exc}"
            )
            self._record(row, status="rollback_failed", finished=time.time(), message=msg)
            return Outcome("rollback_failed", from_version, to_version, msg, EXIT_ROLLBACK_FAILED)
        shutil.rmtree(failed, ignore_errors=True)
        msg = f"{to_version} failed ({reason}); rolled back to {previous.name}: {check}"
        self._record(row, status="rolled_back", finished=time.time(), message=msg)
        return Outcome("rolled_back", from_version, to_version, msg, EXIT_FAILED)

    # --- manual rollback --------------------------------------------------------------------
    def rollback(
        self,
        to_version: str | None = None,
        *,
        keep_db: bool = False,
        request_id: str | None = None,
    ) -> Outcome:
        try:
            with self._locked():
                return self._rollback(to_version, keep_db, request_id)
        except UpdateRefused as exc:
            return Outcome("refused", self.current_version(), to_version, str(exc), EXIT_FAILED)

    def _rollback(self, to_version: str | None, keep_db: bool, request_id: str | None) -> Outcome:
        current = self.current_release()
        if current is None:
            raise UpdateRefused("no current release")
        target = self._rollback_target()
        backup: Path | None = None
        if to_version is None:
            if target is None:
                raise UpdateRefused("no earlier release is installed")
            to_version, backup = target
        elif target is not None and target[0] == to_version:
            backup = target[1]
        release = self.release_dir(to_version)
        if to_version == current.name or release is None:
            raise UpdateRefused(
                f"{str(to_version)[:80]!r} is not an installed release other than the current"
            )
        if keep_db:
            backup = None
        try:
            self._check_db_files()
        except UnsafeDataFile as exc:
            raise UpdateRefused(str(exc)) from None
        saved: Path | None = None
        row = self._record(
            None,
            action="rollback",
            from_version=current.name,
            to_version=to_version,
            source="manual" if request_id is None else "admin panel",
            status="running",
            request_id=request_id,
        )
        try:
            self._run(self.cfg.stop_command, "stop")
            saved = self._backup_db(f"{current.name}-before-rollback")
            self._record(row, db_backup=str(saved) if saved else None)
            message = self._activate(release, to_version, backup)
        except (UpdateFailed, OSError, sqlite3.Error) as exc:
            try:  # back to where we were, with the database as it was
                check = self._activate(current, current.name, saved if backup else None)
            except (UpdateFailed, OSError, sqlite3.Error) as exc2:
                msg = (
                    f"rollback to {to_version} failed ({exc}); "
                    f"restoring {current.name} failed: {exc2}"
                )
                self._record(row, status="rollback_failed", finished=time.time(), message=msg)
                return Outcome(
                    "rollback_failed", current.name, to_version, msg, EXIT_ROLLBACK_FAILED
                )
            msg = f"rollback to {to_version} failed ({exc}); still on {current.name}: {check}"
            self._record(row, status="failed", finished=time.time(), message=msg)
            return Outcome("failed", current.name, to_version, msg, EXIT_FAILED)
        restored = f"database restored from {backup.name}" if backup else "database kept"
        message = f"{message}; {restored}"
        self._journal_add("rollback", current.name, to_version, saved)
        self._record(row, status="succeeded", finished=time.time(), message=message)
        return Outcome("succeeded", current.name, to_version, message)


def _consume(source: Path) -> None:
    """Remove a processed upload: the bundle file, or every bundle in an upload directory."""
    if source.is_file():
        source.unlink()
    elif source.is_dir() and not (source / MANIFEST).exists():
        for bundle in source.glob("*" + BUNDLE_SUFFIX):
            bundle.unlink()


def _json_field(response: httpx.Response, name: str) -> Any:
    try:  # the service's answer: bounded like any JSON the service user can shape
        body = update_spool.load_json(response.content, 1024 * 1024, what="the answer")
    except ValueError:
        return None
    return body.get(name) if isinstance(body, dict) else None


def _restore_ids(egid: int, groups: list[int]) -> None:
    with suppress(PermissionError):
        os.setegid(egid)
        os.setgroups(groups)


def _lstat_is(path: Path, kind: Any) -> bool:
    """Whether `path` itself (not what a link points to) is of `kind` (stat.S_ISDIR, ...)."""
    try:
        return bool(kind(path.lstat().st_mode))
    except OSError:
        return False


def _safe_key(name: str) -> tuple[Any, ...]:
    try:
        return (0, version_key(name))
    except ReleaseError:
        return (1, name)


# --- requests from the admin panel (the spool; whisper-appliance-update.service) ---------------
def run_request(upd: Updater) -> int:
    """Take the admin panel's request from the spool, act on it, report in status.json.

    The spool belongs to the less privileged web process: see appliance.system.update.spool for what
    is checked. Whatever happens, the request is consumed, so the path unit never loops.
    Exit status: 0 handled (whatever the outcome), 3 the service is left down, 1 no spool.
    """
    try:
        spool = update_spool.Spool(upd.cfg.spool_dir)
    except FileNotFoundError:
        print(f"updater: no spool at {upd.cfg.spool_dir}: nothing to do", file=sys.stderr)
        return EXIT_OK
    except OSError as exc:  # a symlink, or not a directory
        print(f"updater: refusing the spool {upd.cfg.spool_dir}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        for leftover in spool.processing_leftovers():
            _report_interrupted(upd, spool, leftover)
        name = spool.take()
        if name is None:
            return EXIT_OK
        try:
            return _handle_request(upd, spool, name)
        finally:
            spool.remove(name)
    finally:
        spool.close()


def _status(req_id: str | None, state: str, message: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": req_id,
        "state": state,
        "message": message[: update_spool.MAX_MESSAGE],
        "finished_at": None if state == "running" else time.time(),
        **extra,
    }


def _loose_fields(raw: bytes) -> tuple[str | None, str | None]:
    """The id and upload name of a refused request, where they look sane (to clean up)."""
    try:
        data = update_spool.load_json(raw, update_spool.MAX_REQUEST_BYTES)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    req_id = data.get("id") if isinstance(data.get("id"), str) else None
    if req_id is not None and not re.fullmatch(r"[0-9a-f]{16,64}", req_id):
        req_id = None
    source = data.get("source")
    upload = source if isinstance(source, str) and update_spool.is_upload(source) else None
    return req_id, upload


def _report_interrupted(upd: Updater, spool: update_spool.Spool, name: str) -> None:
    raw = b""
    with suppress(update_spool.RequestError, OSError):
        raw = spool.read_request(name)
    req_id, upload = _loose_fields(raw)
    upd.close_interrupted()
    message = (
        "interrupted: the updater stopped before it finished (crash or reboot); "
        f"the running release is {upd.current_version()}"
    )
    spool.write_status(_status(req_id, "failed", message, to_version=None))
    if upload:
        spool.remove(upload)
    spool.remove(name)
    print(f"updater: {message}", file=sys.stderr)


def _handle_request(upd: Updater, spool: update_spool.Spool, name: str) -> int:
    raw = b""
    try:
        raw = spool.read_request(name)
        req = update_spool.parse_request(raw)
    except (update_spool.RequestError, RecursionError, MemoryError) as exc:
        req_id, upload = _loose_fields(raw)
        message = f"refused request: {exc}"
        upd.record_refused("request", message, request_id=req_id)
        spool.write_status(_status(req_id, "refused", message, from_version=None, to_version=None))
        if upload:
            spool.remove(upload)
        print(f"updater: {message}", file=sys.stderr)
        return EXIT_OK  # handled: the outcome is in status.json and the history
    spool.write_status(
        _status(
            req.id,
            "running",
            f"{req.action} started",
            action=req.action,
            from_version=upd.current_version(),
            to_version=req.to_version,
            started_at=time.time(),
        )
    )
    try:
        outcome = _act(upd, spool, req)
    except Exception as exc:  # never leave the spool wedged: report whatever went wrong
        outcome = Outcome(
            "failed",
            upd.current_version(),
            req.to_version,
            f"the updater failed: {exc.__class__.__name__}: {exc}",
            EXIT_FAILED,
        )
    finally:
        if req.upload:
            spool.remove(req.upload)
    if outcome.status == "refused" and not any(
        row.get("request_id") == req.id for row in upd.history(limit=20)
    ):
        upd.record_refused(
            req.action,
            outcome.message,
            request_id=req.id,
            source=req.upload or req.source,
            to_version=req.to_version,
        )
    spool.write_status(
        _status(
            req.id,
            outcome.status,
            outcome.message,
            action=req.action,
            from_version=outcome.from_version,
            to_version=outcome.to_version,
        )
    )
    print(json.dumps({"request": req.id, **outcome.as_dict()}))
    # a refused or rolled-back update is a handled request, not a failed unit (that would mark
    # the system degraded); only a service left down fails the unit
    return EXIT_ROLLBACK_FAILED if outcome.exit_code == EXIT_ROLLBACK_FAILED else EXIT_OK


def _act(upd: Updater, spool: update_spool.Spool, req: update_spool.UpdateRequest) -> Outcome:
    if req.action == "rollback":
        return upd.rollback(req.to_version, request_id=req.id)
    if req.upload is None:
        assert req.source is not None
        return upd.apply(req.source, request_id=req.id)
    try:
        fd = spool.open_regular(req.upload)
    except update_spool.RequestError as exc:
        return Outcome("refused", upd.current_version(), None, str(exc), EXIT_FAILED)
    try:
        # the bundle through the descriptor opened without following links: the web process
        # cannot swap the file for a link to something else between check and use
        fd_path = f"/proc/self/fd/{fd}"
        outcome = upd.apply(fd_path, request_id=req.id, label=req.upload)
    finally:
        os.close(fd)
    outcome.message = outcome.message.replace(fd_path, req.upload)
    return outcome


# --- command line -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m appliance.updater",
        description="Apply a signed release, roll back, or show the update status (as root).",
    )
    parser.add_argument("--root", type=Path, help="install root (/opt/whisper-appliance)")
    parser.add_argument("--data-dir", type=Path, help="DATA_DIR holding appliance.db")
    parser.add_argument("--keys", type=Path, help="directory of trusted release keys (*.pub)")
    parser.add_argument("--restart-command", help="default: systemctl restart whisper-appliance")
    parser.add_argument("--stop-command", help="default: systemctl stop whisper-appliance")
    parser.add_argument("--url", help="the service's base URL (https://127.0.0.1:5001)")
    parser.add_argument("--keep", type=int, help="releases kept, the current one included (3)")
    parser.add_argument("--health-timeout", type=float, help="seconds to wait for /health")
    parser.add_argument("--clip", type=Path, help="audio for the test transcription")
    parser.add_argument("--expect", help="words the test transcription must contain")
    sub = parser.add_subparsers(dest="command", required=True)
    ap = sub.add_parser("apply", help="verify, install and switch to a release")
    ap.add_argument("source", help="release directory, *.release.tar bundle, upload dir or URL")
    ap.add_argument("--allow-downgrade", action="store_true")
    ap.add_argument("--consume", action="store_true", help="delete the bundle file afterwards")
    rb = sub.add_parser("rollback", help="go back to the previous (or a named) release")
    rb.add_argument("--to", dest="to_version", help="an installed version")
    rb.add_argument("--keep-db", action="store_true", help="keep the current database")
    st = sub.add_parser("status", help="current release, installed ones and the history")
    st.add_argument("--limit", type=int, default=20)
    sub.add_parser(
        "run-request",
        help="act on the admin panel's request in DATA_DIR/update-requests (the unit's job)",
    )
    args = parser.parse_args(argv)

    cfg = Config.from_env()
    for attr, value in (
        ("root", args.root),
        ("data_dir", args.data_dir),
        ("key_dir", args.keys),
        ("restart_command", args.restart_command),
        ("stop_command", args.stop_command),
        ("url", args.url),
        ("keep", args.keep),
        ("health_timeout", args.health_timeout),
        ("clip", args.clip),
        ("expect", args.expect),
    ):
        if value is not None:
            setattr(cfg, attr, value)
    updater = Updater(cfg)
    if args.command == "status":
        print(json.dumps(updater.status(args.limit), indent=2))
        return EXIT_OK
    if args.command == "run-request":
        return run_request(updater)
    if args.command == "apply":
        outcome = updater.apply(
            args.source, allow_downgrade=args.allow_downgrade, consume=args.consume
        )
    else:
        outcome = updater.rollback(args.to_version, keep_db=args.keep_db)
    print(json.dumps(outcome.as_dict(), indent=2))
    return outcome.exit_code


__all__ = ["MIGRATIONS", "Config", "Outcome", "Updater", "main", "run_request"]

if __name__ == "__main__":
    raise SystemExit(main())
