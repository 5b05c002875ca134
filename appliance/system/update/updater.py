"""The privileged side of self-update: install a signed release, switch to it, prove it works,
and go back to the previous release and database by itself when it does not.

Runs as root (the oneshot `whisper-appliance-update.service`, `cli`); the web process stays
unprivileged and only asks for an update (`spool`). The pieces: `release` (verify and unpack a
signed bundle), `releases` (the tree under the install root: install, switch, prune, the
journal), `history` (the update history in the service's database), `health` (the probe after
a switch); this module puts them together: apply and rollback.

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

import shlex
import shutil
import sqlite3
import subprocess
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from appliance.system.update.errors import UnsafeDataFile, UpdateFailed, UpdateRefused
from appliance.system.update.health import check_service
from appliance.system.update.history import UpdateHistory
from appliance.system.update.release import (
    MANIFEST,
    ReleaseError,
    fetch_verified,
    load_trusted_keys,
    staging_dir,
)
from appliance.system.update.releases import ReleaseTree, python_version
from appliance.system.update.settings import Config
from appliance.system.update.spool import BUNDLE_SUFFIX
from appliance.system.update.version import VersionError, version_key

EXIT_OK, EXIT_FAILED, EXIT_ROLLBACK_FAILED = 0, 1, 3


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


class Updater:
    """Apply and roll back: the release tree, the history store and the health probe together."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.tree = ReleaseTree(cfg.root)
        self.store = UpdateHistory(cfg.data_dir)

    # --- state (read) -------------------------------------------------------------------------
    def current_version(self) -> str | None:
        return self.tree.current_version()

    def installed(self) -> list[str]:
        return self.tree.installed()

    def journal(self) -> list[dict[str, Any]]:
        return self.tree.journal()

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        return self.store.rows(limit)

    def status(self, limit: int = 20) -> dict[str, Any]:
        target = self.tree.rollback_target()
        return {
            "current_version": self.tree.current_version(),
            "installed": self.tree.installed(),
            "rollback_to": target[0] if target else None,
            "history": self.store.rows(limit),
        }

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
        self.store.record(
            None,
            started=now,
            finished=now,
            action=action,
            from_version=self.tree.current_version(),
            to_version=to_version,
            source=source,
            status="refused",
            message=message,
            request_id=request_id,
        )

    def close_interrupted(self) -> int:
        """Mark attempts left `running` by a crash or a reboot as failed (under the lock)."""
        try:
            with self.tree.locked():
                return self.store.mark_interrupted()
        except (UpdateRefused, sqlite3.Error, OSError, RuntimeError):
            return 0  # a running update holds the lock: its row is not a leftover

    def _backup_db(self, label: str) -> Path | None:
        if not self.store.check_db_files():
            return None
        self.tree.backups.mkdir(parents=True, exist_ok=True)
        self.tree.backups.chmod(0o700)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.tree.backups / f"appliance-{label}-{stamp}.db"
        n = 1
        while dest.exists():
            n += 1
            dest = self.tree.backups / f"appliance-{label}-{stamp}-{n}.db"
        with closing(sqlite3.connect(dest)) as dst:
            # root's file, opened now; no journal beside it, so the copy below (made with the
            # service user's rights) writes only through this open file
            dst.execute("PRAGMA journal_mode=MEMORY")
            with self.store.as_data_owner(), closing(self.store.connect()) as src:
                src.backup(dst)
        dest.chmod(0o600)
        self.store.fix_owner()
        return dest

    def _restore_db(self, backup: Path) -> None:
        """Put the backup's content back into the live file, keeping the update history.
        `backup` is one of ours (`backup_file`), never a path read from the database."""
        if self.tree.backup_file(backup.name) != backup:
            raise UnsafeDataFile(f"{backup} is not a database backup of this updater")
        rows = self.store.rows(limit=1_000_000)
        # root's backup, opened (and read once) as root; read-only and immutable: nothing is
        # opened beside it while the live file is written with the service user's rights
        uri = f"file:{quote(str(backup))}?mode=ro&immutable=1"
        with closing(sqlite3.connect(uri, uri=True)) as src:
            src.execute("SELECT count(*) FROM sqlite_master").fetchone()
            with self.store.as_data_owner(), closing(self.store.connect()) as dst:
                src.backup(dst)
        self.store.replace_rows(rows)

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

    def _activate(self, release: Path, version: str, restore: Path | None) -> str:
        self._run(self.cfg.stop_command, "stop")
        if restore is not None:
            self._restore_db(restore)
        self.tree.switch(release)
        self._run(self.cfg.restart_command, "restart")
        return check_service(self.cfg, version)

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
            with self.tree.locked():
                try:
                    return self._apply(source, allow_downgrade, request_id, label)
                finally:
                    if consume:  # processed (whatever the outcome): never picked up twice
                        _consume(Path(source))
        except UpdateRefused as exc:  # the lock is taken: leave the upload for its turn
            return Outcome("refused", self.tree.current_version(), None, str(exc), EXIT_FAILED)

    def _apply(
        self, source: str, allow_downgrade: bool, request_id: str | None, label: str | None
    ) -> Outcome:
        previous = self.tree.current_release()
        from_version = previous.name if previous else None
        row = self.store.record(
            None,
            action="apply",
            from_version=from_version,
            source=label or source,
            status="running",
            request_id=request_id,
        )

        def refuse(message: str) -> Outcome:
            self.store.record(row, status="refused", finished=time.time(), message=message)
            return Outcome("refused", from_version, None, message, EXIT_FAILED)

        with staging_dir(self.tree.root / "staging") as stage:
            try:
                rel = fetch_verified(source, stage, load_trusted_keys(self.cfg.key_dir))
                manifest = rel.manifest
                self.store.record(row, to_version=manifest.version)
                self._check_versions(
                    manifest.version, manifest.min_from_version, from_version, allow_downgrade
                )
                python = python_version(self.cfg.python)
                if python != manifest.python:
                    raise UpdateRefused(
                        f"the release is built for Python {manifest.python}, "
                        f"{self.cfg.python} is {python}"
                    )
                self.store.check_db_files()
                new = self.tree.install(rel, stage, self.cfg.python)
            except (ReleaseError, UpdateRefused, httpx.HTTPError, OSError) as exc:
                return refuse(str(exc) or exc.__class__.__name__)
            except subprocess.SubprocessError as exc:
                return refuse(f"{exc.__class__.__name__}: {exc}")
        to_version = manifest.version
        backup: Path | None = None
        try:
            self._run(self.cfg.stop_command, "stop")
            backup = self._backup_db(from_version or "none")
            self.store.record(row, db_backup=str(backup) if backup else None)
            self.tree.switch(new)
            self._run(self.cfg.restart_command, "restart")
            message = check_service(self.cfg, to_version)
        except (UpdateFailed, OSError, sqlite3.Error) as exc:
            return self._roll_back_after(row, previous, new, backup, to_version, str(exc))
        if from_version is not None:
            self.tree.journal_add("apply", from_version, to_version, backup)
        self.store.record(row, status="succeeded", finished=time.time(), message=message)
        self.tree.prune({to_version} | ({from_version} if from_version else set()), self.cfg.keep)
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
        except VersionError:
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
            self.store.record(row, status="failed", finished=time.time(), message=msg)
            return Outcome("failed", None, to_version, msg, EXIT_ROLLBACK_FAILED)
        try:
            check = self._activate(previous, previous.name, backup)
        except (UpdateFailed, OSError, sqlite3.Error) as exc:
            msg = (
                f"{to_version} failed ({reason}); rolling back to {previous.name} failed too: {exc}"
            )
            self.store.record(row, status="rollback_failed", finished=time.time(), message=msg)
            return Outcome("rollback_failed", from_version, to_version, msg, EXIT_ROLLBACK_FAILED)
        shutil.rmtree(failed, ignore_errors=True)
        msg = f"{to_version} failed ({reason}); rolled back to {previous.name}: {check}"
        self.store.record(row, status="rolled_back", finished=time.time(), message=msg)
        return Outcome("rolled_back", from_version, to_version, msg, EXIT_FAILED)

    def rollback(
        self,
        to_version: str | None = None,
        *,
        keep_db: bool = False,
        request_id: str | None = None,
    ) -> Outcome:
        try:
            with self.tree.locked():
                return self._rollback(to_version, keep_db, request_id)
        except UpdateRefused as exc:
            return Outcome(
                "refused", self.tree.current_version(), to_version, str(exc), EXIT_FAILED
            )

    def _rollback(self, to_version: str | None, keep_db: bool, request_id: str | None) -> Outcome:
        current = self.tree.current_release()
        if current is None:
            raise UpdateRefused("no current release")
        target = self.tree.rollback_target()
        backup: Path | None = None
        if to_version is None:
            if target is None:
                raise UpdateRefused("no earlier release is installed")
            to_version, backup = target
        elif target is not None and target[0] == to_version:
            backup = target[1]
        release = self.tree.release_dir(to_version)
        if to_version == current.name or release is None:
            raise UpdateRefused(
                f"{str(to_version)[:80]!r} is not an installed release other than the current"
            )
        if keep_db:
            backup = None
        try:
            self.store.check_db_files()
        except UnsafeDataFile as exc:
            raise UpdateRefused(str(exc)) from None
        saved: Path | None = None
        row = self.store.record(
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
            self.store.record(row, db_backup=str(saved) if saved else None)
            message = self._activate(release, to_version, backup)
        except (UpdateFailed, OSError, sqlite3.Error) as exc:
            try:  # back to where we were, with the database as it was
                check = self._activate(current, current.name, saved if backup else None)
            except (UpdateFailed, OSError, sqlite3.Error) as exc2:
                msg = (
                    f"rollback to {to_version} failed ({exc}); "
                    f"restoring {current.name} failed: {exc2}"
                )
                self.store.record(row, status="rollback_failed", finished=time.time(), message=msg)
                return Outcome(
                    "rollback_failed", current.name, to_version, msg, EXIT_ROLLBACK_FAILED
                )
            msg = f"rollback to {to_version} failed ({exc}); still on {current.name}: {check}"
            self.store.record(row, status="failed", finished=time.time(), message=msg)
            return Outcome("failed", current.name, to_version, msg, EXIT_FAILED)
        restored = f"database restored from {backup.name}" if backup else "database kept"
        message = f"{message}; {restored}"
        self.tree.journal_add("rollback", current.name, to_version, saved)
        self.store.record(row, status="succeeded", finished=time.time(), message=message)
        return Outcome("succeeded", current.name, to_version, message)


def _consume(source: Path) -> None:
    """Remove a processed upload: the bundle file, or every bundle in an upload directory."""
    if source.is_file():
        source.unlink()
    elif source.is_dir() and not (source / MANIFEST).exists():
        for bundle in source.glob("*" + BUNDLE_SUFFIX):
            bundle.unlink()


__all__ = ["Config", "Outcome", "Updater"]
