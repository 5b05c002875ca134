"""The per-component schema bookkeeping both SQLite users share: the service's database
(`appliance.core.db`, aiosqlite) and the updater's history (`appliance.system.update.history`,
sqlite3 as root). Plain SQL text only, so either side drives it with its own connection.

The `schema_version` table remembers how many migrations of each component were applied; each
pending migration runs as one transaction that also records its number.
"""

from __future__ import annotations

from collections.abc import Sequence

CREATE_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
)
SELECT_VERSION = "SELECT version FROM schema_version WHERE component = ?"


def pending(
    component: str, current: int, migrations: Sequence[str], *, newer: str
) -> list[tuple[int, str]]:
    """(version, script) of each migration after `current`, the script one transaction.

    RuntimeError when the database is newer than `migrations`; `newer` ends its message
    (`than this release knows (3): ...`).
    """
    if current > len(migrations):
        raise RuntimeError(
            f"database schema of {component!r} is version {current}, newer than {newer}"
        )
    return [
        (
            version,
            f"BEGIN;\n{script.rstrip().rstrip(';')};\n"
            f"INSERT INTO schema_version(component, version) VALUES ('{component}', {version})"
            " ON CONFLICT(component) DO UPDATE SET version = excluded.version;\nCOMMIT;",
        )
        for version, script in enumerate(migrations[current:], start=current + 1)
    ]
