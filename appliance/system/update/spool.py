"""The update request spool: how the unprivileged web process asks the root updater for an
update or a rollback, and how it learns the outcome.

`DATA_DIR/update-requests/` (0700, the service user's) holds at most one request:

    upload-<hex>.release.tar   an uploaded release bundle (written by the web process)
    request.json               {"id", "action", "source", "to_version", "requested_at"}
    processing-<hex>.json      the request, renamed by the updater when it takes it
    status.json                {"id", "state", "message", "from_version", "to_version", ...}

The systemd path unit starts `whisper-appliance-update.service` (root) when request.json or a
processing file exists. The updater treats everything here as hostile: it works through a
directory file descriptor, opens nothing through a symlink, and validates the request with
`parse_request` below (the web process validates with the same rules before writing).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.exceptions import ApplianceError
from appliance.system.update.version import release_name_ok

SPOOL = "update-requests"
REQUEST = "request.json"
STATUS = "status.json"
PROCESSING_PREFIX = "processing-"
UPLOAD_PREFIX = "upload-"
BUNDLE_SUFFIX = ".release.tar"  # an uploaded release bundle (appliance.system.update.release)
MAX_ARTIFACT = 8 * 1024**3  # the largest release wheelhouse the updater takes
ACTIONS = ("apply", "rollback")
MAX_REQUEST_BYTES = 8 * 1024
MAX_STATUS_BYTES = 64 * 1024
MAX_URL = 2048
MAX_MESSAGE = 2000
MAX_JSON_DEPTH = 16  # a request is flat; status.json one level deeper

_ID = re.compile(r"^[0-9a-f]{16,64}$")
_UPLOAD = re.compile(r"^upload-[0-9a-f]{16,64}\.release\.tar$")
_PROCESSING = re.compile(r"^processing-[0-9a-f]{16}\.json$")
_TMP = ".tmp-"


class RequestError(ApplianceError, ValueError):
    """A request that must not be acted on (bad JSON, field, source or version)."""

    status, code = 400, "invalid_request"


class SpoolBusy(ApplianceError):
    """A request is pending or running already."""

    status, code = 409, "update_pending"


@dataclass(frozen=True)
class UpdateRequest:
    id: str
    action: str
    source: str | None
    to_version: str | None
    requested_at: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def upload(self) -> str | None:
        """The spool file name of an uploaded bundle, None for a URL or a rollback."""
        return self.source if self.source and _UPLOAD.match(self.source) else None


def is_upload(name: str) -> bool:
    return bool(_UPLOAD.match(name))


def new_id() -> str:
    return secrets.token_hex(16)


def upload_name(request_id: str) -> str:
    return f"{UPLOAD_PREFIX}{request_id}{BUNDLE_SUFFIX}"


def check_url(value: object) -> str:
    """An http(s) URL with a host and nothing odd in it (it ends up in root's hands)."""
    if not isinstance(value, str) or not value or len(value) > MAX_URL:
        raise RequestError(f"a source URL is a string of 1 to {MAX_URL} characters")
    if any(ord(c) <= 32 or ord(c) == 127 for c in value):
        raise RequestError("a source URL has no spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise RequestError("not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError("the source must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise RequestError("a source URL carries no user name or password")
    return value


def check_version(value: object) -> str:
    if not release_name_ok(value):
        raise RequestError("a version looks like 1.2.3 (digits, letters, '.', '+', '-')")
    assert isinstance(value, str)
    return value


def make_request(
    action: str,
    source: str | None = None,
    to_version: str | None = None,
    request_id: str | None = None,
) -> UpdateRequest:
    """A new, validated request (the web side)."""
    req = UpdateRequest(request_id or new_id(), action, source, to_version, round(time.time(), 3))
    return _validate(req)


def parse_request(raw: bytes) -> UpdateRequest:
    """Validate a request file's bytes (the root side: every field is untrusted)."""
    data = load_json(raw, MAX_REQUEST_BYTES, what="the request")
    if not isinstance(data, dict):
        raise RequestError("the request is not a JSON object")
    unknown = set(data) - {"id", "action", "source", "to_version", "requested_at"}
    if unknown:
        raise RequestError(f"unknown request fields: {', '.join(sorted(unknown))[:200]}")
    requested_at = data.get("requested_at")
    if isinstance(requested_at, bool) or not isinstance(requested_at, int | float):
        raise RequestError("requested_at is a number")
    req = UpdateRequest(
        data.get("id"),  # type: ignore[arg-type]  # checked by _validate
        data.get("action"),  # type: ignore[arg-type]
        data.get("source"),
        data.get("to_version"),
        float(requested_at),
    )
    return _validate(req)


def load_json(raw: bytes, limit: int, *, what: str = "the JSON") -> Any:
    """Parse untrusted JSON bytes, bounded: RequestError (a ValueError) when they are larger than
    `limit` bytes, nested deeper than MAX_JSON_DEPTH, not UTF-8 or not JSON. Never a
    RecursionError: the depth is counted before the parser sees the text."""
    if len(raw) > limit:
        raise RequestError(f"{what} is larger than {limit} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{what} is not valid JSON (not UTF-8)") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise RequestError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise RequestError(f"{what} is not valid JSON") from None


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in `text` (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _validate(req: UpdateRequest) -> UpdateRequest:
    if not isinstance(req.id, str) or not _ID.match(req.id):
        raise RequestError("the request id is 16 to 64 lowercase hex digits")
    if req.action not in ACTIONS:
        raise RequestError(f"unknown action {str(req.action)[:40]!r}: apply or rollback")
    if req.to_version is not None:
        check_version(req.to_version)
    if req.action == "rollback":
        if req.source is not None:
            raise RequestError("a rollback has no source")
        return req
    if req.source is None:
        raise RequestError("an update needs a source: a URL or an uploaded bundle")
    if isinstance(req.source, str) and "/" not in req.source:
        if not _UPLOAD.match(req.source):
            raise RequestError("an uploaded bundle is named upload-<hex>.release.tar")
        return req
    check_url(req.source)
    return req


# --- the web side ------------------------------------------------------------------------------
def spool_dir(data_dir: Path) -> Path:
    return data_dir / SPOOL


def ensure(data_dir: Path) -> Path:
    """The spool directory, created private (0700) if missing."""
    spool = spool_dir(data_dir)
    if not spool.is_dir():
        spool.mkdir(parents=True, exist_ok=True)
        spool.chmod(0o700)
    return spool


def prepare(data_dir: Path) -> Path:
    """At start: create the spool (0700) and remove uploads no request refers to (a crash
    between upload and request left them). Only at start: a request may be under way later."""
    spool = spool_dir(data_dir)
    spool.mkdir(parents=True, exist_ok=True)
    spool.chmod(0o700)
    if busy(spool) is None:
        for path in spool.iterdir():
            if path.name.startswith((UPLOAD_PREFIX, _TMP)) and not path.is_dir():
                path.unlink(missing_ok=True)
    return spool


def busy(spool: Path) -> str | None:
    """'pending' (request.json waits), 'running' (the updater has it), or None."""
    if (spool / REQUEST).exists() or (spool / REQUEST).is_symlink():
        return "pending"
    if any(_PROCESSING.match(p.name) for p in _entries(spool)):
        return "running"
    status = read_status(spool)
    if status is not None and status.get("state") == "running":
        return "running"
    return None


def submit(spool: Path, req: UpdateRequest) -> None:
    """Write request.json atomically, never over another request (SpoolBusy)."""
    tmp = spool / f"{_TMP}{req.id}"
    with tmp.open("x", encoding="utf-8") as out:
        json.dump(req.as_dict(), out)
    try:
        os.link(tmp, spool / REQUEST)  # atomic, and fails when a request is there already
    except FileExistsError:
        raise SpoolBusy("an update request is pending") from None
    finally:
        tmp.unlink(missing_ok=True)


def read_pending(spool: Path) -> dict[str, Any] | None:
    try:
        return parse_request(_read_small(spool / REQUEST, MAX_REQUEST_BYTES)).as_dict()
    except (OSError, RequestError):
        return None


def read_status(spool: Path) -> dict[str, Any] | None:
    try:
        data = load_json(_read_small(spool / STATUS, MAX_STATUS_BYTES), MAX_STATUS_BYTES)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _entries(spool: Path) -> list[Path]:
    try:
        return list(spool.iterdir())
    except OSError:
        return []


def _read_small(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"{path.name} is larger than {limit} bytes")
    return data


# --- the root side: everything goes through the spool's directory descriptor -----------------
class Spool:
    """The spool opened by the updater (root): no symlink is followed, nothing leaves it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        st = os.fstat(self.fd)
        self.uid, self.gid = st.st_uid, st.st_gid

    def close(self) -> None:
        os.close(self.fd)

    def names(self) -> list[str]:
        return os.listdir(self.fd)  # noqa: PTH208 - a directory descriptor, not a path

    def processing_leftovers(self) -> list[str]:
        return sorted(n for n in self.names() if n.startswith(PROCESSING_PREFIX))

    def take(self) -> str | None:
        """Rename request.json to a processing name (atomic: taken once); None if none."""
        name = f"{PROCESSING_PREFIX}{secrets.token_hex(8)}.json"
        try:
            os.rename(REQUEST, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except FileNotFoundError:
            return None
        return name

    def open_regular(self, name: str) -> int:
        """An fd of a regular file directly in the spool, owned by the spool's owner, one link."""
        if "/" in name or name in ("", ".", ".."):
            raise RequestError(f"{name[:80]!r} is not a file name in the spool")
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            raise RequestError(f"{name[:80]} is not in the spool") from None
        except OSError as exc:  # ELOOP: a symlink
            raise RequestError(f"{name[:80]}: not a regular file ({exc.strerror})") from None
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "not a regular file"
        elif st.st_nlink != 1:
            problem = "a hard link"
        elif st.st_uid not in (self.uid, os.geteuid()):
            problem = "owned by another user"
        if problem:
            os.close(fd)
            raise RequestError(f"{name[:80]} is {problem}")
        return fd

    def read_request(self, name: str) -> bytes:
        fd = self.open_regular(name)
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_REQUEST_BYTES + 1)
        if len(raw) > MAX_REQUEST_BYTES:
            raise RequestError(f"the request is larger than {MAX_REQUEST_BYTES} bytes")
        return raw

    def remove(self, name: str) -> None:
        """Remove a file, or a directory planted in its place (a hostile request)."""
        with contextlib.suppress(FileNotFoundError):
            try:
                os.unlink(name, dir_fd=self.fd)
            except IsADirectoryError:
                shutil.rmtree(name, dir_fd=self.fd)

    def write_status(self, status: dict[str, Any]) -> None:
        """status.json, atomically (tmp + rename), readable by the web process (its owner's)."""
        tmp = f"{_TMP}status-{secrets.token_hex(8)}"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640, dir_fd=self.fd
        )
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(status, out)
                out.flush()
                if os.geteuid() == 0:
                    os.fchown(out.fileno(), self.uid, self.gid)
            os.rename(tmp, STATUS, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            raise
