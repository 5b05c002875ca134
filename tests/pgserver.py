"""A throw-away PostgreSQL server for the tests: Debian's `initdb` + `pg_ctl` in a temp
directory, listening on a Unix socket there only (no TCP port, nothing outside can reach it).

`PgServer.start()` makes one; `new_database()` gives each test its own empty database, so tests
never see each other's rows. As root (CI), the server runs as the `postgres` user that Debian's
package creates (PostgreSQL refuses to run as root). Standalone, for a helper shell:
`python -m tests.pgserver` prints a `DATABASE_URL` and keeps the server up until Ctrl-C.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def pg_binary(name: str) -> str:
    """`initdb`/`pg_ctl` from Debian's postgresql package (not on PATH there), newest first."""
    for directory in PG_BIN_DIRS:
        if (directory / name).is_file():
            return str(directory / name)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: install Debian's postgresql package")
    return found


def _as_postgres() -> list[str]:
    """Run PostgreSQL's tools as `postgres` when we are root (it refuses root)."""
    if os.geteuid() != 0:
        return []
    pwd.getpwnam("postgres")  # KeyError: the postgresql package is not installed
    return ["runuser", "-u", "postgres", "--"]


@dataclass
class PgServer:
    root: Path
    port: int
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def socket_dir(self) -> Path:
        return self.root

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}&port={self.port}"

    @classmethod
    def start(cls, port: int | None = None) -> PgServer:
        """A new server on `port` (default: a free one, so that test runs never collide)."""
        if port is None:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = int(probe.getsockname()[1])
        root = Path(tempfile.mkdtemp(prefix="appliance-pg-"))
        data = root / "data"
        prefix = _as_postgres()
        if prefix:
            record = pwd.getpwnam("postgres")
            os.chown(root, record.pw_uid, record.pw_gid)
        subprocess.run(
            [*prefix, pg_binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
            check=True, capture_output=True,
        )  # fmt: skip
        options = (
            f"-k {root} -p {port} -c listen_addresses='' -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        subprocess.run(
            [*prefix, pg_binary("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"),
             "-o", options, "-w", "-t", "60", "start"],
            check=True, capture_output=True,
        )  # fmt: skip
        server = cls(root, port)
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(server.url(), autocommit=True).close()
                return server
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def new_database(self) -> str:
        """A fresh empty database; its URL."""
        name = f"t{os.getpid()}_{next(self._counter)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            [*_as_postgres(), pg_binary("pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate",
             "-w", "stop"],
            check=False, capture_output=True,
        )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    server = PgServer.start(int(os.environ.get("PGPORT_SCRATCH", "5433")))
    print(server.new_database(), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
