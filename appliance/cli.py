"""`whisper-appliance` command: serve, and model chores for administrators."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from appliance import __version__
from appliance.config import ConfigError, Settings


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
    args = parser.parse_args(argv)
    settings = _settings()
    logging.basicConfig(
        level=logging.DEBUG if settings.debug_mode else logging.INFO,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    if args.command == "serve":
        from appliance.server import serve

        asyncio.run(serve(settings))
        return 0
    from appliance.engines import create_engine
    from appliance.models import ModelError, ModelManager

    engine = create_engine(
        settings.engine, compute_type=settings.compute_type, cpu_threads=1, workers=1
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
