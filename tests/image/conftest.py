"""CT image tests create and boot LXC containers from the built template (minutes, root): they
are collected only when selected with `-m image` (`make test-image`), never by a plain `pytest`."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name.startswith("test_") and "image" not in (config.option.markexpr or ""):
        return True
    return None
