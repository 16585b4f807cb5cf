"""One configuration object, loaded once: a TOML file plus environment overrides.

Every component receives the :class:`Config` (or the section it needs) from the CLI; nothing
re-reads the file.  Environment variables override single keys as
``SCP_NODE__<SECTION>__<KEY>=value`` (e.g. ``SCP_NODE__NODE__PORT=11113``); values are parsed as
TOML scalars when they parse, else taken as strings.  Relative paths in the file are resolved
against the file's own folder so that a config works from any working directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "SCP_NODE__"

#: AE titles are 1-16 characters of the default character repertoire, no backslash or control chars.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class NodeConfig:
    """The DIMSE service class provider: who we are on the network."""

    ae_title: str = "SCPNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    #: Largest P-DATA PDU we advertise; 0 means unlimited (pynetdicom's convention).
    max_pdu_size: int = 1_048_576
    max_associations: int = 16
    #: Processes that receive DIMSE on the node's port (the node's own plus children that only
    #: receive); 0 means one per CPU core, at most 4. See scp_node.dimse.receivers.
    receiver_processes: int = 0
    #: The receive path's fast path (scp_node.dimse.pynetdicom_internals); false: pynetdicom's own
    #: reactor, negotiation and DIMSE path, as the library ships them (slower, same results).
    fast_path: bool = True
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    #: Accept associations from any caller (never in production; the demo keeps the allow-list).
    accept_unknown_callers: bool = False
    #: DICOM TLS (PS3.15 B.1): PEM certificate and key of the node; both set means every
    #: association is TLS. With tls_ca set, callers must present a certificate signed by that CA.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""


@dataclass(frozen=True)
class StoreConfig:
    """Where received instances and the index live."""

    database_url: str = "sqlite:///var/index.db"
    storage_dir: Path = Path("var/storage")
    #: What to do with a second copy of an already stored SOP Instance UID:
    #: "keep_first" (answer success, keep the old file, audit) or "replace" (store the new bytes).
    duplicate_policy: str = "keep_first"
    #: Disk guard: refuse stores (0xA700 Out of Resources) when the storage folder's file system
    #: would keep less free space than this many bytes, or this percentage of its size.
    min_free_bytes: int = 1_073_741_824
    min_free_percent: float = 0.0
    #: The node's run-time folder (pid file, lock, metrics, web spool); unset: the storage
    #: folder's parent.  Several nodes on one machine sharing one storage_dir each need their own.
    var_dir: Path | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    """Series completion (mercure's rules) and the job loops."""

    #: A series is complete after this many seconds without a new instance.
    series_stable_seconds: float = 60.0
    #: Forced ceiling: a series that keeps receiving is analysed after this many seconds anyway.
    series_max_wait_seconds: float = 5400.0
    #: How often the completion, analysis and export loops look for work.
    poll_seconds: float = 1.0
    max_analysis_attempts: int = 3
    #: A worker's claim on a running analysis or export holds this long and is renewed while it
    #: works; a worker that dies (kill -9, power) lets it lapse and another worker takes the job.
    claim_lease_seconds: float = 120.0
    #: How often each node refreshes its row in the fleet table (``scp-node status``).
    heartbeat_seconds: float = 5.0
    #: Compare each series with the patient's most recent earlier comparable study (local index
    #: first, then the [[priors]] sources); false: no prior is looked for.
    compare_priors: bool = True
    #: How far back a prior may be, in days (a source's own lookback_days applies to its C-FIND).
    prior_lookback_days: int = 1825


@dataclass(frozen=True)
class EngineConfig:
    """The MedGemma engine."""

    model_dir: Path = Path("var/model")
    device: str = "auto"
    #: Upper bound on the model's free-text answer; each prompt profile has its own budget below it
    #: (Google's: 2000 for CT/MR volumes, 500 for X-ray and 2D images), so by default they apply in full.
    max_new_tokens: int = 2000
    ct_max_slices: int = 85
    #: Only for demos and tests: write a tiny random test model into model_dir on first start
    #: when the folder is missing. A real-weights config never sets this.
    create_test_model: bool = False
    #: "report" (default): the model writes its report, then a grammar-constrained second turn of the
    #: same conversation extracts the findings JSON from it; "structured": one grammar-constrained JSON
    #: answer; "free": the JSON prompt without a grammar, parsed leniently (scp_node.engine.medgemma).
    answer_mode: str = ""
    #: Deprecated, used only when answer_mode is not given: true -> "structured", false -> "free".
    #: After loading it mirrors answer_mode (None for "report").
    structured: bool | None = None
    #: Google's "SYSTEM INSTRUCTION: think silently if needed."; the trace is cut at <unused95>.
    thinking: bool = False
    #: Report language: "en" or "zh" (a prompt profile may set its own).
    language: str = "en"
    #: Series analysed together in one batched generation (halved on CUDA out-of-memory).
    max_batch: int = 4
    #: Static KV cache, compiled by transformers on CUDA; warmed up at start (scp_node.engine.warmup).
    compile: bool = False
    #: Bounds of the JSON answer (they fix the longest possible answer in tokens).
    max_findings: int = 6
    max_text_chars: int = 300
    #: ``[engine.prompts.<name>]`` tables: modalities, body_parts, instruction, question,
    #: label_images, default_body_part, language. Tried before the built-in defaults.
    prompts: dict[str, Any] = field(default_factory=dict, hash=False)
    #: "transformers": the model runs in this process (model_dir, device). "openai": an
    #: OpenAI-compatible server (vLLM) runs it; see scp_node.engine.openai_backend.
    backend: str = "transformers"
    #: openai backend: the server's URL as the OpenAI client takes it ("http://127.0.0.1:8000/v1"),
    #: the served model's name, and the SHA-256 of its weights (the node cannot read remote weights).
    base_url: str = ""
    model: str = ""
    weights_sha256: str = ""
    #: Hosts besides loopback the server may be on (names, addresses, CIDR networks); nothing else.
    allowed_hosts: tuple[str, ...] = ()
    #: File holding the server's API key (sent as a bearer token); relative: from the config folder.
    api_key_file: str = ""
    #: Requests in flight at once (series analysed together), timeouts, retries with backoff.
    max_concurrent: int = 4
    connect_timeout_seconds: float = 10.0
    request_timeout_seconds: float = 600.0
    max_retries: int = 3
    retry_backoff_seconds: float = 2.0
    #: How images travel to the server: "png" (lossless) or "jpeg" (as Google's CT notebook sends them).
    image_format: str = "png"

    def __post_init__(self) -> None:
        from .engine.prompts import validate_profiles  # light: no torch

        if self.language not in ("en", "zh"):
            raise ConfigError(f"[engine] language = {self.language!r} must be 'en' or 'zh'")
        self._resolve_answer_mode()
        for key in ("max_batch", "max_findings", "max_text_chars", "max_new_tokens", "ct_max_slices"):
            if getattr(self, key) < 1:
                raise ConfigError(f"[engine] {key} must be at least 1")
        try:
            validate_profiles(self.prompts)
        except ValueError as exc:
            raise ConfigError(f"[engine.prompts] {exc}") from None
        self._check_backend()

    def _resolve_answer_mode(self) -> None:
        """answer_mode wins; without it the old ``structured`` key decides (with a warning), else "report"."""
        if self.structured is not None and not isinstance(self.structured, bool):
            raise ConfigError(f"[engine] structured = {self.structured!r} is not a bool")
        mode = self.answer_mode
        if not mode:
            mode = "report" if self.structured is None else "structured" if self.structured else "free"
            if self.structured is not None:
                warnings.warn(f"[engine] structured = {str(self.structured).lower()} is deprecated; "
                              f"use answer_mode = {mode!r}", DeprecationWarning, stacklevel=2)
        if mode not in ("report", "structured", "free"):
            raise ConfigError(f"[engine] answer_mode = {mode!r} must be 'report', 'structured' or 'free'")
        object.__setattr__(self, "answer_mode", mode)
        object.__setattr__(self, "structured", {"report": None, "structured": True, "free": False}[mode])

    def _check_backend(self) -> None:
        """The serving backend's keys; an openai server must be loopback or in allowed_hosts."""
        from .engine.egress import EgressError, check_allowed_hosts, check_base_url  # standard library only

        if self.backend not in ("transformers", "openai"):
            raise ConfigError(f"[engine] backend = {self.backend!r} must be 'transformers' or 'openai'")
        if self.backend != "openai":
            return
        for key in ("max_concurrent", "connect_timeout_seconds", "request_timeout_seconds"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"[engine] {key} must be positive")
        if self.max_retries < 0 or self.retry_backoff_seconds < 0:
            raise ConfigError("[engine] max_retries and retry_backoff_seconds must be >= 0")
        if self.image_format not in ("png", "jpeg"):
            raise ConfigError(f"[engine] image_format = {self.image_format!r} must be 'png' or 'jpeg'")
        if not self.model.strip():
            raise ConfigError("[engine] backend = 'openai' needs model, the name the server serves the model "
                              "under (vllm serve ... --served-model-name NAME)")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", self.weights_sha256.strip()):
            raise ConfigError("[engine] backend = 'openai' needs weights_sha256, the SHA-256 of the served weights "
                              "(64 hex digits; the node cannot read a server's weights, the SR names this hash). "
                              "On the server: python -c \"from scp_node.engine.modeldir import weights_sha256; "
                              "print(weights_sha256('/path/to/model'))\"")
        try:
            check_allowed_hosts(self.allowed_hosts)
            check_base_url(self.base_url, self.allowed_hosts)
        except EgressError as exc:
            raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class ExportConfig:
    """Retries for returning SRs to the destinations (dcm4chee-style backoff, a kept dead state)."""

    max_attempts: int = 8
    backoff_initial_seconds: float = 5.0
    backoff_multiplier: float = 2.0
    backoff_max_seconds: float = 900.0


@dataclass(frozen=True)
class AuditConfig:
    """The audit trail: where the HMAC key for patient identifiers lives."""

    secret_file: Path = Path("var/audit.key")
    #: IHE ATNA: every audit row also goes as a DICOM audit message (PS3.15 A.5 XML) in RFC 5424
    #: syslog over TLS (RFC 5425) to ``tls://host:port`` (scp_node.audit.syslog); empty: off.
    syslog_url: str = ""
    #: PEM CA that signed the syslog server's certificate (empty: the system store), and our client
    #: certificate and key (ATNA node authentication). Relative paths: from the config folder.
    syslog_ca: str = ""
    syslog_cert: str = ""
    syslog_key: str = ""


@dataclass(frozen=True)
class ReportConfig:
    """How the node names itself in the SRs it writes."""

    institution_name: str = ""
    station_name: str = "SCPNODE"
    series_number: int = 9901
    #: A short SR for a series the engine could not analyse (unsupported or undecodable images),
    #: saying so and why; series with nothing to analyse (SR, PR, KO, no pixels) stay silent.
    notify_not_analysed: bool = False


@dataclass(frozen=True)
class WebConfig:
    """The DICOMweb service (STOW-RS, QIDO-RS, WADO-RS); present only when ``[web]`` is configured."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: SHA-256 (hex) of each accepted bearer token; the tokens themselves are never stored.
    token_sha256: tuple[str, ...] = ()
    #: Largest accepted request body (STOW-RS), checked while the body streams in.
    max_body_bytes: int = 2 * 1024**3
    #: Most parts in one STOW-RS request; more is refused (413) before the rest is read.
    max_parts: int = 10000
    #: Seconds a client may take to send a request's headers, and an idle keep-alive connection
    #: is kept open; half-open connections are closed after these (and counted in the audit).
    header_timeout_seconds: float = 30.0
    keep_alive_seconds: float = 5.0
    #: Most HTTP connections open at once; beyond it new requests are answered 503.
    max_connections: int = 64
    #: The header timeout and the 503 of our own need scp_node.web.uvicorn_internals (uvicorn's
    #: protocol class); false runs uvicorn's own protocol (keep-alive and a concurrency limit only).
    connection_guard: bool = True
    #: PEM certificate and key; both set means HTTPS. Relative paths: from the config file's folder.
    tls_cert: str = ""
    tls_key: str = ""
    #: Browser origins (``scheme://host[:port]``) allowed to call the service cross-origin (CORS),
    #: e.g. the site's OHIF Viewer; none by default (no CORS headers at all).
    cors_origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class OpsConfig:
    """Prometheus ``/metrics`` and ``/healthz`` (scp_node.ops); present only when ``[ops]`` is configured."""

    host: str = "127.0.0.1"
    port: int = 9464
    #: /healthz calls the scheduler dead when its heartbeat job (every 5 s) is older than this.
    heartbeat_max_seconds: float = 30.0


@dataclass(frozen=True)
class Peer:
    """A caller allowed to open associations: AE title and address must both match."""

    ae_title: str
    host: str


@dataclass(frozen=True)
class PriorSource:
    """``[[priors]]``: a PACS the node asks for a patient's prior study (C-FIND study then series
    level) and retrieves it from (C-MOVE to the node's own AE title, or C-GET)."""

    name: str
    ae_title: str
    host: str
    port: int
    #: C-FIND's StudyDate range: this many days before the current study.
    lookback_days: int = 1825
    #: The whole search and retrieval from this source may take this long; after that the
    #: analysis goes on without a prior and says so.
    timeout_seconds: float = 30.0
    #: "c-move" (to ``move_destination``, the node's own AE title by default) or "c-get".
    retrieve: str = "c-move"
    move_destination: str = ""


@dataclass(frozen=True)
class Destination:
    """Where SRs are sent: a DIMSE C-STORE SCP (kind "dimse") or a DICOMweb STOW-RS service
    (kind "dicomweb": ``url`` is the service root, host/port are taken from it for the audit)."""

    name: str
    ae_title: str
    host: str
    port: int
    kind: str = "dimse"
    url: str = ""
    #: Bearer token for a dicomweb destination; kept out of repr so it never reaches a log.
    token: str = field(default="", repr=False)
    #: DICOM TLS to a dimse destination: verify its certificate against ``tls_ca`` (PEM; empty means
    #: the system store); ``tls_cert``/``tls_key`` are our client certificate when it asks for one.
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    #: Routing rule: only SRs of series with one of these modalities go here (empty: every SR).
    modalities: tuple[str, ...] = ()

    def wants(self, modality: str) -> bool:
        """Whether an SR about a series of ``modality`` is routed to this destination."""
        return not self.modalities or modality.upper() in self.modalities


@dataclass(frozen=True)
class WebhookDestination:
    """A system that gets each SR's JSON sidecar by HTTPS POST (``[[webhooks]]``), with a bearer
    token read from ``token_file``; queued, retried and dead-lettered like the DICOM exports."""

    name: str
    url: str
    #: File holding the bearer token (sent as ``Authorization: Bearer``); empty: no token.
    token_file: str = field(default="", repr=False)
    #: PEM CA to verify the receiver's certificate (empty: the system store).
    tls_ca: str = ""
    timeout_seconds: float = 30.0
    modalities: tuple[str, ...] = ()
    kind: str = "webhook"

    @property
    def host(self) -> str:
        from urllib.parse import urlsplit

        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        from urllib.parse import urlsplit

        return urlsplit(self.url).port or 443

    @property
    def ae_title(self) -> str:
        return ""

    def wants(self, modality: str) -> bool:
        return not self.modalities or modality.upper() in self.modalities


@dataclass(frozen=True)
class HL7Destination:
    """A HIS/RIS that gets an HL7 v2.5.1 ORU^R01 (result status P) for every SR, over MLLP
    (``[[hl7_destinations]]``); queued, retried and dead-lettered like the DICOM exports."""

    name: str
    host: str
    port: int
    #: MSH-3/4 (who sends) and MSH-5/6 (who receives); the RIS's interface usually checks them.
    sending_application: str = "SCPNODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    #: MLLP over TLS: verify the receiver against ``tls_ca`` (PEM; empty: the system store);
    #: ``tls_cert``/``tls_key``: our client certificate when it asks for one.
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    #: ACK codes (MSA-1) that put the export in the dead letter at once instead of retrying it:
    #: AE (application error: the content was refused, a resend repeats it) by default; AR
    #: (application reject: the receiver could not take it now) is retried.
    dead_letter_acks: tuple[str, ...] = ("AE",)
    #: Seconds to connect, send and get the ACK; no ACK in time is a failure that is retried.
    ack_timeout_seconds: float = 30.0
    #: Routing rule as for [[destinations]]: only SRs of series with one of these modalities.
    modalities: tuple[str, ...] = ()
    kind: str = "hl7"

    @property
    def ae_title(self) -> str:  # the export queue's audit names a destination's AE title
        return ""

    def wants(self, modality: str) -> bool:
        return not self.modalities or modality.upper() in self.modalities


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``source`` is the file it came from (None for defaults)."""

    node: NodeConfig = field(default_factory=NodeConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    peers: tuple[Peer, ...] = ()
    destinations: tuple[Destination, ...] = ()
    source: Path | None = None
    web: WebConfig | None = None
    #: ``[[hl7_destinations]]``: ORU^R01 results over MLLP to the HIS/RIS (scp_node.export.hl7).
    hl7_destinations: tuple[HL7Destination, ...] = ()
    #: ``[[webhooks]]``: the JSON sidecar by HTTPS POST (scp_node.export.webhook).
    webhooks: tuple[WebhookDestination, ...] = ()
    #: ``[ops]``: metrics and health over HTTP (None: off).
    ops: OpsConfig | None = None
    #: ``[[priors]]``: PACS searched for prior studies (scp_node.scheduler.priors).
    priors: tuple[PriorSource, ...] = ()

    @property
    def var_dir(self) -> Path:
        """Folder for run-time files (pid file, lock, metrics): ``[store] var_dir``, or next to
        the storage folder."""
        return self.store.var_dir if self.store.var_dir is not None else self.store.storage_dir.parent


_SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "store": StoreConfig,
    "scheduler": SchedulerConfig,
    "engine": EngineConfig,
    "export": ExportConfig,
    "audit": AuditConfig,
    "report": ReportConfig,
}
#: Sections that switch a service on by being present (None on Config when absent).
_OPTIONAL_SECTIONS: dict[str, type] = {"web": WebConfig, "ops": OpsConfig}


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


@dataclass(frozen=True)
class _EnvValue:
    """An environment override, kept raw until the target key's type is known.

    A string key must get the text as written: parsing first would turn ``1E2`` into
    ``"100.0"``, ``0x1F`` into ``"31"`` or ``true`` into ``"True"``.
    """

    name: str
    raw: str

    def for_key(self, default: Any) -> Any:
        parsed = _parse_env_value(self.raw)
        if isinstance(default, (str, Path)) and not isinstance(parsed, str):
            return self.raw
        return parsed


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        if len(parts) != 2 or (parts[0] not in _SECTIONS and parts[0] not in _OPTIONAL_SECTIONS):
            raise ConfigError(f"{name}: expected {ENV_PREFIX}<SECTION>__<KEY> with a known section")
        section = data.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"[{parts[0]}] must be a table, not {type(section).__name__}")
        section[parts[1]] = _EnvValue(name, raw)


def _coerce(section: str, cls: type, values: Any, base: Path) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{section}] must be a table, not {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"[{section}] unknown key {key!r} (known: {', '.join(sorted(known))})")
        default = known[key].default
        if default is MISSING and known[key].default_factory is not MISSING:
            default = known[key].default_factory()
        origin = ""
        if isinstance(value, _EnvValue):
            origin = f" (from {value.name})"
            value = value.for_key(default)
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError
            elif isinstance(default, Path):
                if not isinstance(value, str):
                    raise TypeError
                value = Path(value)
                if not value.is_absolute():
                    value = base / value
            elif isinstance(default, float):
                if isinstance(value, bool):
                    raise TypeError
                value = float(value)
            elif isinstance(default, int):
                if isinstance(value, bool) or int(value) != value:
                    raise TypeError
                value = int(value)
            elif isinstance(default, str):
                if not isinstance(value, str):
                    raise TypeError
            elif isinstance(default, dict):  # nested tables, e.g. [engine.prompts.<name>]
                if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
                    raise TypeError
                value = {str(k): dict(v) for k, v in value.items()}
            elif isinstance(default, tuple):  # lists of strings (e.g. token hashes)
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise TypeError
                value = tuple(value)
        except (TypeError, ValueError):
            what = ("list of strings" if isinstance(default, tuple) else "table of tables"
                    if isinstance(default, dict) else type(default).__name__)
            raise ConfigError(f"[{section}] {key} = {value!r}{origin} is not a {what}") from None
        kwargs[key] = value
    obj = cls(**kwargs)
    # Relative defaults are also anchored at the config folder.
    for f in fields(cls):
        current = getattr(obj, f.name)
        if isinstance(current, Path) and not current.is_absolute():
            object.__setattr__(obj, f.name, base / current)
    return obj


def _sqlite_url_relative_to(url: str, base: Path) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        return prefix + str((base / url[len(prefix):]).resolve())
    return url


def _check_ae_title(where: str, value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ConfigError(f"{where}: AE title {value!r} must be 1-16 printable characters, no backslash")
    return value


def _tables(data: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
    """An array of tables (``[[name]]``), checked: a plain table or list of strings is an error."""
    items = data.get(name, [])
    if not isinstance(items, list) or not all(isinstance(t, Mapping) for t in items):
        raise ConfigError(f"{name} must be an array of tables ([[{name}]] sections)")
    return items


def from_mapping(data: Mapping[str, Any], base: Path, environ: Mapping[str, str] | None = None,
                 source: Path | None = None) -> Config:
    """Build a :class:`Config` from parsed TOML data (plus environment overrides)."""
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    _apply_env(data, os.environ if environ is None else environ)
    unknown = set(data) - set(_SECTIONS) - set(_OPTIONAL_SECTIONS) - {"peers", "destinations", "hl7_destinations",
                                                                       "webhooks", "priors"}
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}")
    sections = {name: _coerce(name, cls, data.get(name, {}), base) for name, cls in _SECTIONS.items()}
    store: StoreConfig = sections["store"]
    object.__setattr__(store, "database_url", _sqlite_url_relative_to(store.database_url, base))
    if store.var_dir is not None:  # no default to take the type from: checked here
        if not isinstance(store.var_dir, str) or not store.var_dir:
            raise ConfigError(f"[store] var_dir = {store.var_dir!r} is not a folder path")
        object.__setattr__(store, "var_dir", Path(store.var_dir) if Path(store.var_dir).is_absolute()
                           else base / store.var_dir)
    if store.duplicate_policy not in ("keep_first", "replace"):
        raise ConfigError("[store] duplicate_policy must be 'keep_first' or 'replace'")
    node: NodeConfig = sections["node"]
    _check_ae_title("[node] ae_title", node.ae_title)
    if not 0 < node.port < 65536:
        raise ConfigError(f"[node] port {node.port} is not a TCP port")
    if node.receiver_processes < 0 or node.max_associations < 1:
        raise ConfigError("[node] receiver_processes must be >= 0 (0: one per core) and max_associations >= 1")
    _node_tls(node, base)
    engine: EngineConfig = sections["engine"]
    if engine.api_key_file and not Path(engine.api_key_file).is_absolute():
        object.__setattr__(engine, "api_key_file", str(base / engine.api_key_file))
    _audit_syslog(sections["audit"], base)
    if store.min_free_bytes < 0 or not 0 <= store.min_free_percent < 100:
        raise ConfigError("[store] min_free_bytes must be >= 0 and min_free_percent in [0, 100)")

    peers = []
    for i, p in enumerate(_tables(data, "peers")):
        try:
            peers.append(Peer(ae_title=_check_ae_title(f"[[peers]] #{i + 1}", str(p["ae_title"])),
                              host=str(p["host"])))
        except KeyError as exc:
            raise ConfigError(f"[[peers]] #{i + 1} needs {exc.args[0]}") from None
    web = _web_config(data["web"], base) if "web" in data else None
    dests = []
    for i, d in enumerate(_tables(data, "destinations")):
        d = dict(d)
        modalities = _modalities(i, d.pop("modalities", []))
        if isinstance(d.get("kind"), str) and d["kind"] == "dicomweb":
            dests.append(dataclasses.replace(_dicomweb_destination(i, d), modalities=modalities))
            continue
        try:
            port = d["port"]
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigError(f"[[destinations]] #{i + 1} port = {port!r} is not a TCP port")
            dest = Destination(name=str(d["name"]),
                               ae_title=_check_ae_title(f"[[destinations]] #{i + 1}", str(d["ae_title"])),
                               host=str(d["host"]), port=port, kind=str(d.get("kind", "dimse")),
                               **_destination_tls(i, d, base))
        except KeyError as exc:
            raise ConfigError(f"[[destinations]] #{i + 1} needs {exc.args[0]}") from None
        if dest.kind != "dimse":
            raise ConfigError(f"[[destinations]] {dest.name}: kind {dest.kind!r} is not supported "
                              "(use 'dimse' or 'dicomweb')")
        dests.append(dataclasses.replace(dest, modalities=modalities))
    if len({d.name for d in dests}) != len(dests):
        raise ConfigError("[[destinations]] names must be unique")
    hl7 = tuple(_hl7_destination(i, d, base) for i, d in enumerate(_tables(data, "hl7_destinations")))
    hooks = tuple(_webhook(i, d, base) for i, d in enumerate(_tables(data, "webhooks")))
    names = [d.name for d in dests] + [h.name for h in hl7] + [w.name for w in hooks]
    if len(set(names)) != len(names):
        raise ConfigError("[[hl7_destinations]] and [[webhooks]] names must be unique and differ from the "
                          "[[destinations]] names (an export is queued under its destination's name)")
    ops = _ops_config(data["ops"], base) if "ops" in data else None
    priors = tuple(_prior_source(i, d, node.ae_title) for i, d in enumerate(_tables(data, "priors")))
    if len({p.name for p in priors}) != len(priors):
        raise ConfigError("[[priors]] names must be unique")
    sched: SchedulerConfig = sections["scheduler"]
    if sched.claim_lease_seconds < 10 or sched.heartbeat_seconds <= 0 \
            or sched.heartbeat_seconds * 2 > sched.claim_lease_seconds:
        raise ConfigError("[scheduler] claim_lease_seconds must be >= 10 and at least twice heartbeat_seconds "
                          "(> 0): a claim is renewed every heartbeat")
    return Config(peers=tuple(peers), destinations=tuple(dests), source=source, web=web,
                  hl7_destinations=hl7, webhooks=hooks, ops=ops, priors=priors, **sections)


def _prior_source(i: int, d: Mapping[str, Any], own_ae_title: str) -> PriorSource:
    """One ``[[priors]]`` table: name, ae_title, host, port; look-back, timeout, retrieval."""
    where = f"[[priors]] #{i + 1}"
    _no_unknown_keys(where, PriorSource, d)
    missing = [k for k in ("name", "ae_title", "host", "port") if k not in d]
    if missing:
        raise ConfigError(f"{where} needs {', '.join(missing)}")
    port = d["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{where} port = {port!r} is not a TCP port")
    try:
        src = PriorSource(name=str(d["name"]), ae_title=_check_ae_title(where, str(d["ae_title"])),
                          host=str(d["host"]), port=port, lookback_days=int(d.get("lookback_days", 1825)),
                          timeout_seconds=float(d.get("timeout_seconds", 30.0)),
                          retrieve=str(d.get("retrieve", "c-move")).lower(),
                          move_destination=str(d.get("move_destination", "") or own_ae_title))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if src.retrieve not in ("c-move", "c-get"):
        raise ConfigError(f"{where} retrieve = {src.retrieve!r}: use 'c-move' or 'c-get'")
    if src.lookback_days < 1 or src.timeout_seconds <= 0:
        raise ConfigError(f"{where} lookback_days must be >= 1 and timeout_seconds > 0")
    _check_ae_title(f"{where} move_destination", src.move_destination)
    return src


def _no_unknown_keys(where: str, cls: type, d: Mapping[str, Any]) -> None:
    """Refuse a table key that ``cls`` has no field for (a typo must not be ignored)."""
    known = {f.name for f in fields(cls)} - {"kind"}
    extra = set(d) - known
    if extra:
        raise ConfigError(f"{where}: unknown keys {sorted(extra)} (known: {', '.join(sorted(known))})")


def _webhook(i: int, d: Mapping[str, Any], base: Path) -> WebhookDestination:
    """One ``[[webhooks]]`` table: name and an https URL; token_file, tls_ca, timeout_seconds, modalities."""
    from urllib.parse import urlsplit

    where = f"[[webhooks]] #{i + 1}"
    _no_unknown_keys(where, WebhookDestination, d)
    if not isinstance(d.get("name"), str) or not d["name"].strip():
        raise ConfigError(f"{where} needs name (a string)")
    url = d.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    try:
        ok = parts is not None and parts.scheme == "https" and bool(parts.hostname) and parts.port != 0
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{where} ({d['name']}): url must be https://host[:port]/path (results travel encrypted)")
    paths = {}
    for key in ("token_file", "tls_ca"):
        value = d.get(key, "")
        if not isinstance(value, str):
            raise ConfigError(f"{where} ({d['name']}): {key} must be a path string")
        paths[key] = str(base / value) if value and not Path(value).is_absolute() else value
    timeout = d.get("timeout_seconds", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"{where} ({d['name']}): timeout_seconds must be a positive number")
    try:
        modalities = _modalities(i, d.get("modalities", []))
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("[[destinations]]", "[[webhooks]]")) from None
    return WebhookDestination(name=d["name"].strip(), url=url, timeout_seconds=float(timeout),  # type: ignore[arg-type]
                              modalities=modalities, **paths)


def _audit_syslog(audit: AuditConfig, base: Path) -> None:
    """``[audit] syslog_url`` = ``tls://host:port`` (TLS only: RFC 5425), its PEM files anchored at ``base``."""
    from urllib.parse import urlsplit

    for key in ("syslog_ca", "syslog_cert", "syslog_key"):
        value = getattr(audit, key)
        if value and not Path(value).is_absolute():
            object.__setattr__(audit, key, str(base / value))
    if bool(audit.syslog_cert) != bool(audit.syslog_key):
        raise ConfigError("[audit] syslog_cert and syslog_key must be set together")
    if not audit.syslog_url:
        return
    parts = urlsplit(audit.syslog_url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tls" or not parts.hostname or not port or parts.path not in ("", "/"):
        raise ConfigError(f"[audit] syslog_url = {audit.syslog_url!r} must be tls://host:port "
                          "(syslog over TLS, RFC 5425; 6514 is the usual port)")


def _ops_config(values: Any, base: Path) -> OpsConfig:
    """``[ops]``: the metrics and health port (loopback unless the admin says otherwise)."""
    ops: OpsConfig = _coerce("ops", OpsConfig, values, base)
    if not 0 < ops.port < 65536:
        raise ConfigError(f"[ops] port {ops.port} is not a TCP port")
    if ops.heartbeat_max_seconds <= 5:
        raise ConfigError("[ops] heartbeat_max_seconds must be more than 5 (the heartbeat runs every 5 s)")
    return ops


def _hl7_destination(i: int, d: Mapping[str, Any], base: Path) -> HL7Destination:
    """One ``[[hl7_destinations]]`` table: name, host, port; MSH names, TLS, ACK handling, routing."""
    where = f"[[hl7_destinations]] #{i + 1}"
    _no_unknown_keys(where, HL7Destination, d)
    for key in ("name", "host"):
        if not isinstance(d.get(key), str) or not d[key].strip():
            raise ConfigError(f"{where} needs {key} (a string)")
    port = d.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{where} ({d['name']}): port = {port!r} is not a TCP port")
    kwargs: dict[str, Any] = {}
    for key in ("sending_application", "sending_facility", "receiving_application", "receiving_facility"):
        if key in d:
            value = d[key]
            if not isinstance(value, str) or len(value) > 180 or any(c in value for c in "|^~\\&\r\n"):
                raise ConfigError(f"{where} ({d['name']}): {key} must be a string of at most 180 characters "
                                  "without HL7 delimiters (| ^ ~ \\ &)")
            kwargs[key] = value
    timeout = d.get("ack_timeout_seconds", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"{where} ({d['name']}): ack_timeout_seconds must be a positive number")
    kwargs["ack_timeout_seconds"] = float(timeout)
    acks = d.get("dead_letter_acks", ["AE"])
    if not isinstance(acks, list) or not all(isinstance(a, str) and a.upper() in ("AE", "AR") for a in acks):
        raise ConfigError(f"{where} ({d['name']}): dead_letter_acks must be a list of 'AE' / 'AR'")
    try:
        tls = _destination_tls(i, d, base)
        modalities = _modalities(i, d.get("modalities", []))
    except ConfigError as exc:  # those helpers name [[destinations]]
        raise ConfigError(str(exc).replace("[[destinations]]", "[[hl7_destinations]]")) from None
    return HL7Destination(name=d["name"].strip(), host=d["host"].strip(), port=port,
                          dead_letter_acks=tuple(a.upper() for a in acks), modalities=modalities, **tls, **kwargs)


def _modalities(i: int, value: Any) -> tuple[str, ...]:
    """``modalities = ["CT", "CR"]`` of a destination: its routing rule."""
    if not isinstance(value, list) or not all(isinstance(m, str) and m.strip() for m in value):
        raise ConfigError(f"[[destinations]] #{i + 1} modalities must be a list of modality codes")
    return tuple(m.strip().upper() for m in value)


def _destination_tls(i: int, d: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """``tls = true`` (+ ``tls_ca``, ``tls_cert``, ``tls_key``) of a dimse destination, paths anchored at ``base``."""
    where = f"[[destinations]] #{i + 1}"
    tls = d.get("tls", False)
    if not isinstance(tls, bool):
        raise ConfigError(f"{where} tls must be true or false")
    out: dict[str, Any] = {"tls": tls}
    for key in ("tls_ca", "tls_cert", "tls_key"):
        value = d.get(key, "")
        if not isinstance(value, str):
            raise ConfigError(f"{where} {key} must be a path string")
        out[key] = str(base / value) if value and not Path(value).is_absolute() else value
    if bool(out["tls_cert"]) != bool(out["tls_key"]):
        raise ConfigError(f"{where} tls_cert and tls_key must be set together")
    return out


def _node_tls(node: NodeConfig, base: Path) -> None:
    """Anchor the ``[node]`` TLS paths at the config folder and check they come as a pair."""
    if bool(node.tls_cert) != bool(node.tls_key):
        raise ConfigError("[node] tls_cert and tls_key must be set together")
    if node.tls_ca and not node.tls_cert:
        raise ConfigError("[node] tls_ca needs tls_cert and tls_key (client certificates are checked over TLS)")
    for key in ("tls_cert", "tls_key", "tls_ca"):
        value = getattr(node, key)
        if value and not Path(value).is_absolute():
            object.__setattr__(node, key, str(base / value))


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _web_config(values: Any, base: Path) -> WebConfig:
    """``[web]``: checked so that a typo cannot open an unauthenticated or half-TLS service."""
    web: WebConfig = _coerce("web", WebConfig, values, base)
    if not 0 < web.port < 65536:
        raise ConfigError(f"[web] port {web.port} is not a TCP port")
    hashes = tuple(h.strip().lower() for h in web.token_sha256)
    if not hashes:
        raise ConfigError("[web] token_sha256 needs at least one SHA-256 (hex) of a bearer token; "
                          "every DICOMweb route requires a token")
    bad = [i + 1 for i, h in enumerate(hashes) if not _SHA256_HEX.match(h)]
    if bad:
        raise ConfigError(f"[web] token_sha256 entries {bad} are not 64 hex characters (a SHA-256, not the token)")
    for key in ("max_body_bytes", "max_parts", "header_timeout_seconds", "keep_alive_seconds", "max_connections"):
        if getattr(web, key) <= 0:
            raise ConfigError(f"[web] {key} must be positive")
    if bool(web.tls_cert) != bool(web.tls_key):
        raise ConfigError("[web] tls_cert and tls_key must be set together")
    tls = {k: str(base / v) if v and not Path(v).is_absolute() else v
           for k, v in (("tls_cert", web.tls_cert), ("tls_key", web.tls_key))}
    return dataclasses.replace(web, token_sha256=hashes, **tls)


def _dicomweb_destination(i: int, d: Mapping[str, Any]) -> Destination:
    """A ``kind = "dicomweb"`` destination: a name and an http(s) URL (plus an optional token)."""
    from urllib.parse import urlsplit

    where = f"[[destinations]] #{i + 1}"
    if not isinstance(d.get("name"), str) or not d["name"]:
        raise ConfigError(f"{where} needs name")
    url = d.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where} ({d['name']}): kind 'dicomweb' needs url = \"http(s)://host[:port]/path\"")
    token = d.get("token", "")
    if not isinstance(token, str):
        raise ConfigError(f"{where} ({d['name']}): token must be a string")
    extra = set(d) - {"name", "kind", "url", "token", "ae_title"}
    if extra:
        raise ConfigError(f"{where} ({d['name']}): keys {sorted(extra)} do not apply to kind 'dicomweb'")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"{where} ({d['name']}): url has an invalid port") from None
    return Destination(name=d["name"], ae_title=str(d.get("ae_title", "")), host=parts.hostname, port=port,
                       kind="dicomweb", url=url.rstrip("/"), token=token)


def load(path: Path | str, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file at ``path`` and apply environment overrides."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return from_mapping(data, path.resolve().parent, environ, source=path.resolve())
