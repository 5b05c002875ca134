"""Structured logging: key=value lines on stdout (journald), JSON lines in a rotating file.

Every record carries the request id of the request or websocket it belongs to (`X-Request-ID`
is accepted from the client when sane, generated otherwise, and echoed back). Secrets are
scrubbed from the rendered line (API keys, bearer tokens, password fields) as a last line of
defence: the code never logs them on purpose, and transcripts are only logged at DEBUG.
`DEBUG_MODE=true` lowers the level to DEBUG. The admin panel reads the file's tail.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import logging.handlers
import re
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from quart import Quart, Response, g, request, websocket

from appliance.system.config import Settings
from appliance.web.security import client_ip

LOG_FILE = "appliance.log"
MAX_BYTES = 5 * 1024 * 1024
BACKUPS = 5
QUIET_PATHS = ("/health", "/static/", "/admin/api/status", "/admin/api/models")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SECRETS = (
    (re.compile(r"wa_[A-Za-z0-9]{8}_[A-Za-z0-9_-]{16,}"), "wa_[REDACTED]"),
    (re.compile(r"(?i)(bearer\s+)[^\s\"',]+"), r"\1[REDACTED]"),
    (
        re.compile(r"(?i)((?:password|passwd|secret|token|api_key)\"?\s*[=:]\s*\"?)[^\s\"',}]+"),
        r"\1[REDACTED]",
    ),
)


def scrub(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def _timestamp(record: logging.LogRecord) -> str:
    moment = dt.datetime.fromtimestamp(record.created, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=INFO logger=appliance.x request_id=... msg="..."` (logfmt)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        parts = [
            f"ts={_timestamp(record)}",
            f"level={record.levelname}",
            f"logger={record.name}",
            f"request_id={getattr(record, 'request_id', '-')}",
            f"msg={json.dumps(message, ensure_ascii=False)}",
        ]
        return scrub(" ".join(parts))


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(entry, ensure_ascii=False))


class RecentErrors(logging.Handler):
    """The last warnings and errors, for the admin status page."""

    def __init__(self, size: int = 50) -> None:
        super().__init__(level=logging.WARNING)
        self.entries: deque[dict[str, Any]] = deque(maxlen=size)
        self.setFormatter(JSONFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.entries.append(json.loads(self.format(record)))
        except Exception:  # a log handler must never raise
            self.handleError(record)


recent_errors = RecentErrors()
_installed: list[logging.Handler] = []


def log_path(settings: Settings) -> Path:
    return settings.data_dir / "logs" / LOG_FILE


def _file_handler(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
    )
    path.chmod(0o600)
    handler.setFormatter(JSONFormatter())
    handler.addFilter(_ContextFilter())
    handler.set_name(f"appliance-file:{path}")
    return handler


def configure(settings: Settings, *, stdout: bool = True, file: bool = True) -> None:
    """Set up the process's logging (the `serve` command; CLI chores pass file=False so a
    chore run as root never leaves a log file the service user cannot append to)."""
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed.clear()
    root.setLevel(logging.DEBUG if settings.debug_mode else logging.INFO)
    if stdout:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(KeyValueFormatter())
        console.addFilter(_ContextFilter())
        _installed.append(console)
    if file:
        try:
            _installed.append(_file_handler(log_path(settings)))
        except OSError as exc:  # a read-only data dir must not stop the service
            print(f"whisper-appliance: no log file: {exc}", file=sys.stderr)
    recent_errors.addFilter(_ContextFilter())
    _installed.append(recent_errors)
    for handler in _installed:
        root.addHandler(handler)
    # noisy libraries stay at WARNING unless debugging
    for name in ("httpx", "httpcore", "faster_whisper", "hypercorn.access"):
        logging.getLogger(name).setLevel(logging.DEBUG if settings.debug_mode else logging.WARNING)


def _has_file_handler(path: Path) -> bool:
    name = f"appliance-file:{path}"
    return any(h.get_name() == name for h in logging.getLogger().handlers)


def tail(settings: Settings, *, lines: int = 200, level: str = "DEBUG") -> list[dict[str, Any]]:
    """The last `lines` records at or above `level` from the log file (newest last)."""
    path = log_path(settings)
    if not path.is_file():
        return []
    threshold = logging.getLevelName(level.upper())
    threshold = threshold if isinstance(threshold, int) else logging.DEBUG
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 1024 * 1024))
        data = f.read().decode("utf-8", errors="replace")
    out: list[dict[str, Any]] = []
    for line in data.splitlines()[::-1]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        value = logging.getLevelName(str(entry.get("level", "INFO")))
        if isinstance(entry, dict) and isinstance(value, int) and value >= threshold:
            out.append(entry)
            if len(out) >= lines:
                break
    return out[::-1]


def init_app(app: Quart) -> None:
    """Request ids and one access line per request; the log file also under `create_app`."""
    settings: Settings = app.extensions["settings"]
    access = logging.getLogger("appliance.access")
    attached: list[logging.Handler] = []

    @app.before_serving
    async def _attach_file() -> None:
        # `whisper-appliance serve` configured logging already; tests and embedders did not
        path = log_path(settings)
        if not _has_file_handler(path):
            try:
                handler = _file_handler(path)
            except OSError:
                return
            logging.getLogger().addHandler(handler)
            attached.append(handler)
            if recent_errors not in logging.getLogger().handlers:
                logging.getLogger().addHandler(recent_errors)
                attached.append(recent_errors)
            ours = logging.getLogger("appliance")
            if ours.level == logging.NOTSET:  # the root's WARNING would hide INFO
                ours.setLevel(logging.DEBUG if settings.debug_mode else logging.INFO)

    @app.after_serving
    async def _detach_file() -> None:
        while attached:
            handler = attached.pop()
            logging.getLogger().removeHandler(handler)
            if handler is not recent_errors:
                handler.close()

    def _start(headers_id: str | None) -> None:
        rid = headers_id if headers_id and _REQUEST_ID.match(headers_id) else uuid.uuid4().hex[:16]
        request_id.set(rid)
        g.request_id = rid
        g.request_started = time.perf_counter()

    @app.before_request
    async def _before_request() -> None:
        _start(request.headers.get("X-Request-ID"))

    @app.before_websocket
    async def _before_websocket() -> None:
        _start(websocket.headers.get("X-Request-ID"))
        access.info("websocket %s from %s", websocket.path, client_ip(websocket))

    @app.after_request
    async def _after_request(response: Response) -> Response:
        rid = getattr(g, "request_id", None)
        if rid:
            response.headers["X-Request-ID"] = rid
        started = getattr(g, "request_started", None)
        ms = (time.perf_counter() - started) * 1000 if started else 0.0
        level = (
            logging.DEBUG
            if response.status_code < 400 and request.path.startswith(QUIET_PATHS)
            else logging.INFO
        )
        # the path only: query strings may carry search terms or tokens
        access.log(
            level,
            "%s %s %d %.1fms ip=%s",
            request.method,
            request.path,
            response.status_code,
            ms,
            client_ip(request),
        )
        return response
