"""Drive the appliance's self-update through its admin API, as the admin panel does: log in
(password on stdin), ask for an update or a rollback, wait until the root updater is done, and
print what the appliance reports then (JSON). Ansible asserts on it.

usage: update.py BASE_URL CA_FILE RELEASES_JSON ACTION [NAME]
  ACTION  upload NAME   upload the NAME release's bundle (POST /admin/api/updates/upload)
          url NAME      serve the releases directory over HTTP from this host (the address the
                        container reaches us on) and apply NAME from its URL (.../apply)
          rollback [VERSION]   the rollback button (.../rollback)
          state         just report
RELEASES_JSON is scripts/build_test_releases.py's index.
"""

from __future__ import annotations

import http.cookiejar
import json
import re
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TIMEOUT = 900  # one update: download, pip install offline, restart, health (+ rollback)
UNFINISHED = (None, "pending", "running")


class Admin:
    """A logged-in admin session (cookies + CSRF token); logs in again when it is gone (a
    rollback restores the database from before the session existed)."""

    def __init__(self, base: str, ca_file: str, password: str) -> None:
        self.base = base.rstrip("/")
        self.password = password
        self.context = ssl.create_default_context(cafile=ca_file)
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar),
            urllib.request.HTTPSHandler(context=self.context),
        )
        self.csrf = ""

    def _open(
        self, method: str, path: str, data: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        request = urllib.request.Request(  # noqa: S310 - the test's own https:// address
            self.base + path, data=data, method=method, headers=headers or {}
        )
        try:
            with self.opener.open(request, timeout=300) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def _token(self, path: str) -> str:
        status, body = self._open("GET", path)
        match = re.search(rb'name="csrf-token" content="([^"]+)"', body)
        if status != 200 or not match:
            raise SystemExit(f"GET {path}: HTTP {status}, no csrf-token")
        return match.group(1).decode()

    def login(self) -> None:
        self.jar.clear()
        token = self._token("/admin/login")
        body = json.dumps({"password": self.password}).encode()
        headers = {"Content-Type": "application/json", "X-CSRF-Token": token}
        status, answer = self._open("POST", "/admin/api/login", body, headers)
        if status != 200:
            raise SystemExit(f"admin login: HTTP {status}: {answer[:300]!r}")
        self.csrf = self._token("/admin/settings")

    def call(
        self, method: str, path: str, data: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        for attempt in (1, 2):
            status, body = self._open(
                method, path, data, {"X-CSRF-Token": self.csrf, **(headers or {})}
            )
            if status == 401 and attempt == 1:
                self.login()
                continue
            try:
                return status, json.loads(body) if body else None
            except ValueError:
                return status, body[:300].decode(errors="replace")
        raise AssertionError("unreachable")

    def post_json(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        body = json.dumps(payload).encode()
        return self.call("POST", path, body, {"Content-Type": "application/json"})

    def upload(self, path: str, bundle: Path) -> tuple[int, Any]:
        """Multipart `file`, streamed (a bundle is hundreds of MB)."""
        boundary = uuid.uuid4().hex
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{bundle.name}"\r\n'
            "Content-Type: application/x-tar\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def chunks() -> Iterator[bytes]:
            yield head
            with bundle.open("rb") as f:
                while chunk := f.read(1024 * 1024):
                    yield chunk
            yield tail

        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + bundle.stat().st_size + len(tail)),
        }
        return self.call("POST", path, chunks(), headers)

    def health(self) -> dict[str, Any]:
        request = urllib.request.Request(self.base + "/health")  # noqa: S310
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=30) as r:  # noqa: S310
                return {"http": r.status, **json.load(r)}
        except urllib.error.HTTPError as exc:
            return {"http": exc.code}


def serve(directory: Path, towards: str) -> tuple[ThreadingHTTPServer, str]:
    """An HTTP server over `directory` on this host's address on the route to `towards`."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((towards, 9))
        address = probe.getsockname()[0]
    handler = partial(SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    httpd = ThreadingHTTPServer((address, 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://{address}:{httpd.server_address[1]}"


def wait(admin: Admin, request_id: str | None) -> dict[str, Any]:
    """Poll GET /admin/api/updates until the request's outcome is there (the service restarts
    under us: connection errors are expected on the way)."""
    deadline = time.monotonic() + TIMEOUT
    last: Any = None
    while time.monotonic() < deadline:
        try:
            code, state = admin.call("GET", "/admin/api/updates")
        except (OSError, urllib.error.URLError) as exc:
            last = f"{exc.__class__.__name__}: {exc}"
        else:
            last = state
            status = state.get("status") if code == 200 and isinstance(state, dict) else None
            if (
                isinstance(status, dict)
                and status.get("id") == request_id
                and status.get("state") not in UNFINISHED
                and not state.get("pending")
            ):
                return state
        time.sleep(3)
    raise SystemExit(f"no outcome after {TIMEOUT} s; last answer: {str(last)[:2000]}")


def main() -> int:
    base, ca_file, index_file, action, *rest = sys.argv[1:]
    index = json.loads(Path(index_file).read_text())
    admin = Admin(base, ca_file, sys.stdin.readline().strip())
    admin.login()
    started = time.monotonic()
    code, before = admin.call("GET", "/admin/api/updates")
    if code != 200:
        raise SystemExit(f"GET /admin/api/updates: HTTP {code}: {before}")
    server = None
    try:
        if action == "upload":
            code, answer = admin.upload("/admin/api/updates/upload", Path(index[rest[0]]["path"]))
        elif action == "url":
            release = Path(index[rest[0]]["path"])
            server, url = serve(release.parent, urlsplit(base).hostname or "")
            code, answer = admin.post_json(
                "/admin/api/updates/apply", {"source": f"{url}/{release.name}/"}
            )
        elif action == "rollback":
            code, answer = admin.post_json(
                "/admin/api/updates/rollback", {"to_version": rest[0]} if rest else {}
            )
        elif action == "state":
            code, answer = 202, {"request": None}
        else:
            raise SystemExit(f"unknown action {action!r}")
        if code != 202:
            raise SystemExit(f"{action}: HTTP {code}: {answer}")
        request = answer.get("request") or {}
        after = wait(admin, request.get("id")) if request else before
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    previous_ids = {row["id"] for row in before.get("history", [])}
    print(
        json.dumps(
            {
                "seconds": round(time.monotonic() - started, 1),
                "request": request,
                "status": after.get("status"),
                "current_version": after.get("current_version"),
                "history": after.get("history", []),
                "new_rows": [r for r in after.get("history", []) if r["id"] not in previous_ids],
                "history_before": before.get("history", []),
                "health": admin.health(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
