"""The release tree under the install root (default /opt/whisper-appliance, the Ansible role's):

    releases/<version>/venv/   one virtual environment per release (pip --no-index)
    releases/<version>/manifest.json   what was installed, for audit
    current -> releases/<version>   the active release (the unit runs current/venv/bin/...)
    backups/appliance-<version>-<time>.db   SQLite backups taken when leaving <version>
    update-journal.json   every switch (from, to, the backup taken): what a rollback goes to
    staging/   verified downloads and unpacked wheelhouses (removed afterwards)

Install, switch and prune; and what a rollback goes to, from root's own state only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.system.update import spool as update_spool
from appliance.system.update.errors import UpdateRefused
from appliance.system.update.release import MANIFEST, VerifiedRelease, unpack_wheelhouse
from appliance.system.update.version import VersionError, release_name_ok, version_key

DEFAULT_ROOT = Path("/opt/whisper-appliance")
JOURNAL = "update-journal.json"  # under the install root: root's own record of every switch
JOURNAL_MAX_BYTES = 1024 * 1024
JOURNAL_ENTRIES = 200
# a database backup's name, as _backup_db makes them
_BACKUP_NAME = re.compile(r"^appliance-[0-9A-Za-z.+-]{1,100}\.db$")
_BACKUP_STAMP = r"-(\d{8}T\d{6}Z)(?:-(\d+))?\.db"


class ReleaseTree:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.releases = root / "releases"
        self.current_link = root / "current"
        self.backups = root / "backups"

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

    def journal_add(
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

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".update.lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UpdateRefused("another update or rollback is running") from None
            yield

    def switch(self, release: Path) -> None:
        """Point `current` at the release atomically (rename over the old link)."""
        tmp = self.root / f".current.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:  # relative, as the tests copy roots around; Ansible's absolute links work too
            target = release.resolve().relative_to(self.root.resolve())
        except ValueError:
            target = release.resolve()
        tmp.symlink_to(target)
        tmp.replace(self.current_link)

    def install(self, rel: VerifiedRelease, stage: Path, python: str) -> Path:
        """Install a verified release beside the running one: releases/<version>/venv."""
        version = rel.manifest.version
        wheelhouse = stage / "wheelhouse"
        unpack_wheelhouse(rel.tarball, wheelhouse)
        rel.tarball.unlink()
        target = self.releases / version
        if target.exists():  # a leftover of a failed attempt, or an old kept release
            shutil.rmtree(target)
        target.mkdir(parents=True)
        try:
            pip = [
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
            ]
            steps = [[python, "-I", "-m", "venv", str(target / "venv")]]
            lock = wheelhouse / "requirements.lock"
            if lock.is_file():
                # the release's pins with their hashes first (the lock came in the verified
                # tarball), then the appliance's own wheel alone: its hash is not in the lock
                steps += [
                    [*pip, "--require-hashes", "-r", str(lock)],
                    [*pip, "--no-deps", f"whisper-appliance=={version}"],
                ]
            else:  # a release built before the locks carried hashes
                steps.append([*pip, f"whisper-appliance=={version}"])
            for argv in steps:
                result = subprocess.run(
                    argv,
                    capture_output=True,
                    text=True,
                    env=_pip_env(),
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

    def rollback_target(self) -> tuple[str, Path | None] | None:
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
        return newest.name, self.last_backup_of(newest.name)

    def last_backup_of(self, version: str) -> Path | None:
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

    def prune(self, protect: set[str], keep: int) -> None:
        """Keep `keep` releases (those in `protect` first) and `keep` database backups."""
        releases = [p for p in self.releases.iterdir() if p.is_dir() and p.name not in protect]
        releases = [p for p in releases if not p.name.startswith(".")]
        releases.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        room = max(0, keep - len(protect))
        for old in releases[room:]:
            shutil.rmtree(old, ignore_errors=True)
        if self.backups.is_dir():
            backups = sorted(self.backups.glob("appliance-*.db"), key=lambda p: p.stat().st_mtime)
            for old in backups[: max(0, len(backups) - keep)]:
                old.unlink(missing_ok=True)


def _pip_env() -> dict[str, str]:
    # a machine-wide PIP_FIND_LINKS/PIP_INDEX_URL must not leak into an offline install
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def python_version(python: str) -> str:
    """The `major.minor` of an interpreter (a release is built for one)."""
    out = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def _lstat_is(path: Path, kind: Any) -> bool:
    """Whether `path` itself (not what a link points to) is of `kind` (stat.S_ISDIR, ...)."""
    try:
        return bool(kind(path.lstat().st_mode))
    except OSError:
        return False


def _safe_key(name: str) -> tuple[Any, ...]:
    try:
        return (0, version_key(name))
    except VersionError:
        return (1, name)
