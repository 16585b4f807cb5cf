"""The fault-related config keys: TLS files come in pairs and are anchored at the config folder,
the disk guard watermark is range-checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from scp_node.config import ConfigError, from_mapping


def _load(data: dict, base: Path) -> object:
    return from_mapping(data, base, environ={})


@pytest.mark.parametrize("data, message", [
    ({"node": {"tls_cert": "node.crt"}}, "tls_cert and tls_key"),
    ({"node": {"tls_ca": "ca.crt"}}, "tls_ca needs"),
    ({"store": {"min_free_percent": 100.0}}, "min_free_percent"),
    ({"store": {"min_free_bytes": -1}}, "min_free_bytes"),
    ({"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 104, "tls": "yes"}]}, "tls must be"),
    ({"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 104, "tls": True,
                        "tls_cert": "c.pem"}]}, "tls_cert and tls_key"),
])
def test_bad_fault_keys_are_clear_errors(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(data, tmp_path)


def test_tls_paths_are_anchored_at_the_config_folder(tmp_path: Path) -> None:
    cfg = _load({"node": {"tls_cert": "pki/n.crt", "tls_key": "pki/n.key", "tls_ca": "/etc/ca.crt"},
                 "destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 104, "tls": True,
                                   "tls_ca": "pki/ca.crt"}]}, tmp_path)
    assert cfg.node.tls_cert == str(tmp_path / "pki/n.crt") and cfg.node.tls_ca == "/etc/ca.crt"
    assert cfg.destinations[0].tls and cfg.destinations[0].tls_ca == str(tmp_path / "pki/ca.crt")
    assert cfg.store.min_free_bytes == 1_073_741_824  # a safe default: 1 GiB kept free
