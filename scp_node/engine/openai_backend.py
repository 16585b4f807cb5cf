"""MedGemma behind an OpenAI-compatible server: the engine's interface, over HTTP.

Why: one GPU inside the node's own process is the small case. A hospital that shares a GPU server
runs **vLLM** (``vllm serve google/medgemma-1.5-4b-it``: continuous batching, xgrammar-guided JSON)
on the same host or on the LAN, and the node becomes one of its clients. :class:`OpenAIBackend` has
what the scheduler and the node use of :class:`~scp_node.engine.medgemma.MedGemmaEngine` — ``load``,
``identity``, ``max_batch``, ``analyse_batch``, ``analyse_series`` — and builds exactly the same
conversations (:mod:`.prompts`), schema (:mod:`.schema`) and results (:mod:`.answer`); only the
generation happens elsewhere. It never imports torch.

* **Requests.** ``POST {base_url}/chat/completions``, greedy (``temperature`` 0), one per series and
  turn; at most ``max_concurrent`` in flight (threads). Images go as ``data:`` URIs, **PNG** by
  default: lossless, so the server's processor sees exactly the pixels the embedded engine would —
  the CT recipe packs three HU windows into R, G and B, and JPEG's chroma subsampling would blur two
  of them. ``image_format = "jpeg"`` sends them as Google's high_dimensional_ct notebook does (PIL's
  JPEG defaults), about a tenth of the bytes, for a slow link.
* **Answer modes**, as in the embedded engine (``[engine] answer_mode``): "report" (default) is two
  requests — the free-text report with the profile's budget (Google's 2000 tokens for CT/MR), then
  the extraction turn of the same conversation (:func:`~.prompts.extraction_messages`) under the
  findings schema; "structured" is one request under the schema; "free" the JSON prompt without it.
  The schema goes as ``response_format`` ``{"type": "json_schema", ...}``; a server that ignores it
  (``transformers serve`` does) gets the lenient parser of :mod:`.answer`, and the audit row of that
  request says the fallback was used.
* **Failures.** Connection errors, timeouts, 429 and 5xx are retried ``max_retries`` times with
  exponential backoff; then the series fails with :class:`ServerError` naming the server and what
  went wrong (the scheduler's attempts apply). A prompt longer than the server's context is
  :class:`SeriesSkipped`, as in the embedded engine.
* **Zero egress.** Every connection goes to an address :mod:`.egress` has just checked (loopback,
  or allowed by ``[engine] allowed_hosts``); ``http.client`` is used because it never consults
  ``HTTP(S)_PROXY`` (``requests``, ``httpx`` and ``urllib`` do by default, which would send the
  images to a proxy). Every request is audited: server, model, image count and bytes, tokens,
  status, time — never prompt text, answer text or image bytes.
* **Identity.** The node cannot read the server's weights: the SR names the served model and the
  SHA-256 given in ``[engine] weights_sha256``, and its Algorithm Parameters say that the hash is
  the configured one. When the served model is a local folder the node can read (``transformers
  serve /path``), the hash is checked against that folder at start.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import random
import re
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .answer import parse_answer, render_text
from .egress import EgressError, ServerURL, check_allowed_hosts, check_base_url, checked_addresses
from .modeldir import is_test_model, weights_sha256
from .preprocess import (DEFAULT_CT_MAX_SLICES, DEFAULT_IMAGE_SIZE, PreparedSeries, SeriesSkipped,
                         prepare_series)
from .longitudinal import conversation, prepare_with_prior
from .prompts import (THINKING_EXTRA_TOKENS, PromptProfile, extraction_messages, merged_profiles,
                      profile_for_modality, validate_profiles)
from .result import AnalysisResult, ModelIdentity, PriorStudy
from .schema import LANGUAGES, SchemaBounds
from .thinking import strip_thinking_trace

log = logging.getLogger(__name__)

#: Audit events of this backend (strings, like scp_node.audit.Event's).
EVENT_REQUEST = "engine.request"  #: one HTTP request to the model server (each attempt)
EVENT_SERVER = "engine.server"  #: the server checked at start: address, model served

#: As the embedded engine's: "report" (free-text report, then a schema-constrained extraction turn
#: of the same conversation), "structured" (one schema-constrained answer), "free" (JSON prompt, parser).
ANSWER_MODES = ("report", "structured", "free")
IMAGE_FORMATS = ("png", "jpeg")
#: HTTP statuses worth another try: the server is busy, restarting or behind a proxy that is.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_CONTEXT_TOO_LONG = re.compile(
    r"maximum context length|maximum model length|max[-_]model[-_]len|takes at most \d+", re.IGNORECASE)
_MEDGEMMA_NAME = re.compile(r"medgemma[-_ ]?(?:(?P<version>\d+(?:\.\d+)*)[-_ ])?(?P<size>\d+)b", re.IGNORECASE)
#: Same text as scp_node.engine.medgemma.TEST_MODEL_NAME (not imported: that module loads torch).
TEST_MODEL_NAME = "scp_node TEST MODEL: tiny random weights, MedGemma architecture"


class ServerError(RuntimeError):
    """The model server could not answer (after the retries); the message says which and why."""


class BackendStartError(RuntimeError):
    """The backend cannot start (egress refused, API key file unreadable, weights hash mismatch)."""


@dataclass(frozen=True)
class Completion:
    """One answer of the server."""

    text: str  #: the message content, thinking trace removed
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str
    attempts: int
    status: int = 200


@dataclass
class _RequestLog:
    """What the audit row of one request says (no PHI: UIDs, counts, sizes, times)."""

    study_uid: str = ""
    series_uid: str = ""
    turn: str = "answer"  #: "answer", "report" or "extraction"
    images: int = 0
    image_bytes: int = 0
    schema: bool = False


@dataclass
class _Images:
    """``data:`` URIs of a series' images, encoded once (report mode sends them twice)."""

    fmt: str
    uris: dict[int, str] = field(default_factory=dict)
    nbytes: int = 0

    def uri(self, image: Any) -> str:
        key = id(image)
        if key not in self.uris:
            self.uris[key], size = image_data_uri(image, self.fmt)
            self.nbytes += size
        return self.uris[key]


