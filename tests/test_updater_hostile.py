"""The root updater against its own service user (issue 12, findings 1, 2 and 6).

The updater runs as root; the web service runs as a less privileged user that owns DATA_DIR:
the database (with the update history), the request spool, everything beside them. These
tests play that user for real: the data directory and the database belong to `nobody`, forged
history rows and planted links are made by a `/usr/bin/python3` process running as `nobody`,
the rollback is asked for through the spool and carried out by the updater's own
`run_request`, and the restart command records where `current` pointed at each start (what
the unit would have run as root). A small HTTP server stands in for the service's /health and
/transcribe, answering with the version `current` points at.

What must hold: the rollback target and the backup it restores come from root-owned state only;
nothing root does in DATA_DIR follows a link; a malformed request of any depth or size is
refused with a status.json, and nothing outside the refused request changes.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shlex
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.system.update import cli as update_cli
from appliance.system.update import health, releases, updater
from appliance.system.update import history as update_history
from appliance.system.update import spool as update_spool
from appliance.system.update.history import UpdateHistory
from appliance.system.update.updater import Config, Updater

SERVICE_UID = SERVICE_GID = 65534  # nobody: the service user
HEX = "0123456789abcdef" * 2
BACKUP_100 = "appliance-1.0.0-20260101T000000Z.db"
JOURNAL = "update-journal.json"  # root's record of every switch, under the install root

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="plays root and the service user: needs root"
)


# --- the stand-in service ----------------------------------------------------------------------
class _Service(http.server.BaseHTTPRequestHandler):
    root: Path

    def _answer(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer({"status": "ok", "version": (self.root / "current").resolve().name})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._answer({"text": ""})

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Host:
    base: Path
    root: Path
    data: Path
    secret: Path  # root-only: a SQLite file and a plain file
    evil: Path  # a directory of the service user's, shaped like a release
    starts_log: Path
    upd: Updater

    @property
    def spool(self) -> Path:
        return self.data / update_spool.SPOOL

    @property
    def db(self) -> Path:
        return self.data / update_history.DB_NAME

    def starts(self) -> list[str]:
        """Where `current` pointed each time the service was (re)started."""
        if not self.starts_log.exists():
            return []
        return self.starts_log.read_text().split()

    def as_service_user(self, code: str, *args: str) -> None:
        """Run Python as the service user (no root groups), in the data directory."""
        subprocess.run(
            ["/usr/bin/python3", "-I", "-c", code, *args],
            user=SERVICE_UID,
            group=SERVICE_GID,
            extra_groups=[],
            cwd=self.data,
            check=True,
            timeout=60,
        )

    def forge_row(self, from_version: str, db_backup: str | None) -> None:
        """The service user's insert: a 'succeeded' switch to the current release."""
        row = {
            "started": 1.0,
            "finished": 2.0,
            "action": "apply",
            "from_version": from_version,
            "to_version": "1.1.0",
            "status": "succeeded",
            "db_backup": db_backup,
        }
        self.as_service_user(
            "import json, sqlite3, sys\n"
            "row = json.loads(sys.argv[1])\n"
            "db = sqlite3.connect('appliance.db')\n"
            "db.execute('INSERT INTO update_history (started, finished, action, from_version,'\n"
            "           ' to_version, status, db_backup) VALUES (:started, :finished, :action,'\n"
            "           ' :from_version, :to_version, :status, :db_backup)', row)\n"
            "db.commit()\n",
            json.dumps(row),
        )

    def ask(self, action: str = "rollback", to_version: str | None = None) -> None:
        """The web process's request, written as the service user."""
        req = {
            "id": HEX,
            "action": action,
            "source": None,
            "to_version": to_version,
            "requested_at": 1.0,
        }
        self.write_request(json.dumps(req).encode())

    def write_request(self, raw: bytes, name: str = update_spool.REQUEST) -> None:
        path = self.spool / name
        path.write_bytes(raw)
        os.chown(path, SERVICE_UID, SERVICE_GID)

    def run(self) -> tuple[int, dict[str, Any]]:
        code = update_cli.run_request(self.upd)
        status = update_spool.read_status(self.spool)
        assert status is not None, "no status.json"
        left = sorted(p.name for p in self.spool.iterdir() if p.name != update_spool.STATUS)
        assert left == [], left  # the request was consumed
        return code, status

    def tables(self) -> set[str]:
        with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as db:
            return {r[0] for r in db.execute("SELECT name FROM sqlite_master")}


