"""The updater end to end on a real install root: real signed releases (keys made here), real
virtual environments installed offline with pip, a real service process restarted through the
pluggable restart command, real /health and test-transcription requests, a real SQLite backup
and restore.

The service is a stand-in (tests/test_release.py builds it into a real `whisper-appliance`
wheel): a tiny HTTP server with /health and /transcribe that writes to the database at start the
way a schema migration would. The real appliance wheelhouse is ~330 MB with model wheels and
takes minutes per install on a 2-core machine; what the updater does with a release (verify,
unpack, venv + pip --no-index, switch, restart, check, roll back) is the same for both, and
tests/container/ already proves the real wheelhouse installs and transcribes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.system.update import cli as update_cli
from appliance.system.update import spool as update_spool
from appliance.system.update import updater
from appliance.system.update.release import build_release
from appliance.system.update.updater import Config, Updater
from tests.conftest import Server, free_port, serve_directory, start_server, stop_server
from tests.test_release import make_keys, make_wheelhouse

pytestmark = pytest.mark.slow

JFK_WORDS = "ask not what your country can do for you"

SERVICE = r'''
"""Test service manager: `service.py STATE_DIR ROOT DATA_DIR PORT stop|restart`."""
import os, signal, subprocess, sys, time
from pathlib import Path

state, root, data, port, action = sys.argv[1:6]
pidfile = Path(state) / "service.pid"


def alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop():
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
    pidfile.unlink()


if action in ("stop", "restart"):
    stop()
if action == "restart":
    env = {**os.environ, "DATA_DIR": data, "HTTPS_PORT": port, "HTTPS_ENABLED": "false"}
    python = Path(root) / "current" / "venv" / "bin" / "python"
    with open(Path(state) / "service.log", "ab") as log:
        proc = subprocess.Popen(
            [str(python), "-m", "wa_standin", "serve"], env=env, stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    pidfile.write_text(str(proc.pid))
'''


@dataclass
class Appliance:
    base: Path
    root: Path
    data: Path
    private: Path
    updater: Updater

    @property
    def url(self) -> str:
        return self.updater.cfg.url

    def service(self, action: str) -> None:
        cmd = (
            self.updater.cfg.restart_command
            if action == "restart"
            else (self.updater.cfg.stop_command)
        )
        subprocess.run(cmd.split(), check=True, timeout=60)

    def health(self) -> dict[str, object]:
        r = httpx.get(f"{self.url}/health", timeout=5)
        return {"code": r.status_code, **r.json()}

    def pid(self) -> str:
        return (self.base / "service.pid").read_text()

    def release(self, version: str, *, broken: bool = False, bundle: bool = False) -> Path:
        wheelhouse = make_wheelhouse(self.base / f"wh-{version}", version, broken=broken)
        out = self.base / ("upload" if bundle else f"rel-{version}")
        return build_release(wheelhouse, out, self.private, bundle=bundle)

    def runs(self) -> list[str]:
        with closing(sqlite3.connect(self.data / "appliance.db")) as db:
            return [r[0] for r in db.execute("SELECT version FROM standin_runs")]


def _config(base: Path, port: int, clip: Path) -> Config:
    svc = f"{sys.executable} {base / 'service.py'} {base} {base / 'root'} {base / 'data'} {port}"
    return Config(
        root=base / "root",
        data_dir=base / "data",
        key_dir=base / "keys" / "release-trusted",
        restart_command=f"{svc} restart",
        stop_command=f"{svc} stop",
        url=f"http://127.0.0.1:{port}",
        keep=2,
        health_timeout=8,
        clip=clip,
        expect=JFK_WORDS,
    )


def _wait_healthy(url: str, version: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200 and r.json()["version"] == version:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not healthy on {version}")


@pytest.fixture(scope="session")
def installed_template(tmp_path_factory: pytest.TempPathFactory, jfk_wav: Path) -> Path:
    """Release 1.0.0 installed by the updater itself into an empty root (a first install)."""
    base = tmp_path_factory.mktemp("appliance")
    (base / "service.py").write_text(SERVICE)
    (base / "data").mkdir()
    private, _ = make_keys(base / "keys")
    wheelhouse = make_wheelhouse(base / "wh-1.0.0", "1.0.0")
    rel = build_release(wheelhouse, base / "rel-1.0.0", private)
    upd = Updater(_config(base, free_port(), jfk_wav))
    outcome = upd.apply(str(rel))
    subprocess.run(upd.cfg.stop_command.split(), check=True, timeout=60)
    assert outcome.status == "succeeded", outcome.message
    assert upd.current_version() == "1.0.0"
    assert (base / "root" / "current").readlink() == Path("releases/1.0.0")
    return base


@pytest.fixture
def appliance(installed_template: Path, tmp_path: Path, jfk_wav: Path) -> Iterator[Appliance]:
    """A copy of the installed template, its service running on a free port."""
    base = tmp_path / "a"
    shutil.copytree(installed_template, base, symlinks=True)
    app = Appliance(
        base, base / "root", base / "data", base / "keys" / "release.pem",
        Updater(_config(base, free_port(), jfk_wav)),
    )  # fmt: skip
    app.service("restart")
    _wait_healthy(app.url, "1.0.0")
    yield app
    app.service("stop")


def _snapshot(root: Path) -> dict[str, object]:
    state: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = ("link", str(path.readlink()))
        elif path.is_file():
            st = path.stat()
            state[rel] = ("file", st.st_size, st.st_mtime_ns)
        else:
            state[rel] = ("dir",)
    return state


def test_good_update_then_prune_then_manual_rollback(appliance: Appliance) -> None:
    upd = appliance.updater
    bundle = appliance.release("1.1.0", bundle=True)  # an air-gapped upload
    outcome = upd.apply(str(bundle.parent), consume=True)
    assert outcome.status == "succeeded", outcome.message
    assert (outcome.from_version, outcome.to_version) == ("1.0.0", "1.1.0")
    assert JFK_WORDS in outcome.message
    assert upd.current_version() == "1.1.0"
    assert appliance.health()["version"] == "1.1.0"
    assert list(bundle.parent.iterdir()) == []  # the upload was consumed
    assert upd.installed() == ["1.0.0", "1.1.0"]

    outcome = upd.apply(str(appliance.release("1.2.0")))
    assert outcome.status == "succeeded", outcome.message
    assert upd.installed() == ["1.1.0", "1.2.0"]  # keep=2: 1.0.0 pruned
    assert set(appliance.runs()) == {"1.0.0", "1.1.0", "1.2.0"}

    outcome = upd.rollback()
    assert outcome.status == "succeeded", outcome.message
    assert upd.current_version() == "1.1.0"
    assert appliance.health() == {"code": 200, "status": "ok", "version": "1.1.0"}
    # the database is the one 1.1.0 left behind (what 1.2.0 wrote is gone) ...
    assert "1.2.0" not in appliance.runs()
    # ... but the update history is whole
    history = upd.history()
    assert [(h["action"], h["to_version"], h["status"]) for h in history] == [
        ("rollback", "1.1.0", "succeeded"),
        ("apply", "1.2.0", "succeeded"),
        ("apply", "1.1.0", "succeeded"),
        ("apply", "1.0.0", "succeeded"),
    ]
    assert history[1]["from_version"] == "1.1.0"
    assert Path(history[1]["db_backup"]).is_file()


def test_broken_release_rolls_back_by_itself(appliance: Appliance) -> None:
    upd = appliance.updater
    before = appliance.runs()
    outcome = upd.apply(str(appliance.release("1.1.0", broken=True)))
    assert outcome.status == "rolled_back", outcome.message
    assert outcome.exit_code == updater.EXIT_FAILED
    assert "not healthy on 1.1.0" in outcome.message
    assert upd.current_version() == "1.0.0"
    assert appliance.health() == {"code": 200, "status": "ok", "version": "1.0.0"}
    assert upd.installed() == ["1.0.0"]  # the broken release is gone
    # the broken release did start and write to the database; the backup was restored
    assert "1.1.0" not in appliance.runs()
    assert appliance.runs() == [*before, "1.0.0"]
    history = upd.history()
    assert [(h["to_version"], h["status"]) for h in history] == [
        ("1.1.0", "rolled_back"),
        ("1.0.0", "succeeded"),
    ]
    assert "rolled back to 1.0.0" in history[0]["message"]


def _sign_with_untrusted_key(app: Appliance) -> Path:
    evil, _ = make_keys(app.base / "evil", "evil")
    wheelhouse = make_wheelhouse(app.base / "wh-evil", "1.1.0")
    return build_release(wheelhouse, app.base / "rel-evil", evil)


def _tamper_tarball(app: Appliance) -> Path:
    rel = app.release("1.1.0")
    tarball = rel / "whisper-appliance-1.1.0.tar"
    data = bytearray(tarball.read_bytes())
    data[1024] ^= 0x01
    tarball.write_bytes(bytes(data))
    return rel


def _edit_manifest(app: Appliance) -> Path:
    rel = app.release("1.1.0")
    manifest = json.loads((rel / "manifest.json").read_text())
    manifest["min_from_version"] = "0.0.1"
    (rel / "manifest.json").write_text(json.dumps(manifest))
    return rel


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_sign_with_untrusted_key, "bad signature"),
        (_edit_manifest, "bad signature"),
        (_tamper_tarball, "checksum mismatch"),
    ],
)
def test_refused_before_anything_changes(appliance: Appliance, make: object, reason: str) -> None:
    assert callable(make)
    source = make(appliance)
    before, pid = _snapshot(appliance.root), appliance.pid()
    outcome = appliance.updater.apply(str(source))
    assert outcome.status == "refused"
    assert reason in outcome.message
    assert _snapshot(appliance.root) == before
    assert appliance.pid() == pid  # never stopped or restarted
    assert appliance.health()["version"] == "1.0.0"
    latest = appliance.updater.history()[0]
    assert (latest["status"], latest["to_version"]) == ("refused", None)
    assert reason in latest["message"]


def test_same_or_older_version_is_refused(appliance: Appliance) -> None:
    upd = appliance.updater
    before = _snapshot(appliance.root)
    for version, reason in (("1.0.0", "already the running"), ("0.9.0", "older than")):
        outcome = upd.apply(str(appliance.release(version)))
        assert outcome.status == "refused"
        assert reason in outcome.message
    assert _snapshot(appliance.root) == before


def test_command_line_status(appliance: Appliance, capsys: pytest.CaptureFixture[str]) -> None:
    code = update_cli.main(
        ["--root", str(appliance.root), "--data-dir", str(appliance.data), "status"]
    )
    assert code == 0
    status = json.loads(capsys.readouterr().out)
    assert status["current_version"] == "1.0.0"
    assert status["installed"] == ["1.0.0"]
    assert status["history"][0]["status"] == "succeeded"


def test_a_second_update_at_once_is_refused_and_its_upload_kept(appliance: Appliance) -> None:
    import fcntl

    bundle = appliance.release("1.1.0", bundle=True)
    with (appliance.root / ".update.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        outcome = appliance.updater.apply(str(bundle.parent), consume=True)
    assert outcome.status == "refused"
    assert "another update" in outcome.message
    assert bundle.exists()
    assert appliance.updater.current_version() == "1.0.0"


# --- the admin panel's path: request through the admin API, `run-request` as the unit runs it --
class Panel:
    """A real `whisper-appliance serve` over the appliance's data dir, logged in as admin."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=30)
        page = self.http.get("/admin/login")
        token = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert token
        password = (server.data_dir / "admin-password.txt").read_text().strip()
        r = self.http.post(
            "/admin/api/login", json={"password": password}, headers={"X-CSRF-Token": token[1]}
        )
        assert r.status_code == 200, r.text
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', self.http.get("/admin").text)
        assert csrf
        self.http.headers["X-CSRF-Token"] = csrf[1]

    def request(self, path: str, **kwargs: Any) -> dict[str, Any]:
        r = self.http.post(f"/admin/api/updates/{path}", **kwargs)
        assert r.status_code == 202, r.text
        req: dict[str, Any] = r.json()["request"]
        return req

    def state(self) -> dict[str, Any]:
        r = self.http.get("/admin/api/updates")
        assert r.status_code == 200, r.text
        state: dict[str, Any] = r.json()
        return state