def image_data_uri(image: Any, fmt: str = "png") -> tuple[str, int]:
    """``(data URI, encoded bytes)`` of a PIL image: PNG (lossless, zlib level 1: fast, the bytes
    stay on the LAN) or JPEG with PIL's defaults, as Google's CT notebook encodes slices."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, not {fmt!r}")
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.convert("RGB").save(buffer, format="JPEG")
    data = buffer.getvalue()
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode('ascii')}", len(data)


def openai_messages(messages: Sequence[Mapping[str, Any]], images: _Images) -> list[dict[str, Any]]:
    """The engine's chat messages (PIL images in ``{"type": "image"}`` items) in OpenAI's format."""
    out: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for item in content or []:
            if item.get("type") == "image":
                parts.append({"type": "image_url", "image_url": {"url": images.uri(item["image"])}})
            elif item.get("type") == "text":
                parts.append({"type": "text", "text": item["text"]})
            else:
                raise ValueError(f"cannot send a {item.get('type')!r} item to the server")
        out.append({"role": message["role"], "content": parts})
    return out


def response_format(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The findings schema as OpenAI's structured-output ``response_format`` (vLLM: xgrammar)."""
    return {"type": "json_schema", "json_schema": {"name": "findings", "schema": dict(schema), "strict": True}}


def is_strict_json(text: str) -> bool:
    """True when ``text`` is one JSON object and nothing else: what a server honouring
    ``response_format`` returns. Anything looser needed the lenient parser."""
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def served_identity(model: str, sha256: str, url: ServerURL) -> ModelIdentity:
    """Algorithm Identification for a served model: its name, the configured hash, the server.

    ``device`` and ``dtype`` end up in the SR's Algorithm Parameters and Contributing Equipment:
    they say where the model ran and that the node took the weights hash from its config.
    """
    digest = sha256.strip().lower()
    folder = Path(model)
    test_model = folder.is_dir() and is_test_model(folder)
    match = _MEDGEMMA_NAME.search(model)
    if test_model:
        name, version = TEST_MODEL_NAME, f"test-{digest[:12]}"
    elif match:
        version = match.group("version") or "1"
        name = f"MedGemma {version} {match.group('size')}B"
    else:
        name, version = (model.rsplit("/", 1)[-1] or model)[:64], f"sha256-{digest[:12]}"
    served = model if len(model) <= 80 else "..." + model[-77:]
    return ModelIdentity(
        name=name[:64],
        version=version[:64],
        weights_sha256=digest,
        is_test_model=test_model,
        device=f"openai-compatible server {url.netloc}, model {served} (weights not readable by the node: "
               "weights_sha256 as configured)",
        dtype="as served",
    )


