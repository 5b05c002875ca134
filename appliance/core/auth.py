"""Who may do what: the admin password, admin sessions, CSRF tokens and API keys.

- The admin password is stored only as a scrypt hash. At the first start a random one is
  generated and written in clear, once, to `DATA_DIR/admin-password.txt` (0600); the log says
  where that file is (never the password). Changing the password deletes the file.
- Sessions: a random id in a cookie signed with the appliance's secret (`DATA_DIR/secret.key`,
  0600, generated at the first start; on PostgreSQL a row of `auth_secrets` instead, so that
  every node of a cluster signs alike and a login on one node holds on all), `HttpOnly`,
  `SameSite=Strict`, `Secure` over HTTPS. The database keeps only a hash of the id, so logout
  and a password change end sessions.
- CSRF: every state-changing admin request carries `X-CSRF-Token` (an HMAC of the session id);
  the login form uses a double-submit cookie.
- API keys `wa_<prefix>_<secret>`: shown once at creation, stored as SHA-256 (they are random
  and long, so a slow hash adds nothing); listed by prefix, name, created and last use.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, TimestampSigner

from appliance.core.db import AnyDatabase, PostgresDatabase, open_database
from appliance.exceptions import ApplianceError

log = logging.getLogger(__name__)

SESSION_COOKIE = "wa_session"
LOGIN_CSRF_COOKIE = "wa_login_csrf"
CSRF_HEADER = "X-CSRF-Token"
SESSION_MAX_AGE = 12 * 3600  # absolute lifetime of a login
SESSION_IDLE = 2 * 3600  # logged out after this long without a request
PASSWORD_FILE = "admin-password.txt"  # noqa: S105 - a file name
SECRET_FILE = "secret.key"  # noqa: S105 - a file name
MIN_PASSWORD = 10
MAX_PASSWORD = 1024
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
KEY_PREFIX = "wa_"

MIGRATIONS = [
    """
    CREATE TABLE auth_admin (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        password_hash TEXT NOT NULL,
        changed REAL NOT NULL
    );
    CREATE TABLE auth_sessions (
        id_hash TEXT PRIMARY KEY,
        created REAL NOT NULL,
        last_seen REAL NOT NULL,
        ip TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL UNIQUE,
        key_hash TEXT NOT NULL,
        created REAL NOT NULL,
        last_used REAL,
        revoked REAL
    );
    """,
]

PG_MIGRATIONS = [
    """
    CREATE TABLE auth_admin (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        password_hash TEXT NOT NULL,
        changed DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE auth_sessions (
        id_hash TEXT PRIMARY KEY,
        created DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        ip TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        prefix TEXT NOT NULL UNIQUE,
        key_hash TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        last_used DOUBLE PRECISION,
        revoked DOUBLE PRECISION
    );
    CREATE TABLE auth_secrets (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
]

MIGRATIONS_BY_DIALECT = {"sqlite": MIGRATIONS, "postgresql": PG_MIGRATIONS}


class AuthError(ApplianceError):
    """A refused credential or an invalid change: AuthError(status, code, message)."""


# --- passwords -------------------------------------------------------------------------------
def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 * 1024**2
    )
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=64 * 1024**2,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def check_new_password(password: object) -> str:
    if not isinstance(password, str):
        raise AuthError(400, "invalid_password", "the password must be a string")
    if len(password) < MIN_PASSWORD:
        raise AuthError(
            400, "weak_password", f"the new password needs at least {MIN_PASSWORD} characters"
        )
    if len(password) > MAX_PASSWORD:
        raise AuthError(400, "invalid_password", f"at most {MAX_PASSWORD} characters")
    if any(ord(c) < 32 for c in password):
        raise AuthError(400, "invalid_password", "the password contains control characters")
    return password


def _write_once(path: Path, data: bytes) -> bool:
    """Create `path` 0600 with `data`; False when it exists already (never overwritten)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return True


def load_secret(data_dir: Path) -> bytes:
    """The appliance's signing secret, created at the first start (0600, never in code)."""
    path = data_dir / SECRET_FILE
    _write_once(path, secrets.token_hex(32).encode())
    path.chmod(0o600)
    secret = path.read_bytes().strip()
    if len(secret) < 32:
        raise RuntimeError(f"{path} is too short to be a secret: remove it and restart")
    return secret


async def shared_secret(db: PostgresDatabase, name: str) -> str:
    """A secret every node sharing the database uses (`auth_secrets`): whichever node asks
    first makes it, the others find it (the insert waits for a concurrent one's commit)."""
    await db.conn.execute(
        "INSERT INTO auth_secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        (name, secrets.token_hex(32)),
    )
    await db.conn.commit()
    async with db.conn.execute("SELECT value FROM auth_secrets WHERE name = ?", (name,)) as cur:
        row = await cur.fetchone()
    assert row is not None  # inserted above or by another node, never deleted
    return str(row[0])


