"""``[web]`` and ``kind = "dicomweb"`` destinations in the config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from scp_node.config import ConfigError, load
from scp_node.web import token_sha256

HASH = token_sha256("t")


def _load(tmp_path: Path, text: str, environ: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load(path, environ=environ or {})


def test_no_web_section_means_no_web_service(tmp_path: Path) -> None:
    assert _load(tmp_path, "").web is None


def test_web_contract_keys(tmp_path: Path) -> None:
    c = _load(tmp_path, f'[web]\nhost = "127.0.0.1"\nport = 8080\ntoken_sha256 = ["{HASH.upper()}", "{"0" * 64}"]\n')
    assert c.web is not None and (c.web.host, c.web.port) == ("127.0.0.1", 8080)
    assert c.web.token_sha256 == (HASH, "0" * 64)  # normalised to lower case
    assert c.web.max_body_bytes == 2 * 1024**3 and not c.web.tls_cert


def test_web_defaults_are_loopback_and_tls_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    c = _load(tmp_path, f'[web]\ntoken_sha256 = ["{HASH}"]\ntls_cert = "tls/c.pem"\ntls_key = "/etc/k.pem"\n'
                        "max_body_bytes = 1000\n")
    assert c.web is not None and c.web.host == "127.0.0.1" and c.web.port == 8080
    assert c.web.tls_cert == str(tmp_path.resolve() / "tls" / "c.pem") and c.web.tls_key == "/etc/k.pem"
    assert c.web.max_body_bytes == 1000


def test_environment_overrides_web_keys(tmp_path: Path) -> None:
    c = _load(tmp_path, f'[web]\ntoken_sha256 = ["{HASH}"]\n',
              environ={"SCP_NODE__WEB__PORT": "9090", "SCP_NODE__WEB__TOKEN_SHA256": f'["{"1" * 64}"]'})
    assert c.web is not None and c.web.port == 9090 and c.web.token_sha256 == ("1" * 64,)


@pytest.mark.parametrize("text, message", [
    ('[web]\ntoken_sha256 = ["' + HASH + '"]\nport = 0\n', "not a TCP port"),
    ('[web]\ntoken_sha256 = ["' + HASH + '"]\nnope = 1\n', "unknown key"),
    ('[web]\ntoken_sha256 = []\n', "at least one"),
    ('[web]\ntoken_sha256 = [1]\n', "list of strings"),
    ('[web]\ntoken_sha256 = ["' + HASH + '"]\nmax_body_bytes = 0\n', "positive"),
    ('[[destinations]]\nname = "w"\nkind = "dicomweb"\nurl = "ftp://h/x"\n', "needs url"),
    ('[[destinations]]\nname = "w"\nkind = "dicomweb"\nurl = "http://h:99999/x"\n', "invalid port"),
    ('[[destinations]]\nname = "w"\nkind = "dicomweb"\nurl = "http://h/x"\ntoken = 5\n', "token must be"),
])
def test_bad_web_config(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)


def test_dicomweb_destination(tmp_path: Path) -> None:
    c = _load(tmp_path, '[[destinations]]\nname = "vna"\nkind = "dicomweb"\nurl = "https://vna.local/dicom-web/"\n'
                        'token = "s3cret"\n\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\n'
                        "port = 104\n")
    web, dimse = c.destinations
    assert (web.kind, web.url, web.host, web.port, web.token) == ("dicomweb", "https://vna.local/dicom-web",
                                                                 "vna.local", 443, "s3cret")
    assert "s3cret" not in repr(web) and "s3cret" not in repr(c)
    assert dimse.kind == "dimse" and dimse.url == ""