class _Connections:
    """One persistent HTTP connection per thread, each opened to an address checked just before."""

    def __init__(self, url: ServerURL, allowed_hosts: Sequence[str], connect_timeout: float,
                 request_timeout: float, resolver: Callable[..., Any] = socket.getaddrinfo) -> None:
        self.url = url
        self.allowed_hosts = tuple(allowed_hosts)
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.resolver = resolver
        self._local = threading.local()
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None

    #: A kept-alive connection idle this long is not reused: servers close idle ones (uvicorn, which
    #: vLLM and transformers serve run on, after 5 s), and a request body of 80 MB sent into a
    #: connection the server is closing fails half-way.
    IDLE_SECONDS = 2.0

    def get(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection and whether it is a reused one (a fresh one is opened when needed)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and time.monotonic() - getattr(self._local, "used", 0.0) > self.IDLE_SECONDS:
            self.drop()
            conn = None
        if conn is None:
            conn = self._open()
            self._local.conn = conn
            return conn, False
        return conn, True

    def used(self) -> None:
        self._local.used = time.monotonic()

    def drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _open(self) -> http.client.HTTPConnection:
        addresses = checked_addresses(self.url, self.allowed_hosts, self.resolver)  # EgressError: never connect
        last: OSError | None = None
        for address in addresses:
            if self._ssl is not None:
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    self.url.host, self.url.port, timeout=self.connect_timeout, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self.url.host, self.url.port, timeout=self.connect_timeout)
            # Connect to the address that was checked (TLS still verifies the host name): no second,
            # unchecked DNS answer can send the images elsewhere.
            conn._create_connection = (  # type: ignore[attr-defined]
                lambda _addr, timeout=None, source=None, a=address:
                socket.create_connection((a, self.url.port), timeout, source))
            try:
                conn.connect()
            except OSError as exc:
                conn.close()
                last = exc
                continue
            assert conn.sock is not None
            conn.sock.settimeout(self.request_timeout)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn
        assert last is not None
        raise last


