"""Configuration: TOML contract keys, defaults, environment overrides, path anchoring, clear errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from scp_node.config import (Config, ConfigError, Destination, Peer, from_mapping, load)

CONTRACT = """
[node]
ae_title = "MYNODE"
host = "0.0.0.0"
port = 11113

[store]
database_url = "sqlite:///db/index.db"
storage_dir = "data/storage"

[scheduler]
series_stable_seconds = 12.5

[engine]
model_dir = "models/medgemma"
device = "cuda"

[[peers]]
ae_title = "ORTHANC"
host = "10.0.0.5"

[[peers]]
ae_title = "STORESCU"
host = "127.0.0.1"

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "10.0.0.10"
port = 104

[[destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "archive.local"
port = 11112
"""


def write(folder: Path, text: str, name: str = "node.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load(write(tmp_path / "cfg", text), environ={} if environ is None else environ)


# -- defaults ---------------------------------------------------------------------------------

def test_defaults_of_the_dataclass() -> None:
    c = Config()
    assert (c.node.ae_title, c.node.host, c.node.port) == ("SCPNODE", "127.0.0.1", 11112)
    assert c.node.accept_unknown_callers is False
    assert c.store.duplicate_policy == "keep_first"
    assert c.scheduler.series_stable_seconds == 60.0
    assert c.scheduler.series_max_wait_seconds == 5400.0
    assert c.scheduler.max_analysis_attempts == 3
    assert c.engine.device == "auto" and c.engine.create_test_model is False
    assert (c.export.max_attempts, c.export.backoff_initial_seconds, c.export.backoff_multiplier,
            c.export.backoff_max_seconds) == (8, 5.0, 2.0, 900.0)
    assert c.peers == () and c.destinations == () and c.source is None


def test_empty_file_gives_defaults_anchored_at_the_file_folder(tmp_path: Path) -> None:
    c = load_text(tmp_path, "")
    cfg = (tmp_path / "cfg").resolve()
    assert c.source == cfg / "node.toml"
    assert c.node.port == 11112 and c.node.ae_title == "SCPNODE"
    assert c.store.storage_dir == cfg / "var" / "storage"
    assert c.engine.model_dir == cfg / "var" / "model"
    assert c.audit.secret_file == cfg / "var" / "audit.key"
    assert c.store.database_url == f"sqlite:///{cfg / 'var' / 'index.db'}"
    assert c.var_dir == cfg / "var"


# -- the contract keys --------------------------------------------------------------------------

def test_contract_file_is_parsed(tmp_path: Path) -> None:
    c = load_text(tmp_path, CONTRACT)
    cfg = (tmp_path / "cfg").resolve()
    assert (c.node.ae_title, c.node.host, c.node.port) == ("MYNODE", "0.0.0.0", 11113)
    assert c.store.database_url == f"sqlite:///{cfg / 'db' / 'index.db'}"
    assert c.store.storage_dir == cfg / "data" / "storage"
    assert c.scheduler.series_stable_seconds == 12.5
    assert isinstance(c.scheduler.series_stable_seconds, float)
    assert c.engine.model_dir == cfg / "models" / "medgemma"
    assert c.engine.device == "cuda"
    assert c.peers == (Peer("ORTHANC", "10.0.0.5"), Peer("STORESCU", "127.0.0.1"))
    assert c.destinations == (Destination("pacs", "PACS", "10.0.0.10", 104),
                              Destination("archive", "ARCHIVE", "archive.local", 11112))
    assert all(d.kind == "dimse" for d in c.destinations)
    # keys not in the file keep their defaults
    assert c.engine.max_new_tokens == 2000 and c.export.max_attempts == 8


def test_int_value_for_a_float_key_becomes_float(tmp_path: Path) -> None:
    c = load_text(tmp_path, "[scheduler]\nseries_stable_seconds = 10\n")
    assert c.scheduler.series_stable_seconds == 10.0
    assert isinstance(c.scheduler.series_stable_seconds, float)


def test_the_repo_demo_config_loads() -> None:
    demo = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
    c = load(demo, environ={})
    assert c.engine.create_test_model is True
    assert [d.name for d in c.destinations] == ["pacs"]
    assert c.store.database_url.startswith("sqlite:////")  # made absolute


def test_the_repo_medgemma_config_loads_and_its_commented_priors_table_too(tmp_path: Path) -> None:
    """config/medgemma.toml as shipped, and with its [[priors]] example switched on."""
    shipped = Path(__file__).resolve().parents[1] / "config" / "medgemma.toml"
    c = load(shipped, environ={})
    assert c.scheduler.compare_priors is True and c.priors == ()
    text = shipped.read_text()
    block = text[text.index("# [[priors]]"):text.index("# HL7 v2.5.1")]
    enabled = text.replace(block, "\n".join(line[2:] if line.startswith("# ") and "=" in line or
                                            line.startswith("# [[") else line for line in block.splitlines()) + "\n")
    (tmp_path / "node.toml").write_text(enabled)
    priors = load(tmp_path / "node.toml", environ={}).priors
    assert [(p.name, p.ae_title, p.port, p.retrieve, p.move_destination) for p in priors] == \
        [("pacs", "PACS", 104, "c-move", "SCPNODE")]


# -- relative paths ---------------------------------------------------------------------------

def test_relative_paths_do_not_depend_on_the_working_directory(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "etc", """
        [store]
        database_url = "sqlite:///../var/index.db"
        storage_dir = "../var/storage"
        [audit]
        secret_file = "keys/audit.key"
    """)
    monkeypatch.chdir(tmp_path)
    a = load(path, environ={})
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    b = load(Path("../..") / "etc" / "node.toml", environ={})
    real = tmp_path.resolve()
    for c in (a, b):
        assert c.store.database_url == f"sqlite:///{real / 'var' / 'index.db'}"
        assert c.store.storage_dir.resolve() == real / "var" / "storage"
        assert c.store.storage_dir.is_absolute()
        assert c.audit.secret_file == real / "etc" / "keys" / "audit.key"


@pytest.mark.parametrize("url", [
    "sqlite:////abs/index.db",
    "sqlite:///:memory:",
    "postgresql+psycopg://user:pw@db.local/scpnode",
])
def test_absolute_memory_and_server_urls_are_kept(tmp_path: Path, url: str) -> None:
    c = load_text(tmp_path, f'[store]\ndatabase_url = "{url}"\n')
    assert c.store.database_url == url


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    c = load_text(tmp_path, '[store]\nstorage_dir = "/srv/dicom"\n[engine]\nmodel_dir = "/opt/m"\n')
    assert c.store.storage_dir == Path("/srv/dicom")
    assert c.engine.model_dir == Path("/opt/m")


# -- environment overrides --------------------------------------------------------------------

def test_env_overrides_int_bool_float_and_string(tmp_path: Path) -> None:
    env = {
        "SCP_NODE__NODE__PORT": "11999",
        "SCP_NODE__NODE__AE_TITLE": "FROMENV",
        "SCP_NODE__NODE__ACCEPT_UNKNOWN_CALLERS": "true",
        "SCP_NODE__ENGINE__CREATE_TEST_MODEL": "false",
        "SCP_NODE__ENGINE__DEVICE": "cpu",
        "SCP_NODE__SCHEDULER__SERIES_STABLE_SECONDS": "2.5",
        "SCP_NODE__EXPORT__MAX_ATTEMPTS": "3",
        "PATH_UNRELATED": "x",
    }
    c = load_text(tmp_path, CONTRACT + "\n", environ=env)
    assert c.node.port == 11999 and isinstance(c.node.port, int)
    assert c.node.ae_title == "FROMENV"
    assert c.node.accept_unknown_callers is True
    assert c.engine.create_test_model is False
    assert c.engine.device == "cpu"
    assert c.scheduler.series_stable_seconds == 2.5
    assert c.export.max_attempts == 3
    # untouched keys still come from the file
    assert c.node.host == "0.0.0.0" and c.engine.model_dir.name == "medgemma"


def test_env_override_applies_without_a_file_section(tmp_path: Path) -> None:
    c = load_text(tmp_path, "", environ={"SCP_NODE__REPORT__INSTITUTION_NAME": "St. Elsewhere Hospital"})
    assert c.report.institution_name == "St. Elsewhere Hospital"


@pytest.mark.parametrize("raw", ["1E2", "0x1F", "1_000", "+1", "true", "[1]"])
def test_env_string_key_keeps_the_text_as_written(tmp_path: Path, raw: str) -> None:
    """A string key from the environment is not mangled by TOML parsing (``1E2`` is not ``100.0``)."""
    c = load_text(tmp_path, "", environ={"SCP_NODE__REPORT__STATION_NAME": raw})
    assert c.report.station_name == raw


def test_env_quoted_string_is_unquoted(tmp_path: Path) -> None:
    c = load_text(tmp_path, "", environ={"SCP_NODE__ENGINE__DEVICE": '"cuda:1"'})
    assert c.engine.device == "cuda:1"


def test_env_relative_path_is_anchored_like_the_file(tmp_path: Path) -> None:
    c = load_text(tmp_path, "", environ={"SCP_NODE__STORE__STORAGE_DIR": "st",
                                         "SCP_NODE__STORE__DATABASE_URL": "sqlite:///i.db"})
    cfg = (tmp_path / "cfg").resolve()
    assert c.store.storage_dir == cfg / "st"
    assert c.store.database_url == f"sqlite:///{cfg / 'i.db'}"


def test_env_wrong_type_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[node\] port = 'eleven' \(from SCP_NODE__NODE__PORT\) is not a int"):
        load_text(tmp_path, "", environ={"SCP_NODE__NODE__PORT": "eleven"})
    with pytest.raises(ConfigError, match=r"accept_unknown_callers"):
        load_text(tmp_path, "", environ={"SCP_NODE__NODE__ACCEPT_UNKNOWN_CALLERS": "1"})


@pytest.mark.parametrize("name", ["SCP_NODE__NOPE__PORT", "SCP_NODE__PORT", "SCP_NODE__NODE__PORT__X",
                                  "SCP_NODE__PEERS__HOST"])
def test_env_bad_name_is_a_config_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_text(tmp_path, "", environ={name: "1"})


def test_env_unknown_key_names_section_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[node\] unknown key 'colour'"):
        load_text(tmp_path, "", environ={"SCP_NODE__NODE__COLOUR": "blue"})


def test_os_environ_is_used_when_none_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCP_NODE__NODE__PORT", "12345")
    assert load(write(tmp_path, ""), environ=None).node.port == 12345


# -- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("[nodes]\nport = 1\n", r"unknown section\(s\): nodes"),
    ("[node]\nprot = 1\n", r"\[node\] unknown key 'prot'.*port"),
    ('[node]\nport = "abc"\n', r"\[node\] port = 'abc' is not a int"),
    ("[node]\nport = 1.5\n", r"\[node\] port = 1.5"),
    ("[node]\nport = true\n", r"\[node\] port = True"),
    ("[node]\nport = 0\n", r"\[node\] port 0 is not a TCP port"),
    ("[node]\nport = 70000\n", r"port 70000 is not a TCP port"),
    ('[engine]\ncreate_test_model = "yes"\n', r"\[engine\] create_test_model = 'yes' is not a bool"),
    ('[scheduler]\nseries_stable_seconds = "soon"\n', r"series_stable_seconds = 'soon' is not a float"),
    ("[scheduler]\nseries_stable_seconds = true\n", r"series_stable_seconds = True is not a float"),
    ("[node]\nae_title = 123\n", r"\[node\] ae_title = 123 is not a str"),
    ('[node]\nhost = ["a", "b"]\n', r"\[node\] host"),
    ("[store]\nstorage_dir = 5\n", r"\[store\] storage_dir = 5"),
    ('[store]\nduplicate_policy = "newest"\n', r"duplicate_policy must be 'keep_first' or 'replace'"),
    ("node = 5\n", r"\[node\] must be a table"),
    ('[node]\nae_title = "THIS_AE_IS_TOO_LONG"\n', r"\[node\] ae_title: AE title 'THIS_AE_IS_TOO_LONG'"),
    ('[node]\nae_title = "BAD\\\\AE"\n',
     r"\[node\] ae_title: AE title 'BAD\\\\AE' must be 1-16 printable characters, no backslash"),
    ('[node]\nae_title = ""\n', r"\[node\] ae_title: AE title ''"),
    ('[node]\nae_title = "   "\n', r"\[node\] ae_title: AE title"),
    ('[node]\nae_title = "TAB\\tAE"\n', r"\[node\] ae_title"),
    ('[[peers]]\nae_title = "ORTHANC"\n', r"\[\[peers\]\] #1 needs host"),
    ('[[peers]]\nhost = "1.2.3.4"\n', r"\[\[peers\]\] #1 needs ae_title"),
    ('[[peers]]\nae_title = "OK"\nhost = "h"\n[[peers]]\nae_title = "WAY_TOO_LONG_AE_TITLE"\nhost = "h"\n',
     r"\[\[peers\]\] #2: AE title"),
    ('peers = ["ORTHANC"]\n', r"peers must be an array of tables"),
    ('[peers]\nae_title = "X"\nhost = "h"\n', r"peers must be an array of tables"),
    ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\n', r"\[\[destinations\]\] #1 needs port"),
    ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\n'
     '[[destinations]]\nname = "a"\nae_title = "B"\nhost = "h2"\nport = 2\n',
     r"\[\[destinations\]\] names must be unique"),
    ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = "104"\n',
     r"\[\[destinations\]\] #1 port = '104' is not a TCP port"),
    ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 0\n', r"#1 port = 0 is not a TCP port"),
    ('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 104\nkind = "ftp"\n',
     r"\[\[destinations\]\] a: kind 'ftp' is not supported"),
    ('[[destinations]]\nname = "a"\nkind = "dicomweb"\n', r"kind 'dicomweb' needs url"),
    ('[[destinations]]\nname = "a"\nkind = "dicomweb"\nurl = "http://h/dw"\nport = 1\n', r"do not apply"),
    ('[web]\nport = 8080\n', r"token_sha256 needs at least one"),
    ('[web]\ntoken_sha256 = ["secret"]\n', r"not 64 hex characters"),
    ('[web]\ntoken_sha256 = "abc"\n', r"is not a list of strings"),
    ('[web]\ntoken_sha256 = ["' + "a" * 64 + '"]\ntls_cert = "c.pem"\n', r"set together"),
    ('[[destinations]]\nname = "a"\nae_title = "A\\\\B"\nhost = "h"\nport = 104\n',
     r"\[\[destinations\]\] #1: AE title"),
])
def test_bad_config_raises_a_clear_config_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, text)


def test_missing_file_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_text(tmp_path, "[node\nport = 1\n")


def test_ae_title_of_exactly_16_characters_is_accepted(tmp_path: Path) -> None:
    c = load_text(tmp_path, '[node]\nae_title = "ABCDEFGHIJKLMNOP"\n')
    assert c.node.ae_title == "ABCDEFGHIJKLMNOP"


def test_from_mapping_does_not_mutate_its_input(tmp_path: Path) -> None:
    data = {"node": {"port": 1234}}
    from_mapping(data, tmp_path, environ={"SCP_NODE__NODE__HOST": "h"})
    assert data == {"node": {"port": 1234}}


def test_destination_modalities_routing_rule(tmp_path: Path) -> None:
    from scp_node.config import load as load_config

    path = tmp_path / "c.toml"
    path.write_text('[[destinations]]\nname = "ct"\nae_title = "CTPACS"\nhost = "127.0.0.1"\nport = 104\n'
                    'modalities = ["ct", "MR"]\n\n[[destinations]]\nname = "all"\nae_title = "PACS"\n'
                    'host = "127.0.0.1"\nport = 104\n')
    ct, every = load_config(path, environ={}).destinations
    assert ct.modalities == ("CT", "MR") and ct.wants("CT") and not ct.wants("CR")
    assert every.modalities == () and every.wants("CR")
    path.write_text('[[destinations]]\nname = "x"\nae_title = "P"\nhost = "h"\nport = 1\nmodalities = "CT"\n')
    with pytest.raises(ConfigError, match="modalities"):
        load_config(path, environ={})


# -- priors and scale-out --------------------------------------------------------------------

PRIOR = '[[priors]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.10"\nport = 104\n'


@pytest.mark.parametrize("extra, message", [
    (PRIOR.replace('port = 104\n', ''), "needs port"),
    (PRIOR + 'retrieve = "c-push"\n', "use 'c-move' or 'c-get'"),
    (PRIOR + 'timeout_seconds = 0\n', "timeout_seconds > 0"),
    (PRIOR + 'lookback = 10\n', "unknown keys ['lookback']"),
    (PRIOR + PRIOR, "[[priors]] names must be unique"),
    ("[scheduler]\nclaim_lease_seconds = 5\n", "claim_lease_seconds must be >= 10"),
    ("[scheduler]\nclaim_lease_seconds = 20\nheartbeat_seconds = 15\n", "at least twice heartbeat_seconds"),
])
def test_priors_and_lease_mistakes_are_refused_with_the_key(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, extra)
    assert message in str(err.value)


def test_a_prior_source_moves_to_the_node_by_default(tmp_path: Path) -> None:
    c = load_text(tmp_path, '[node]\nae_title = "NODE7"\n' + PRIOR + 'retrieve = "C-GET"\n')
    (src,) = c.priors
    assert (src.move_destination, src.retrieve, src.lookback_days, src.timeout_seconds) == ("NODE7", "c-get", 1825, 30.0)
