"""Is a newer release available? Reads a JSON manifest from UPDATE_SOURCE (an http(s) URL, a
JSON file, or a directory holding `manifest.json`). Installing updates is another concern.

Manifest: `{"version": "0.2.0", "notes": "...", "url": "..."}` or
`{"releases": [{"version": ...}, ...]}` (the highest version counts).
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx

from appliance.exceptions import ApplianceError
from appliance.system.update.version import VersionError, version_key
from appliance.web.jsonbody import parse_json

MAX_MANIFEST = 1024 * 1024


class UpdateError(ApplianceError):
    """The update check failed (the source, or its manifest)."""

    status, code = 502, "update_check_failed"


async def _fetch(source: str) -> bytes:
    if re.match(r"^https?://", source):
        async with (
            httpx.AsyncClient(timeout=10, follow_redirects=True) as client,
            client.stream("GET", source) as response,
        ):
            if response.status_code != 200:
                raise UpdateError(f"the update source answered HTTP {response.status_code}")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data.extend(chunk)
                if len(data) > MAX_MANIFEST:
                    raise UpdateError("the manifest is larger than 1 MiB")
            return bytes(data)
    return await asyncio.to_thread(_read_local, source)


def _read_local(source: str) -> bytes:
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise UpdateError(f"no manifest at {path}")
    if path.stat().st_size > MAX_MANIFEST:
        raise UpdateError("the manifest is larger than 1 MiB")
    return path.read_bytes()


def latest_release(manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise UpdateError("the manifest is not a JSON object")
    releases = manifest.get("releases", [manifest])
    if not isinstance(releases, list):
        raise UpdateError("'releases' is not a list")
    valid = []
    for entry in releases:
        if isinstance(entry, dict) and isinstance(entry.get("version"), str):
            try:
                valid.append((version_key(entry["version"]), entry))
            except VersionError:
                continue
    if not valid:
        raise UpdateError("the manifest names no release version")
    return max(valid, key=lambda item: item[0])[1]


async def check(source: str, current: str) -> dict[str, Any]:
    result: dict[str, Any] = {
        "current_version": current,
        "latest_version": None,
        "update_available": False,
        "source": source or None,
        "notes": None,
        "url": None,
        "checked_at": time.time(),
        "error": None,
    }
    if not source:
        result["error"] = "no update source configured (UPDATE_SOURCE)"
        return result
    try:
        release = latest_release(parse_json(await _fetch(source), max_bytes=MAX_MANIFEST))
        result["latest_version"] = release["version"]
        notes, url = release.get("notes"), release.get("url")
        result["notes"] = notes[:4000] if isinstance(notes, str) else None
        result["url"] = url if isinstance(url, str) and re.match(r"^https?://", url) else None
        try:
            newer = version_key(release["version"]) > version_key(current)
        except VersionError:
            newer = False
        result["update_available"] = newer
    except (UpdateError, httpx.HTTPError, OSError, ValueError) as exc:
        result["error"] = f"cannot check for updates: {exc.__class__.__name__}: {exc}"[:500]
    return result