class OpenAIBackend:
    """Analyse DICOM series with a model served by an OpenAI-compatible server (vLLM)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        weights_sha256: str,
        allowed_hosts: Sequence[str] = (),
        api_key: str = "",
        max_concurrent: int = 4,
        connect_timeout: float = 10.0,
        request_timeout: float = 600.0,
        max_retries: int = 3,
        retry_backoff: float = 2.0,
        image_format: str = "png",
        answer_mode: str = "report",
        thinking: bool = False,
        max_new_tokens: int = 2000,
        ct_max_slices: int = DEFAULT_CT_MAX_SLICES,
        mr_max_slices: int | None = None,
        prompt_profiles: Mapping[str, Mapping[str, Any]] | None = None,
        language: str = "en",
        schema_bounds: SchemaBounds = SchemaBounds(),
        audit: Any = None,
        resolver: Callable[..., Any] = socket.getaddrinfo,
    ) -> None:
        """``audit``: an :class:`~scp_node.audit.AuditTrail` (None: no audit rows, for the bench).
        ``resolver``: ``socket.getaddrinfo`` or a stand-in (tests of the egress rule)."""
        check_allowed_hosts(allowed_hosts)
        self.url = check_base_url(base_url, allowed_hosts)  # EgressError before anything else
        if not re.fullmatch(r"[0-9a-fA-F]{64}", weights_sha256.strip()):
            raise ValueError("weights_sha256 must be 64 hex digits (the SHA-256 of the served weights)")
        if answer_mode not in ANSWER_MODES:
            raise ValueError(f"answer_mode must be one of {ANSWER_MODES}, not {answer_mode!r}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, not {image_format!r}")
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {LANGUAGES}, not {language!r}")
        if max_concurrent < 1 or max_new_tokens < 1 or ct_max_slices < 1 or max_retries < 0:
            raise ValueError("max_concurrent, max_new_tokens and ct_max_slices must be >= 1, max_retries >= 0")
        if prompt_profiles:
            validate_profiles(prompt_profiles)
        self.model = model
        self.weights_sha256 = weights_sha256.strip().lower()
        self.allowed_hosts = tuple(allowed_hosts)
        self._api_key = api_key
        self.max_concurrent = max_concurrent
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.image_format = image_format
        self.answer_mode = answer_mode
        self.thinking = thinking
        self.max_new_tokens = max_new_tokens
        self.ct_max_slices = ct_max_slices
        self.mr_max_slices = mr_max_slices if mr_max_slices is not None else ct_max_slices
        self.prompt_profiles = merged_profiles(prompt_profiles)
        self.language = language
        self.schema_bounds = schema_bounds
        self.audit = audit
        self._connections = _Connections(self.url, self.allowed_hosts, connect_timeout, request_timeout, resolver)
        self._in_flight = threading.BoundedSemaphore(max_concurrent)
        self._pool: ThreadPoolExecutor | None = None
        self._identity: ModelIdentity | None = None
        self._lock = threading.Lock()
        self.requests = 0  #: HTTP requests sent (each attempt)
        self.fallbacks = 0  #: answers that needed the lenient parser although a schema was sent

    @classmethod
    def from_config(cls, engine: Any, audit: Any = None) -> "OpenAIBackend":
        """From ``[engine]`` (an EngineConfig with ``backend = "openai"``)."""
        from .schema import engine_bounds

        api_key = ""
        if engine.api_key_file:
            try:
                api_key = Path(engine.api_key_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise BackendStartError(f"[engine] api_key_file {engine.api_key_file}: {exc.strerror or exc}") from None
        mode = getattr(engine, "answer_mode", None) or (
            "report" if engine.structured is None else "structured" if engine.structured else "free")
        return cls(engine.base_url, engine.model, weights_sha256=engine.weights_sha256,
                   allowed_hosts=engine.allowed_hosts, api_key=api_key, max_concurrent=engine.max_concurrent,
                   connect_timeout=engine.connect_timeout_seconds, request_timeout=engine.request_timeout_seconds,
                   max_retries=engine.max_retries, retry_backoff=engine.retry_backoff_seconds,
                   image_format=engine.image_format, answer_mode=mode, thinking=bool(getattr(engine, "thinking", False)),
                   max_new_tokens=engine.max_new_tokens,
                   ct_max_slices=engine.ct_max_slices, prompt_profiles=engine.prompts or None,
                   language=engine.language, schema_bounds=engine_bounds(engine), audit=audit)

    # ---------------------------------------------------------------------------------------------
    # What the node and the scheduler use
    # ---------------------------------------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        """Series the scheduler hands over at once: as many as may be in flight."""
        return self.max_concurrent

    @property
    def loaded(self) -> bool:
        return self._identity is not None

    @property
    def image_size(self) -> int:
        """Side of the square images sent (MedGemma's 896; the server's processor resizes anyway)."""
        return DEFAULT_IMAGE_SIZE

    def load(self) -> None:
        """Check where the server is (egress rule, with DNS), ask it which models it serves, settle
        the identity. Raises :class:`BackendStartError` when the node must not start; an unreachable
        server is only logged and audited (it may start after the node; analyses retry)."""
        if self._identity is not None:
            return
        with self._lock:
            if self._identity is not None:
                return
            try:
                addresses = checked_addresses(self.url, self.allowed_hosts, self._connections.resolver)
            except EgressError as exc:
                self._record(EVENT_SERVER, "failure", f"refused {self.url}: {exc}")
                raise BackendStartError(str(exc)) from None
            except OSError as exc:
                addresses = []
                log.warning("model server %s: %s", self.url, exc)
            self._check_local_weights()
            served = self._served_models()
            detail = (f"{self.url} ({', '.join(addresses) or 'not resolved'}); model {self.model}; "
                      f"{'serves ' + ', '.join(served[:5]) if served is not None else 'not reachable now'}")
            if served is not None and self.model not in served:
                log.warning("the server at %s serves %s, not %r: requests will fail until it serves that model",
                            self.url, ", ".join(served) or "no model", self.model)
                self._record(EVENT_SERVER, "warning", detail + f"; {self.model} is not among them")
            else:
                self._record(EVENT_SERVER, "success" if served is not None else "warning", detail)
            self._identity = served_identity(self.model, self.weights_sha256, self.url)
            log.info("model %s served by %s (%d requests at once, %s images, answer mode %s)%s",
                     self.model, self.url, self.max_concurrent, self.image_format, self.answer_mode,
                     " - TEST MODEL, output is meaningless" if self._identity.is_test_model else "")

    @property
    def identity(self) -> ModelIdentity:
        self.load()
        assert self._identity is not None
        return self._identity

    def prepare(self, paths: Sequence[Path]) -> PreparedSeries:
        return prepare_series(paths, image_size=self.image_size, ct_max_slices=self.ct_max_slices,
                              mr_max_slices=self.mr_max_slices)

    def profile_for(self, modality: str, body_part: str = "", n_images: int = 0) -> PromptProfile:
        try:
            return profile_for_modality(modality, self.prompt_profiles, body_part, n_images)
        except KeyError as exc:
            raise SeriesSkipped(f"no prompt profile is configured for modality {modality}") from exc

    def analyse_series(self, paths: list[Path], prior: PriorStudy | None = None) -> AnalysisResult:
        [result] = self.analyse_batch([paths], priors=[prior])
        if isinstance(result, BaseException):
            raise result
        return result

    def analyse_batch(self, jobs: Sequence[Sequence[Path]],
                      priors: Sequence[PriorStudy | None] | None = None) -> list[AnalysisResult | BaseException]:
        """Analyse series concurrently (``max_concurrent`` at once); one entry per job, in order: the
        result or that job's exception (SeriesSkipped, ServerError, ...). Never raises for a job.
        ``priors``: one per job (None: none), as the embedded engine's (:mod:`.longitudinal`)."""
        self.load()
        if not jobs:
            return []
        priors = list(priors) if priors is not None else [None] * len(jobs)
        if len(priors) != len(jobs):
            raise ValueError(f"analyse_batch got {len(priors)} priors for {len(jobs)} jobs")
        futures = [self._executor().submit(self._analyse, list(paths), prior) for paths, prior in zip(jobs, priors)]
        out: list[AnalysisResult | BaseException] = []
        for index, future in enumerate(futures):
            try:
                out.append(future.result())
            except Exception as exc:  # noqa: BLE001 - recorded for this job; the others go on
                if not isinstance(exc, (SeriesSkipped, ServerError)):
                    log.warning("series %d of the batch failed: %s", index + 1, type(exc).__name__)
                out.append(exc)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---------------------------------------------------------------------------------------------
    # One series
    # ---------------------------------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrent, thread_name_prefix="openai-backend")
            return self._pool

    def report_budget(self, profile: PromptProfile) -> int:
        """New tokens of a free-text answer, as the embedded engine counts them: the profile's budget
        (Google's: 2000 for CT/MR volumes, 500 for images), +1000 when thinking, at most max_new_tokens."""
        budget = profile.max_new_tokens or self.max_new_tokens
        if self.thinking:
            budget += THINKING_EXTRA_TOKENS
        return max(1, min(budget, self.max_new_tokens))

    def _analyse(self, paths: list[Path], prior: PriorStudy | None = None) -> AnalysisResult:
        """One series (with its prior) in this backend's answer mode: the embedded engine's conversations,
        as requests."""
        started = time.perf_counter()
        prepared, pair, comparison = prepare_with_prior(paths, prior, image_size=self.image_size,
                                                        ct_max_slices=self.ct_max_slices,
                                                        mr_max_slices=self.mr_max_slices)
        prepare_seconds = time.perf_counter() - started
        n = len(prepared.images)
        profile = self.profile_for(prepared.modality, prepared.body_part, n)
        language = profile.language or self.language
        talk = conversation(prepared, profile, pair, answer_mode=self.answer_mode, language=language,
                            thinking=self.thinking, bounds=self.schema_bounds)
        localisation, schema, answer_limit, messages = talk.localisation, talk.schema, talk.answer_limit, talk.messages
        images = _Images(self.image_format)
        study_uid, series_uid = _series_uids(paths)
        n_input = n + (len(pair.prepared.images) if pair is not None else 0)

        def context(turn: str) -> _RequestLog:
            return _RequestLog(study_uid, series_uid, turn, n_input)

        turns: list[tuple[str, Completion]] = []
        if self.answer_mode == "report":
            log_report = context("report")
            report = self.complete(messages, self.report_budget(profile), None, images=images, context=log_report)
            self._audit_answer(log_report, report, "report: free text", "success")
            turns.append(("report", report))
            extraction = extraction_messages(messages, report.text, language, localisation=localisation,
                                             n_images=n, compared=talk.compared)
            log_answer = context("extraction")
            answer = self.complete(extraction, answer_limit, schema, images=images, context=log_answer)
            turns.append(("extraction", answer))
        else:
            structured_mode = self.answer_mode == "structured"
            log_answer = context("answer")
            answer = self.complete(messages, answer_limit if structured_mode else self.report_budget(profile),
                                   schema if structured_mode else None, images=images, context=log_answer)
            turns.append(("answer", answer))
        structured, error = parse_answer(answer.text, prepared.transforms, language, talk.compared)
        self._audit_parsed(log_answer, answer, structured is not None, error)
        if self.answer_mode == "report":
            text = turns[0][1].text or (render_text(structured, language) if structured is not None else "")
            if structured is None:
                log.warning("%s series: the findings could not be extracted from the report (%s)",
                            prepared.modality, error)
        elif structured is not None:
            text = render_text(structured, language)
        else:
            text = answer.text
            log.warning("%s series: the answer is not structured (%s); the free text is the report",
                        prepared.modality, error)
        seconds = time.perf_counter() - started
        log.info("analysed %s series by %s (%s mode): %d image(s) (%s %.1f MB); %s; preprocess %.2f s",
                 prepared.modality, self.url.netloc, self.answer_mode, n, self.image_format, images.nbytes / 1e6,
                 "; ".join(f"{name} {c.prompt_tokens} input + {c.completion_tokens} new tokens in {c.seconds:.2f} s"
                           for name, c in turns), prepare_seconds)
        return _result(modality=prepared.modality, findings_text=text, model=self.identity,
                       sources=list(prepared.sources), prompt_profile=profile.name,
                       generated_tokens=sum(c.completion_tokens for _, c in turns), seconds=seconds,
                       structured=structured, parse_error=error, language=language, answer_mode=self.answer_mode,
                       turns=turns, prepare_seconds=prepare_seconds,
                       comparison=pair.comparison() if pair is not None else comparison)

    # ---------------------------------------------------------------------------------------------
    # HTTP
    # ---------------------------------------------------------------------------------------------

    def complete(self, messages: Sequence[Mapping[str, Any]], max_tokens: int,
                 schema: Mapping[str, Any] | None = None, *, images: _Images | None = None,
                 context: _RequestLog | None = None) -> Completion:
        """One chat completion (greedy), retried on connection errors, timeouts, 429 and 5xx.

        Raises :class:`ServerError` after the last attempt, :class:`SeriesSkipped` when the prompt
        does not fit the server's context, :class:`EgressError` when the server's address is refused.
        """
        images = images or _Images(self.image_format)
        context = context or _RequestLog()
        body: dict[str, Any] = {
            "model": self.model,
            "messages": openai_messages(messages, images),
            "max_tokens": int(max_tokens),
            "temperature": 0.0,
            "top_p": 1.0,
            "stream": False,
        }
        if schema is not None:
            body["response_format"] = response_format(schema)
        context.image_bytes, context.schema = images.nbytes, schema is not None
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        del body
        attempts = self.max_retries + 1
        last = ""
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            try:
                with self._in_flight:
                    self.requests += 1
                    status, data = self._post("/chat/completions", payload)
            except EgressError as exc:
                self._audit_failure(context, attempt, attempts, f"refused: {exc}", final=True)
                raise
            except (OSError, http.client.HTTPException) as exc:
                self._connections.drop()
                last = f"{type(exc).__name__}: {exc}"[:300]
                retry = True
            else:
                seconds = time.perf_counter() - started
                if status == 200:
                    return self._completion(data, seconds, attempt)
                message = _error_message(data)
                last = f"HTTP {status}: {message}"
                if status == 400 and _CONTEXT_TOO_LONG.search(message):
                    self._audit_failure(context, attempt, attempts, last, final=True)
                    raise SeriesSkipped(f"the series does not fit the model server's context ({message[:200]}); "
                                        "lower ct_max_slices or raise the server's --max-model-len")
                retry = status in RETRY_STATUSES
            final = not retry or attempt == attempts
            delay = 0.0 if final else self._backoff(attempt)
            self._audit_failure(context, attempt, attempts, last, final=final, delay=delay)
            if final:
                break
            log.warning("model server %s: %s; retrying in %.1f s (attempt %d of %d)", self.url.netloc, last,
                        delay, attempt, attempts)
            time.sleep(delay)
        raise ServerError(f"model server {self.url}: {last} (after {attempt} attempt(s)); check that the server "
                          f"is running and serves {self.model!r}")

    def _backoff(self, attempt: int) -> float:
        base = self.retry_backoff * (2 ** (attempt - 1))
        return min(base, 60.0) * random.uniform(0.8, 1.2)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _post(self, path: str, payload: bytes) -> tuple[int, bytes]:
        return self._request("POST", path, payload)

    def _request(self, method: str, path: str, payload: bytes | None = None) -> tuple[int, bytes]:
        """One HTTP exchange on this thread's connection. A kept-alive connection the server closed
        meanwhile fails before any answer: that is sent again at once on a new connection (not an
        attempt of its own: the server never saw the request)."""
        for fresh_only in (False, True):
            conn, reused = self._connections.get()
            try:
                conn.request(method, self.url.path + path, body=payload, headers=self._headers())
                response = conn.getresponse()
                data = response.read()
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError,
                    http.client.RemoteDisconnected) as exc:
                self._connections.drop()
                if reused and not fresh_only:
                    log.debug("model server %s closed a kept-alive connection (%s); sending again",
                              self.url.netloc, type(exc).__name__)
                    continue
                raise
            except BaseException:
                self._connections.drop()
                raise
            self._connections.used()
            if response.will_close:
                self._connections.drop()
            return response.status, data
        raise AssertionError("unreachable")

    def _completion(self, data: bytes, seconds: float, attempt: int) -> Completion:
        try:
            answer = json.loads(data)
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ServerError(f"model server {self.url}: the answer is not a chat completion "
                              f"({type(exc).__name__})") from None
        usage = answer.get("usage") or {}
        return Completion(text=strip_thinking_trace(text), prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0), seconds=seconds,
                          finish_reason=str(choice.get("finish_reason") or ""), attempts=attempt)

    def _served_models(self) -> list[str] | None:
        """Model ids of ``GET /models``; None when the server does not answer now."""
        try:
            status, data = self._request("GET", "/models")
            if status != 200:
                log.warning("model server %s: GET /models answered HTTP %d", self.url, status)
                return None
            return [str(m.get("id")) for m in json.loads(data).get("data", []) if isinstance(m, dict)]
        except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:
            self._connections.drop()
            log.warning("model server %s is not reachable now (%s: %s); analyses will retry",
                        self.url, type(exc).__name__, exc)
            return None

    def _check_local_weights(self) -> None:
        """A served model that is a folder on this host (``transformers serve /path``): its weights'
        hash must be the configured one. A model name (vLLM's ``--served-model-name``) cannot be checked."""
        folder = Path(self.model)
        if not folder.is_dir():
            return
        try:
            digest = weights_sha256(folder)
        except Exception:  # noqa: BLE001 - no weights there: nothing to compare
            return
        if digest != self.weights_sha256:
            raise BackendStartError(f"[engine] weights_sha256 {self.weights_sha256} is not the hash of the weights "
                                    f"in {folder} ({digest}), which the server serves")

    # ---------------------------------------------------------------------------------------------
    # Audit (no PHI: UIDs, counts, sizes, times; never prompt or answer text, never image bytes)
    # ---------------------------------------------------------------------------------------------

    def _record(self, event: str, outcome: str, detail: str, context: _RequestLog | None = None) -> None:
        if self.audit is None:
            return
        ids = {"study_uid": context.study_uid, "series_uid": context.series_uid} if context else {}
        self.audit.record(event, outcome=outcome, peer=self.url.netloc, detail=detail, **ids)

    def _describe(self, context: _RequestLog, attempt: int, attempts: int) -> str:
        return (f"{context.turn}: POST {self.url.path}/chat/completions model {self.model}; "
                f"{context.images} image(s), {self.image_format} {context.image_bytes / 1e6:.1f} MB; "
                f"response_format {'json_schema' if context.schema else 'none'}; attempt {attempt} of {attempts}")

    def _audit_failure(self, context: _RequestLog, attempt: int, attempts: int, error: str, *, final: bool,
                       delay: float = 0.0) -> None:
        what = "giving up" if final else f"retrying in {delay:.1f} s"
        self._record(EVENT_REQUEST, "failure", f"{self._describe(context, attempt, attempts)}; {error[:300]}; {what}",
                     context)

    def _audit_answer(self, context: _RequestLog, completion: Completion, how: str, outcome: str) -> None:
        """The row of a request that was answered, with how its answer was read."""
        self._record(EVENT_REQUEST, outcome,
                     f"{self._describe(context, completion.attempts, self.max_retries + 1)}; HTTP {completion.status}; "
                     f"{completion.prompt_tokens} prompt + {completion.completion_tokens} completion tokens; "
                     f"finish {completion.finish_reason or '-'}; {completion.seconds:.2f} s; {how}", context)

    def _audit_parsed(self, context: _RequestLog, completion: Completion, parsed: bool, error: str) -> None:
        """The row of the request whose answer holds the findings: constrained JSON, or the lenient
        parser as the fallback (the server ignored ``response_format``), or free text."""
        if context.schema and is_strict_json(completion.text):
            how, outcome = "answer: JSON as constrained by response_format", "success"
        elif context.schema:
            self.fallbacks += 1
            how = ("answer: not plain JSON although response_format was sent (the server ignored it): "
                   + ("lenient parser fallback used" if parsed else f"lenient parser fallback found none ({error})"))
            outcome = "warning"
        else:
            how = "answer: free text, lenient parser " + ("found the JSON" if parsed else f"found none ({error})")
            outcome = "success" if parsed else "warning"
        self._audit_answer(context, completion, how, outcome)


