"""`python -m appliance.updater` (the compatibility name): apply, rollback, status, and
`run-request`, what whisper-appliance-update.service runs for the admin panel's request."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from appliance.exceptions import ConfigError
from appliance.system.update import spool as update_spool
from appliance.system.update.updater import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_ROLLBACK_FAILED,
    Config,
    Outcome,
    Updater,
)


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

    try:
        cfg = Config.from_env()
    except ConfigError as exc:  # one line naming the variable, not a traceback
        print(f"updater: configuration error: {exc}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    raise SystemExit(main())
