"""`whisper-appliance` command: serve, and model chores for administrators."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from appliance import __version__
from appliance.system import logging_setup
from appliance.system.config import ConfigError, Settings


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        print(f"whisper-appliance: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whisper-appliance", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve the UI and API (configured by environment variables)")
    sub.add_parser("models", help="list the model catalogue and what is on this machine")
    imp = sub.add_parser("import-model", help="install a model from a directory or archive")
    imp.add_argument("name")
    imp.add_argument("path", type=Path)
    dl = sub.add_parser("download-model", help="download a catalogue model from the model hub")
    dl.add_argument("name")
    sub.add_parser(
        "reset-admin-password",
        help="lost password: set a new random admin password (written to DATA_DIR, 0600)",
    )
    args = parser.parse_args(argv)
    settings = _settings()
    # structured logging (issue 6): key=value on stdout, JSON lines in DATA_DIR/logs
    logging_setup.configure(settings, file=args.command == "serve")
    if args.command == "serve":
        from appliance.web.server import serve

        try:
            asyncio.run(serve(settings))
        except ConfigError as exc:  # e.g. a custom certificate whose key does not match
            logging.getLogger("appliance").critical("cannot start: %s", exc)
            print(f"whisper-appliance: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "reset-admin-password":
        from appliance.core.auth import reset_admin_password
        from appliance.core.db import StartupError

        try:
            path = asyncio.run(
                reset_admin_password(settings.database_url, settings.db_path, settings.data_dir)
            )
        except StartupError as exc:  # the database is unreachable or unusable
            print(f"whisper-appliance: {exc}", file=sys.stderr)
            return 1
        print(f"new admin password written to {path}")
        return 0
    from appliance.core.engines import create_engine
    from appliance.core.model_manager import ModelError, ModelManager

    engine = create_engine(
        settings.engine,
        compute_type=settings.compute_type,
        cpu_threads=1,
        workers=1,
        cache_dir=settings.data_dir / "cache",
    )
    manager = ModelManager(engine, settings.models_dir, hub_url=settings.model_hub_url)
    try:
        if args.command == "models":
            print(json.dumps(manager.status(), indent=2))
        elif args.command == "import-model":
            print(manager.import_model(args.name, args.path))
        elif args.command == "download-model":
            print(asyncio.run(manager.download(args.name, lambda p: print(f"{p:5.1f}%", end="\r"))))
    except ModelError as exc:
        print(f"whisper-appliance: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
