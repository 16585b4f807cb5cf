"""``serve --role`` refusals and the fleet in ``status``, through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scp_node.scheduler.fleet import FleetMember
from scp_node.store.db import Database
from tests.support.node import cli, write_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("role", ["receiver", "worker"])
def test_serve_refuses_receiver_and_worker_roles_on_sqlite(tmp_path: Path, role: str) -> None:
    config = write_config(tmp_path, model_dir=tmp_path / "model")
    r = cli("serve", "--config", str(config), "--role", role)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"--role {role} needs a shared PostgreSQL index" in r.stderr and "--role all" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "index.db").exists()  # refused before the index was opened


def test_serve_refuses_an_unknown_role(tmp_path: Path) -> None:
    config = write_config(tmp_path, model_dir=tmp_path / "model")
    r = cli("serve", "--config", str(config), "--role", "archiver")
    assert r.returncode == 2 and "archiver" in r.stderr and "Traceback" not in r.stderr


def test_status_lists_the_fleet_from_the_shared_index(tmp_path: Path, postgres_url: str) -> None:
    config = write_config(tmp_path, model_dir=tmp_path / "model")
    config.write_text(config.read_text().replace(f'"sqlite:///{tmp_path}/index.db"', f'"{postgres_url}"'))
    db = Database(postgres_url)
    try:
        FleetMember(db, "rx-host:11:receiver", "receiver", "SCPNODE", "1", 30).register()
        FleetMember(db, "gpu-host:22:worker", "worker", "SCPNODE", "1", 30).register()
        FleetMember(db, "gpu-host:33:worker", "worker", "SCPNODE", "1", 30).stopped()
    finally:
        db.dispose()
    r = cli("status", "--config", str(config), "--json")
    assert r.returncode == 1, r.stdout + r.stderr  # this config's own node is not running
    st = json.loads(r.stdout)
    assert [(n["name"], n["role"], n["host"], n["pid"], n["state"], n["claims"]) for n in st["fleet"]] == [
        ("rx-host:11:receiver", "receiver", "rx-host", 11, "live", 0),
        ("gpu-host:22:worker", "worker", "gpu-host", 22, "live", 0)]
    assert "not_analysed" in st and "analysis" in st  # the single-node status is all still there
    text = cli("status", "--config", str(config)).stdout
    assert "fleet     2 live" in text and "worker   gpu-host:22:worker" in text, text
    assert "not running" in text and "not analysed" in text


def test_store_var_dir_gives_each_node_its_own_run_time_folder(tmp_path: Path) -> None:
    """Nodes sharing one storage folder keep their pid file and lock apart ([store] var_dir)."""
    from scp_node.config import ConfigError, from_mapping

    shared = {"storage_dir": "/srv/scp/storage"}
    assert from_mapping({"store": shared}, tmp_path, environ={}).var_dir == Path("/srv/scp")  # the default
    a = from_mapping({"store": {**shared, "var_dir": "run/a"}}, tmp_path, environ={})
    b = from_mapping({"store": {**shared, "var_dir": "/var/run/scp-b"}}, tmp_path, environ={})
    assert (a.var_dir, b.var_dir) == (tmp_path / "run/a", Path("/var/run/scp-b"))
    assert a.store.storage_dir == b.store.storage_dir
    with pytest.raises(ConfigError, match="var_dir"):
        from_mapping({"store": {"var_dir": 5}}, tmp_path, environ={})