def _sqlite(path: Path, table: str, value: str) -> None:
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"CREATE TABLE {table} (v TEXT)")
        db.execute(f"INSERT INTO {table} VALUES (?)", (value,))  # noqa: S608 - our own names
        db.commit()


def tree(top: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under `top` (itself included): type, mode, owner, link target, content."""
    state: dict[str, tuple[Any, ...]] = {}
    for path in [top, *sorted(top.rglob("*"))]:
        if path.name == ".update.lock":
            continue
        st = path.lstat()
        entry: tuple[Any, ...] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid)
        if path.is_symlink():
            entry += (str(path.readlink()),)
        elif stat.S_ISREG(st.st_mode):
            entry += (hashlib.sha256(path.read_bytes()).hexdigest(),)
        state[str(path.relative_to(top))] = entry
    return state


@pytest.fixture
def host() -> Iterator[Host]:
    """An install root with releases 1.0.0 and 1.1.0 (current, reached from 1.0.0 by the
    updater: journal entry and backup), DATA_DIR owned by the service user, a running stand-in
    service, and root-only files the service user must never reach through the updater."""
    base = Path(tempfile.mkdtemp(prefix="updater-hostile-"))
    base.chmod(0o755)  # the service user must reach its data directory
    root, data, secret = base / "opt", base / "data", base / "secret"
    for version in ("1.0.0", "1.1.0"):
        (root / "releases" / version / "venv" / "bin").mkdir(parents=True)
    (root / "current").symlink_to(Path("releases/1.1.0"))
    (root / "backups").mkdir(mode=0o700)
    _sqlite(root / "backups" / BACKUP_100, "backup_of_100", "what 1.0.0 left")
    (root / "backups" / BACKUP_100).chmod(0o600)

    secret.mkdir(mode=0o700)
    _sqlite(secret / "root-only.db", "secret", "root only")
    (secret / "root-only.db").chmod(0o600)
    (secret / "root-file").write_text("root's\n")
    (secret / "root-file").chmod(0o644)

    data.mkdir(mode=0o750)
    os.chown(data, SERVICE_UID, SERVICE_GID)
    evil = data / "evil"
    (evil / "venv" / "bin").mkdir(parents=True)
    (evil / "venv" / "bin" / "python").write_text("#!/bin/sh\necho owned\n")
    for path in (evil, evil / "venv", evil / "venv" / "bin", evil / "venv" / "bin" / "python"):
        os.chown(path, SERVICE_UID, SERVICE_GID)

    handler = type("Service", (_Service,), {"root": root})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    starts = base / "starts.log"
    record = f"readlink -f {shlex.quote(str(root / 'current'))} >> {shlex.quote(str(starts))}"
    cfg = Config(
        root=root,
        data_dir=data,
        key_dir=base / "keys",
        restart_command=f"/bin/sh -c {shlex.quote(record)}",
        stop_command="true",
        url=f"http://127.0.0.1:{server.server_address[1]}",
        health_timeout=5,
    )
    h = Host(base, root, data, secret, evil, starts, Updater(cfg))
    try:
        # the service made its database; the updater wrote the history of 1.0.0 -> 1.1.0
        h.as_service_user(
            "import sqlite3\n"
            "db = sqlite3.connect('appliance.db')\n"
            "db.execute('PRAGMA journal_mode=WAL')\n"
            "db.execute('CREATE TABLE live (v TEXT)')\n"
            "db.execute(\"INSERT INTO live VALUES ('the live database')\")\n"
            "db.commit()\n"
        )
        h.upd.store.record(
            None,
            action="apply",
            from_version="1.0.0",
            to_version="1.1.0",
            status="succeeded",
            db_backup=str(root / "backups" / BACKUP_100),
        )
        switch = {"action": "apply", "from_version": "1.0.0", "to_version": "1.1.0"}
        journal = {"switches": [{**switch, "at": 1.0, "db_backup": BACKUP_100}]}
        (root / JOURNAL).write_text(json.dumps(journal))
        (root / JOURNAL).chmod(0o600)
        update_spool.prepare(data)
        os.chown(h.spool, SERVICE_UID, SERVICE_GID)
        assert h.db.stat().st_uid == SERVICE_UID
        yield h
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(base, ignore_errors=True)


def _release(h: Host, version: str) -> str:
    return str((h.root / "releases" / version).resolve())


# --- finding 1: the rollback target and its backup come from root-owned state only -------------
def _user_owned_release(h: Host) -> str:
    """A version-named directory in releases/ that is the service user's, not root's."""
    path = h.root / "releases" / "9.9.9"
    path.mkdir()
    os.chown(path, SERVICE_UID, SERVICE_GID)
    return "9.9.9"


def _linked_release(h: Host) -> str:
    """A version-named link in releases/ to the service user's directory."""
    (h.root / "releases" / "9.9.8").symlink_to(h.evil)
    return "9.9.8"


FORGED_TARGETS = {
    "relative path": lambda h: "../../data/evil",
    "absolute path": lambda h: str(h.evil),
    "service user's directory": _user_owned_release,
    "link to the service user's directory": _linked_release,
}


@needs_root
@pytest.mark.parametrize("forged", list(FORGED_TARGETS), ids=list(FORGED_TARGETS))
def test_a_forged_history_row_never_chooses_the_rollback_target(host: Host, forged: str) -> None:
    from_version = FORGED_TARGETS[forged](host)
    outside = {"evil": tree(host.evil), "secret": tree(host.secret)}
    host.forge_row(from_version, str(host.secret / "root-only.db"))
    host.ask("rollback")
    code, status = host.run()

    assert code == updater.EXIT_OK
    assert (status["state"], status["to_version"]) == ("succeeded", "1.0.0"), status
    # root started the service only from installed, root-owned releases
    assert host.starts() == [_release(host, "1.0.0")]
    assert (host.root / "current").readlink() == Path("releases/1.0.0")
    # the backup restored is the one root took when leaving 1.0.0, not the forged path
    tables = host.tables()
    assert "backup_of_100" in tables and "secret" not in tables, tables
    assert {"evil": tree(host.evil), "secret": tree(host.secret)} == outside
    # the database stays the service user's; the backup root took of it is root's alone
    for path in host.data.glob("appliance.db*"):
        assert path.lstat().st_uid == SERVICE_UID, path
    saved = sorted((host.root / "backups").glob("appliance-1.1.0-before-rollback-*.db"))
    assert len(saved) == 1
    assert (saved[0].stat().st_uid, stat.S_IMODE(saved[0].stat().st_mode)) == (0, 0o600)
    with closing(sqlite3.connect(saved[0])) as db:
        assert db.execute("SELECT v FROM live").fetchall() == [("the live database",)]
    # the history shows the forged row (for people to read) and the real rollback
    latest = host.upd.history()[0]
    assert (latest["action"], latest["to_version"], latest["status"]) == (
        "rollback",
        "1.0.0",
        "succeeded",
    )


@needs_root
def test_a_forged_backup_path_is_never_restored_without_a_journal(host: Host) -> None:
    """No journal (a release installed before it existed): the target is the newest other
    installed release and the backup the newest of root's own taken when it was left."""
    (host.root / JOURNAL).unlink()
    older = "appliance-1.0.0-20250101T000000Z.db"
    _sqlite(host.root / "backups" / older, "older_backup", "older")
    host.forge_row("1.0.0", str(host.secret / "root-only.db"))
    outside = tree(host.secret)
    host.ask("rollback")
    code, status = host.run()
    assert (code, status["state"], status["to_version"]) == (0, "succeeded", "1.0.0"), status
    tables = host.tables()
    assert "backup_of_100" in tables, tables
    assert not {"secret", "older_backup"} & tables, tables
    assert tree(host.secret) == outside


@needs_root
@pytest.mark.parametrize("forged", list(FORGED_TARGETS), ids=list(FORGED_TARGETS))
def test_a_rollback_to_anything_but_an_installed_release_is_refused(
    host: Host, forged: str
) -> None:
    """`rollback --to X` (the command line: the spool refuses such versions before this)."""
    to_version = FORGED_TARGETS[forged](host)
    before = {"root": tree(host.root), "data": tree(host.data), "secret": tree(host.secret)}
    outcome = host.upd.rollback(to_version)
    assert outcome.status == "refused", outcome
    assert "not an installed release" in outcome.message
    assert host.starts() == []
    history = host.upd.history()
    assert [h["status"] for h in history] == ["succeeded"]
    assert {"root": tree(host.root), "data": tree(host.data), "secret": tree(host.secret)} == (
        before
    )


@needs_root
def test_the_journal_is_root_state_a_forged_one_is_not_read(host: Host) -> None:
    """The journal is trusted only as a regular file of root's: one the service user could
    have written (or a link to one) counts as empty."""
    assert releases.JOURNAL == JOURNAL
    forged = host.data / "journal.json"
    forged.write_text(
        json.dumps({"switches": [{"from_version": "../../data/evil", "to_version": "1.1.0"}]})
    )
    os.chown(forged, SERVICE_UID, SERVICE_GID)
    journal = host.root / JOURNAL
    journal.unlink()
    journal.symlink_to(forged)
    assert host.upd.journal() == []
    journal.unlink()
    shutil.copy(forged, journal)
    os.chown(journal, SERVICE_UID, SERVICE_GID)
    assert host.upd.journal() == []
    os.chown(journal, 0, 0)  # root's own: read, but its names are still checked
    assert host.upd.journal()[0]["from_version"] == "../../data/evil"
    target = host.upd.tree.rollback_target()
    assert target is not None and target[0] == "1.0.0"


# --- finding 2: nothing root does in DATA_DIR follows a link -----------------------------------
def _plant(h: Host, name: str, target: Path) -> None:
    code = f"import os\nos.symlink({str(target)!r}, {name!r})\n"
    if name == update_history.DB_NAME:  # the live database replaced by a link
        code = "import os\nos.unlink('appliance.db')\n" + code
    h.as_service_user(code)


LINKS = {
    # the report's case: root chowned the release directory to the service user
    "db-journal to a release": ("appliance.db-journal", lambda h: h.root / "releases" / "1.0.0"),
    "db-wal to a root file": ("appliance.db-wal", lambda h: h.secret / "root-file"),
    "db-shm to a root file": ("appliance.db-shm", lambda h: h.secret / "root-file"),
    "database to a root-only database": ("appliance.db", lambda h: h.secret / "root-only.db"),
}


@needs_root
@pytest.mark.parametrize("planted", list(LINKS), ids=list(LINKS))
def test_links_planted_in_data_dir_are_never_followed(host: Host, planted: str) -> None:
    name, target = LINKS[planted]
    if name != "appliance.db-journal":  # WAL side files exist while the service runs
        for side in ("-wal", "-shm"):
            (host.data / f"appliance.db{side}").unlink(missing_ok=True)
    _plant(host, name, target(host))
    before = {"root": tree(host.root), "secret": tree(host.secret)}
    host.ask("rollback")
    code, status = host.run()

    # nothing of root's was chowned, chmodded, written or read into the data dir ...
    assert {"root": tree(host.root), "secret": tree(host.secret)} == before
    assert host.starts() == []  # ... nor was the service stopped, switched or restarted
    assert code == updater.EXIT_OK
    assert status["state"] == "refused", status
    assert "not a plain file" in status["message"], status
    assert (host.data / name).is_symlink()
    # and reading the history or the status as root does not follow it either
    assert host.upd.history() == []
    assert host.upd.status()["rollback_to"] == "1.0.0"
    assert {"root": tree(host.root), "secret": tree(host.secret)} == before


@needs_root
def test_a_link_swapped_in_after_the_check_reaches_only_the_service_users_files(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the checks cannot close (a link swapped in between the check and SQLite's
    open): root opens the database with the service user's rights, so the link leads nowhere
    the service user could not go itself."""
    monkeypatch.setattr(UpdateHistory, "check_db_files", lambda self: True)  # the check lost
    for side in ("-wal", "-shm"):
        (host.data / f"appliance.db{side}").unlink(missing_ok=True)
    _plant(host, "appliance.db", host.secret / "root-only.db")
    before = tree(host.secret)
    assert host.upd.history() == []  # unreadable to the service user
    host.upd.record_refused("request", "after the swap")  # not written into root's file
    with pytest.raises(sqlite3.Error):
        host.upd._backup_db("1.1.0")  # root's file is not copied into a backup
    for backup in (host.root / "backups").iterdir():
        with closing(sqlite3.connect(backup)) as db:
            assert not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'secret'").fetchall()
    assert tree(host.secret) == before


@needs_root
def test_without_setuid_capabilities_root_carries_on_with_the_checks(
    host: Host, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An appliance whose unit predates CAP_SETUID/CAP_SETGID: the rollback still works (as
    root, the checks alone guarding DATA_DIR) and the database stays the service user's."""

    def refuse(groups: list[int]) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setgroups", refuse)
    host.ask("rollback")
    code, status = host.run()
    assert (code, status["state"], status["to_version"]) == (0, "succeeded", "1.0.0"), status
    assert "working on DATA_DIR as root" in capsys.readouterr().err
    assert "backup_of_100" in host.tables()
    for path in host.data.glob("appliance.db*"):
        assert path.lstat().st_uid == SERVICE_UID, path


@needs_root
def test_fix_owner_changes_only_plain_files_through_descriptors(host: Host) -> None:
    """Root-made database files go to the service user; a link under such a name is left."""
    wal = host.data / "appliance.db-wal"
    wal.unlink(missing_ok=True)
    wal.write_bytes(b"")  # as root, as SQLite would make it
    (host.data / "appliance.db-journal").symlink_to(host.root / "releases" / "1.0.0")
    host.upd.store.fix_owner()
    assert (host.root / "releases" / "1.0.0").stat().st_uid == 0
    assert (wal.stat().st_uid, stat.S_IMODE(wal.stat().st_mode)) == (SERVICE_UID, 0o600)


@needs_root
def test_a_status_json_link_is_replaced_not_followed(host: Host) -> None:
    _plant(host, f"{update_spool.SPOOL}/{update_spool.STATUS}", host.secret / "root-file")
    before = tree(host.secret)
    host.write_request(b"{")
    code, status = host.run()
    assert (code, status["state"]) == (updater.EXIT_OK, "refused")
    assert not (host.spool / update_spool.STATUS).is_symlink()
    assert (host.spool / update_spool.STATUS).stat().st_uid == SERVICE_UID
    assert tree(host.secret) == before


# --- finding 6: a malformed request of any depth or size is refused with a status.json ----------
NESTED = {
    "nested array": b"[" * 5000,
    "nested object": b'{"a":' * 1300 + b"1" + b"}" * 1300,
    "nested in a field": b'{"id": ' + b"[" * 4000 + b"]" * 4000 + b"}",
    "oversized": b'{"id": "' + b"x" * (update_spool.MAX_REQUEST_BYTES * 8) + b'"}',
    "oversized and nested": b"[" * (update_spool.MAX_REQUEST_BYTES * 4),
}
REASONS = {
    "nested array": "nested deeper",
    "nested object": "nested deeper",
    "nested in a field": "nested deeper",
    "oversized": "larger than",
    "oversized and nested": "larger than",
}


@pytest.fixture
def plain_host(tmp_path: Path) -> Updater:
    """The updater over a temporary root and data dir (no root needed)."""
    data = tmp_path / "data"
    (tmp_path / "opt" / "releases" / "1.0.0").mkdir(parents=True)
    (tmp_path / "opt" / "current").symlink_to(Path("releases/1.0.0"))
    update_spool.prepare(data)
    cfg = Config(
        root=tmp_path / "opt",
        data_dir=data,
        key_dir=tmp_path / "keys",
        restart_command="false",
        stop_command="false",
    )
    return Updater(cfg)


@pytest.mark.parametrize("what", list(NESTED), ids=list(NESTED))
def test_nested_or_oversized_requests_are_refused_with_a_status(
    plain_host: Updater, what: str
) -> None:
    upd = plain_host
    spool = upd.cfg.spool_dir
    before = tree(upd.cfg.root)
    (spool / update_spool.REQUEST).write_bytes(NESTED[what])
    code = update_cli.run_request(upd)
    assert code == updater.EXIT_OK
    status = update_spool.read_status(spool)
    assert status is not None
    assert status["state"] == "refused", status
    assert REASONS[what] in status["message"], status
    assert [p.name for p in spool.iterdir()] == [update_spool.STATUS]
    assert tree(upd.cfg.root) == before
    row = upd.history()[0]
    assert (row["status"], row["action"]) == ("refused", "request")


@pytest.mark.parametrize("what", list(NESTED), ids=list(NESTED))
def test_a_nested_leftover_request_is_reported_as_interrupted(
    plain_host: Updater, what: str
) -> None:
    """A request left `processing-…` by a crash is read again: any content is survived."""
    upd = plain_host
    spool = upd.cfg.spool_dir
    (spool / "processing-0123456789abcdef.json").write_bytes(NESTED[what])
    assert update_cli.run_request(upd) == updater.EXIT_OK
    status = update_spool.read_status(spool)
    assert status is not None and status["state"] == "failed", status
    assert "interrupted" in status["message"]
    assert [p.name for p in spool.iterdir()] == [update_spool.STATUS]


def test_a_nested_health_answer_is_no_answer() -> None:
    """/health is answered by the service (the service user's code): bounded like a request."""
    for body in (b"[" * 100_000, b'{"version": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"):
        assert health._json_field(httpx.Response(200, content=body), "version") is None
    assert health._json_field(httpx.Response(200, json={"version": "1.0"}), "version") == "1.0"


def test_load_json_counts_depth_outside_strings_only() -> None:
    assert update_spool.json_depth('{"a": "[[[[{{{{\\"]]"}') == 1
    assert update_spool.json_depth("[[1], [[2]]]") == 3
    deep = "[" * (update_spool.MAX_JSON_DEPTH + 1) + "]" * (update_spool.MAX_JSON_DEPTH + 1)
    with pytest.raises(update_spool.RequestError, match="nested deeper"):
        update_spool.load_json(deep.encode(), 1 << 20)
    ok = "[" * update_spool.MAX_JSON_DEPTH + "]" * update_spool.MAX_JSON_DEPTH
    assert update_spool.load_json(ok.encode(), 1 << 20) is not None
    with pytest.raises(update_spool.RequestError, match="not valid JSON"):
        update_spool.load_json(b"\xff", 10)