def run_request(app: Appliance) -> subprocess.CompletedProcess[str]:
    """`python -m appliance.updater run-request` configured the way the unit's env files do."""
    cfg = app.updater.cfg
    env = {
        **os.environ,
        "UPDATER_ROOT": str(cfg.root),
        "DATA_DIR": str(cfg.data_dir),
        "UPDATER_KEY_DIR": str(cfg.key_dir),
        "UPDATER_RESTART_COMMAND": cfg.restart_command,
        "UPDATER_STOP_COMMAND": cfg.stop_command,
        "UPDATER_URL": cfg.url,
        "UPDATER_KEEP": str(cfg.keep),
        "UPDATER_HEALTH_TIMEOUT": str(cfg.health_timeout),
        "UPDATER_CLIP": str(cfg.clip),
        "UPDATER_EXPECT": cfg.expect or "",
    }
    return subprocess.run(
        [sys.executable, "-m", "appliance.updater", "run-request"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


@pytest.fixture
def panel(appliance: Appliance) -> Iterator[Panel]:
    served = appliance.base / "www"
    served.mkdir()
    with serve_directory(served) as url:
        server = start_server(
            appliance.data,
            env={"UPDATER_ROOT": str(appliance.root), "UPDATE_SOURCE": f"{url}/manifest.json"},
        )
        try:
            panel = Panel(server)
            try:
                yield panel
            finally:
                panel.http.close()
        finally:
            stop_server(server)


def _serve(app: Appliance, release: Path) -> None:
    www = app.base / "www"
    for old in www.iterdir():
        old.unlink()
    for path in release.iterdir():
        shutil.copy(path, www / path.name)


def test_admin_panel_upload_update_then_rollback(appliance: Appliance, panel: Panel) -> None:
    started = time.monotonic()
    bundle = appliance.release("1.1.0", bundle=True)
    with bundle.open("rb") as f:
        req = panel.request("upload", files={"file": (bundle.name, f, "application/x-tar")})
    assert panel.state()["state"] == "pending"
    spool = appliance.data / update_spool.SPOOL
    assert (spool / req["source"]).read_bytes() == bundle.read_bytes()

    result = run_request(appliance)
    assert result.returncode == 0, result.stdout + result.stderr
    state = panel.state()
    assert state["state"] == "idle" and state["pending"] is None
    status = state["status"]
    assert (status["id"], status["state"]) == (req["id"], "succeeded"), status
    assert (status["from_version"], status["to_version"]) == ("1.0.0", "1.1.0")
    assert JFK_WORDS in status["message"]
    assert state["releases"] == ["1.0.0", "1.1.0"]
    row = state["history"][0]
    assert (row["request_id"], row["status"], row["source"]) == (
        req["id"],
        "succeeded",
        req["source"],
    )
    assert appliance.health()["version"] == "1.1.0"
    assert sorted(p.name for p in spool.iterdir()) == ["status.json"]  # the upload is consumed

    # the default source: the release UPDATE_SOURCE offers
    _serve(appliance, appliance.release("1.2.0"))
    req = panel.request("apply", json={})
    assert req["source"].endswith("/manifest.json")
    assert run_request(appliance).returncode == 0
    assert panel.state()["status"]["state"] == "succeeded"
    assert appliance.health()["version"] == "1.2.0"

    req = panel.request("rollback", json={})
    result = run_request(appliance)
    assert result.returncode == 0, result.stdout + result.stderr
    state = panel.state()
    assert (state["status"]["id"], state["status"]["state"]) == (req["id"], "succeeded")
    assert state["status"]["to_version"] == "1.1.0"
    assert appliance.health()["version"] == "1.1.0"
    assert [(h["action"], h["to_version"], h["status"]) for h in state["history"][:3]] == [
        ("rollback", "1.1.0", "succeeded"),
        ("apply", "1.2.0", "succeeded"),
        ("apply", "1.1.0", "succeeded"),
    ]
    print(f"admin panel: upload, update, rollback in {time.monotonic() - started:.1f} s")


def test_admin_panel_broken_release_rolls_back_and_bad_signature_is_refused(
    appliance: Appliance, panel: Panel
) -> None:
    _serve(appliance, appliance.release("1.1.0", broken=True))
    req = panel.request("apply", json={})
    result = run_request(appliance)
    assert result.returncode == updater.EXIT_OK, result.stdout + result.stderr
    status = panel.state()["status"]
    assert (status["id"], status["state"]) == (req["id"], "rolled_back"), status
    assert "rolled back to 1.0.0" in status["message"]
    assert appliance.health()["version"] == "1.0.0"

    _serve(appliance, _sign_with_untrusted_key(appliance))
    before, pid = _snapshot(appliance.root), appliance.pid()
    req = panel.request("apply", json={})
    assert run_request(appliance).returncode == updater.EXIT_OK
    state = panel.state()
    assert (state["status"]["id"], state["status"]["state"]) == (req["id"], "refused")
    assert "bad signature" in state["status"]["message"]
    assert _snapshot(appliance.root) == before
    assert appliance.pid() == pid
    assert (state["history"][0]["request_id"], state["history"][0]["status"]) == (
        req["id"],
        "refused",
    )
