"""A throw-away PostgreSQL cluster for one test run: ``initdb`` + ``pg_ctl`` on a free port.

Debian's ``postgresql`` package provides the binaries (``/usr/lib/postgresql/<N>/bin``); the
cluster lives in a temporary folder, listens on loopback only with trust authentication and
is stopped (``pg_ctl stop -m immediate``) and removed at the end.  ``initdb`` refuses to run as
root, so under root (CI containers) the cluster runs as the ``postgres`` system user that the
package creates.  ``SCP_NODE_TEST_POSTGRES_URL`` (a maintenance-database URL) uses an existing
server instead.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .net import free_port
from .paths import IN_CI

ENV_URL = "SCP_NODE_TEST_POSTGRES_URL"


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    root = Path("/usr/lib/postgresql")
    versions = sorted((p for p in root.glob("*/bin") if (p / "pg_ctl").exists()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return versions[-1] if versions else None


def _unavailable(msg: str) -> None:
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


@dataclass
class PostgresServer:
    """A running server: ``url`` is its maintenance database (``postgres``)."""

    url: str
    _folder: Path | None = None
    _bin: Path | None = None
    _user: str | None = None
    _created: list[str] = field(default_factory=list)

    def database_url(self, name: str | None = None) -> str:
        """A new, empty database on the server; its SQLAlchemy URL (psycopg 3 driver)."""
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        name = name or f"scp_node_test_{uuid.uuid4().hex[:12]}"
        admin = create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        self._created.append(name)
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        """Drop a database made by :meth:`database_url` (its connections are closed first)."""
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        name = make_url(url).database
        admin = create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()

    def stop(self) -> None:
        if self._folder is None or self._bin is None:
            return
        _run(self._bin / "pg_ctl", ["-D", str(self._folder / "data"), "-m", "immediate", "-w", "stop"],
             self._user, check=False, cwd=self._folder)
        shutil.rmtree(self._folder, ignore_errors=True)
        self._folder = None


def _run(program: Path, args: list[str], user: str | None, check: bool = True,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program (as ``user`` when given), in ``cwd``: a folder that user can
    enter (initdb and pg_ctl look at their working directory; a checkout under /root is not one)."""
    cmd = [str(program), *args]
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                            cwd=str(cwd) if cwd is not None else None)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def start_postgres() -> PostgresServer:
    """A throw-away cluster (or the server that ``SCP_NODE_TEST_POSTGRES_URL`` names)."""
    if os.environ.get(ENV_URL):
        return PostgresServer(url=os.environ[ENV_URL])
    bin_dir = _bin_dir()
    if bin_dir is None:
        _unavailable("PostgreSQL not installed (apt-get install postgresql)")
        raise AssertionError("unreachable")
    user: str | None = None
    if os.geteuid() == 0:  # initdb will not run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no 'postgres' user for initdb")
        user = "postgres"
    folder = Path(tempfile.mkdtemp(prefix="scp-node-pg-"))
    if user is not None:
        shutil.chown(folder, user)
    port = free_port()
    _run(bin_dir / "initdb", ["-D", str(folder / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                              "--no-sync"], user, cwd=folder)
    opts = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=400 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
    _run(bin_dir / "pg_ctl", ["-D", str(folder / "data"), "-o", opts, "-l", str(folder / "server.log"),
                              "-w", "-t", "60", "start"], user, cwd=folder)
    return PostgresServer(url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", _folder=folder,
                          _bin=bin_dir, _user=user)
