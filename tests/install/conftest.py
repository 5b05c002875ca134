"""install.sh's end-to-end tests create and boot LXC containers (minutes, root): test_install_sh.py
is collected only when selected with `-m install` (`make test-install`), never by a plain `pytest`.
The static checks beside it run everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name == "test_install_sh.py" and "install" not in (
        config.option.markexpr or ""
    ):
        return True
    return None