def _result(**values: Any) -> AnalysisResult:
    """An AnalysisResult; the per-turn figures go in where the result type has them."""
    from dataclasses import fields

    from . import result as result_module

    known = {f.name for f in fields(AnalysisResult)}
    turn_stats = getattr(result_module, "TurnStats", None)
    if turn_stats is not None and "turns" in known:
        values["turns"] = [turn_stats(name, c.prompt_tokens, c.completion_tokens, c.seconds)
                           for name, c in values["turns"]]
    return AnalysisResult(**{k: v for k, v in values.items() if k in known})


def _error_message(data: bytes) -> str:
    """The server's error text (vLLM: {"error": {"message"}}, FastAPI: {"detail"}), shortened."""
    try:
        answer = json.loads(data)
    except ValueError:
        return data[:200].decode("utf-8", "replace")
    if isinstance(answer, dict):
        error = answer.get("error", answer.get("detail", answer))
        if isinstance(error, dict):
            error = error.get("message", error)
        return str(error)[:300]
    return str(answer)[:300]


def _series_uids(paths: Sequence[Path]) -> tuple[str, str]:
    """Study and Series Instance UID of a series (for the audit rows), from its first file."""
    import pydicom

    try:
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
        return str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
    except Exception:  # noqa: BLE001 - the audit row then goes without them
        return "", ""
