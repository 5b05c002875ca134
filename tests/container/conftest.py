"""Container tests build and run a real image (minutes, root, podman): they are collected only
when selected with `-m container` (`make test-container`), never by a plain `pytest`."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name.startswith("test_") and "container" not in (
        config.option.markexpr or ""
    ):
        return True
    return None