@dataclass
class Session:
    id_hash: str
    csrf: str
    created: float


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Auth:
    """The admin account, its sessions and the API keys; one instance per app."""

    def __init__(self, db: AnyDatabase, data_dir: Path, secret: bytes) -> None:
        self.db = db
        self.data_dir = data_dir
        self.secret = secret
        self._signer = TimestampSigner(secret, salt="wa-session", digest_method=hashlib.sha256)
        self._key_used: dict[str, float] = {}

    @classmethod
    async def open(cls, db: AnyDatabase, data_dir: Path) -> Auth:
        await db.migrate("auth", MIGRATIONS_BY_DIALECT)
        if isinstance(db, PostgresDatabase):
            secret = (await shared_secret(db, "session")).encode()
        else:
            secret = load_secret(data_dir)
        auth = cls(db, data_dir, secret)
        await auth.ensure_admin()
        return auth

    @property
    def password_file(self) -> Path:
        return self.data_dir / PASSWORD_FILE

    # --- the admin account ---------------------------------------------------------------
    async def ensure_admin(self) -> None:
        """The first start's admin password. Nodes of a cluster starting together race here:
        the insert of one waits for the other's commit and then does nothing, so only the
        node whose password was stored writes its file (any other would not log in)."""
        async with self.db.conn.execute("SELECT 1 FROM auth_admin WHERE id = 1") as cur:
            if await cur.fetchone():
                return
        password = secrets.token_urlsafe(15)
        stored = await asyncio.to_thread(hash_password, password)
        insert = await self.db.conn.execute(
            "INSERT INTO auth_admin (id, password_hash, changed) VALUES (1, ?, ?)"
            " ON CONFLICT (id) DO NOTHING",
            (stored, time.time()),
        )
        if not insert.rowcount:  # another node's password is stored
            await self.db.conn.commit()
            return
        try:
            _write_once(self.password_file, f"{password}\n".encode())
        except BaseException:
            await self.db.conn.rollback()
            raise
        await self.db.conn.commit()
        log.warning(
            "first start: the generated admin password is in %s (readable by the service user "
            "only); log in at /admin and change it",
            self.password_file,
        )

    async def reset_password(self) -> Path:
        """A new random password (lost password): hash stored, clear text in the 0600 file,
        every session ended. Returns the file's path."""
        password = secrets.token_urlsafe(15)
        stored = await asyncio.to_thread(hash_password, password)
        self.password_file.unlink(missing_ok=True)
        _write_once(self.password_file, f"{password}\n".encode())
        await self.db.conn.execute(
            "INSERT INTO auth_admin (id, password_hash, changed) VALUES (1, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET password_hash = excluded.password_hash,"
            " changed = excluded.changed",
            (stored, time.time()),
        )
        await self.db.conn.execute("DELETE FROM auth_sessions")
        await self.db.conn.commit()
        log.warning("the admin password was reset; the new one is in %s", self.password_file)
        return self.password_file

    async def check_password(self, password: object) -> bool:
        if not isinstance(password, str) or not password or len(password) > MAX_PASSWORD:
            return False
        async with self.db.conn.execute("SELECT password_hash FROM auth_admin WHERE id = 1") as cur:
            row = await cur.fetchone()
        if row is None:
            return False
        return await asyncio.to_thread(verify_password, password, str(row[0]))

    async def change_password(self, current: object, new: object, keep_session: str) -> None:
        if not await self.check_password(current):
            raise AuthError(403, "wrong_password", "the current password is wrong")
        password = check_new_password(new)
        if password == current:
            raise AuthError(400, "weak_password", "the new password is the current one")
        stored = await asyncio.to_thread(hash_password, password)
        await self.db.conn.execute(
            "UPDATE auth_admin SET password_hash = ?, changed = ? WHERE id = 1",
            (stored, time.time()),
        )
        # every other session ends with the old password
        await self.db.conn.execute("DELETE FROM auth_sessions WHERE id_hash != ?", (keep_session,))
        await self.db.conn.commit()
        self.password_file.unlink(missing_ok=True)
        log.info("the admin password was changed")

    # --- sessions --------------------------------------------------------------------------
    async def create_session(self, ip: str) -> str:
        """A new session; returns the signed cookie value."""
        sid = secrets.token_urlsafe(32)
        now = time.time()
        await self.db.conn.execute(
            "DELETE FROM auth_sessions WHERE last_seen < ? OR created < ?",
            (now - SESSION_IDLE, now - SESSION_MAX_AGE),
        )
        await self.db.conn.execute(
            "INSERT INTO auth_sessions (id_hash, created, last_seen, ip) VALUES (?, ?, ?, ?)",
            (_sha256(sid), now, now, ip[:64]),
        )
        await self.db.conn.commit()
        return self._signer.sign(sid).decode()

    async def session(self, cookie: str | None) -> Session | None:
        """The session of a cookie value, or None (bad signature, expired, logged out)."""
        if not cookie or len(cookie) > 256:
            return None
        try:
            sid = self._signer.unsign(cookie, max_age=SESSION_MAX_AGE).decode()
        except (BadSignature, UnicodeDecodeError):
            return None
        id_hash = _sha256(sid)
        now = time.time()
        async with self.db.conn.execute(
            "SELECT created, last_seen FROM auth_sessions WHERE id_hash = ?", (id_hash,)
        ) as cur:
            row = await cur.fetchone()
        if row is None or row[1] < now - SESSION_IDLE or row[0] < now - SESSION_MAX_AGE:
            return None
        if now - row[1] > 60:  # touch at most once a minute
            await self.db.conn.execute(
                "UPDATE auth_sessions SET last_seen = ? WHERE id_hash = ?", (now, id_hash)
            )
            await self.db.conn.commit()
        return Session(id_hash, self.csrf_token(id_hash), float(row[0]))

    async def end_session(self, session: Session) -> None:
        await self.db.conn.execute(
            "DELETE FROM auth_sessions WHERE id_hash = ?", (session.id_hash,)
        )
        await self.db.conn.commit()

    def csrf_token(self, session_hash: str) -> str:
        return hmac.new(self.secret, f"csrf:{session_hash}".encode(), "sha256").hexdigest()

    @staticmethod
    def check_csrf(expected: str, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())

    # --- API keys --------------------------------------------------------------------------
    async def create_key(self, name: str) -> tuple[dict[str, Any], str]:
        """A new key: (its listing row, the key in clear — shown once, never stored)."""
        prefix = secrets.token_hex(4)
        key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
        key_id = uuid.uuid4().hex
        now = time.time()
        await self.db.conn.execute(
            "INSERT INTO api_keys (id, name, prefix, key_hash, created) VALUES (?, ?, ?, ?, ?)",
            (key_id, name, prefix, _sha256(key), now),
        )
        await self.db.conn.commit()
        log.info("created API key %s (%s)", prefix, name)
        row = {
            "id": key_id,
            "name": name,
            "prefix": f"{KEY_PREFIX}{prefix}",
            "created": now,
            "last_used": None,
            "revoked": None,
        }
        return row, key

    async def list_keys(self) -> list[dict[str, Any]]:
        async with self.db.conn.execute(
            "SELECT id, name, prefix, created, last_used, revoked FROM api_keys"
            " ORDER BY created DESC"
        ) as cur:
            rows = [dict(r) for r in await cur.fetchall()]
        for row in rows:
            row["prefix"] = f"{KEY_PREFIX}{row['prefix']}"
            row["last_used"] = self._key_used.get(row["id"], row["last_used"])
        return rows

    async def revoke_key(self, key_id: str) -> bool:
        cur = await self.db.conn.execute(
            "UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
            (time.time(), key_id),
        )
        await self.db.conn.commit()
        if cur.rowcount:
            log.info("revoked API key %s", key_id)
        return cur.rowcount > 0

    async def verify_key(self, key: str) -> str | None:
        """The id of a valid, unrevoked key, or None."""
        parts = key.split("_")
        if len(key) > 128 or len(parts) < 3 or not key.startswith(KEY_PREFIX):
            return None
        prefix = parts[1]
        async with self.db.conn.execute(
            "SELECT id, key_hash, revoked, last_used FROM api_keys WHERE prefix = ?", (prefix,)
        ) as cur:
            row = await cur.fetchone()
        if row is None or row["revoked"] is not None:
            return None
        if not hmac.compare_digest(str(row["key_hash"]), _sha256(key)):
            return None
        key_id = str(row["id"])
        now = time.time()
        last = self._key_used.get(key_id, row["last_used"] or 0.0)
        self._key_used[key_id] = now
        if now - last > 60:  # write the last use at most once a minute per key
            await self.db.conn.execute(
                "UPDATE api_keys SET last_used = ? WHERE id = ?", (now, key_id)
            )
            await self.db.conn.commit()
        return key_id


async def reset_admin_password(database_url: str, db_path: Path, data_dir: Path) -> Path:
    """`whisper-appliance reset-admin-password`: works while the service runs (SQLite WAL, or
    the cluster's PostgreSQL when `database_url` is set: the password file is then written on
    the node where the command runs, and every node's sessions end)."""
    db = await open_database(database_url, db_path)
    try:
        auth = await Auth.open(db, data_dir)
        return await auth.reset_password()
    finally:
        await db.close()
