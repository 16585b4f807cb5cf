"""The OpenAI-compatible serving backend (scp_node.engine.openai_backend) and its egress rule.

Against a real server wherever the behaviour is the server's: ``transformers serve`` on CPU serving
the tiny test model from its local folder (tests/support/llm_server.py). Faults a real server does
not produce on demand (503 once, a server that honours nothing, a context error, many requests at
once) come from a small real HTTP server in this file; DNS answers for the egress rule from a
stand-in resolver (no test may depend on outside DNS).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from scp_node.config import ConfigError, from_mapping
from scp_node.engine.egress import (EgressError, address_allowed, check_allowed_hosts, check_base_url,
                                    checked_addresses)
from scp_node.engine.modeldir import weights_sha256
from scp_node.engine.openai_backend import (EVENT_REQUEST, EVENT_SERVER, BackendStartError, OpenAIBackend,
                                            ServerError, _Images, image_data_uri, is_strict_json, openai_messages,
                                            response_format)
from scp_node.engine.preprocess import SeriesSkipped
from scp_node.engine.schema import SchemaBounds
from tests.support.llm_server import LLMServer, start_llm_server
from tests.support.net import free_port

from .conftest import SMALL_BOUNDS, XRAY_DIR, need

HASH = "ab" * 32


def _cxr() -> Path:
    return need(XRAY_DIR / "RG1_UNCR.dcm")


def _events(audit_trail, event: str) -> list[tuple[str, str, str]]:
    from sqlalchemy import text

    with audit_trail.db.transaction() as conn:
        rows = conn.execute(text("select event, outcome, detail from audit_events order by id")).fetchall()
    return [(r[0], r[1], r[2]) for r in rows if r[0] == event]


# -- config and the egress rule (no server) -------------------------------------------------------


def _engine_config(**keys: Any):
    values = {"backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "medgemma",
              "weights_sha256": HASH, **keys}
    return from_mapping({"engine": values}, Path("/etc/scp-node"), {}).engine


def test_config_accepts_loopback_and_allowed_hosts() -> None:
    assert _engine_config().backend == "openai"
    assert _engine_config(base_url="http://localhost:8000/v1").base_url.startswith("http://localhost")
    assert _engine_config(base_url="http://[::1]:8000/v1").max_concurrent == 4
    engine = _engine_config(base_url="https://gpu1.radiology.lan/v1", allowed_hosts=["gpu1.radiology.lan"],
                            api_key_file="vllm.key")
    assert engine.allowed_hosts == ("gpu1.radiology.lan",)
    assert engine.api_key_file == "/etc/scp-node/vllm.key"  # relative to the config folder
    assert _engine_config(base_url="http://10.1.2.3:8000/v1", allowed_hosts=["10.1.0.0/16"]).model == "medgemma"
    # The default backend needs none of it.
    assert from_mapping({}, Path("/tmp"), {}).engine.backend == "transformers"


@pytest.mark.parametrize("keys, says", [
    ({"base_url": "http://api.example.com/v1"}, "not loopback and not named in [engine] allowed_hosts"),
    ({"base_url": "http://10.0.0.5:8000/v1"}, "not loopback"),
    ({"base_url": "http://10.0.0.5:8000/v1", "allowed_hosts": ["10.0.1.0/24"]}, "not loopback"),
    ({"base_url": "http://gpu.lan/v1", "allowed_hosts": ["gpu2.lan"]}, "not loopback"),
    ({"base_url": "http://user:secret@127.0.0.1/v1"}, "must not hold a user"),
    ({"base_url": "127.0.0.1:8000"}, "must be http(s)://"),
    ({"allowed_hosts": ["http://gpu.lan"]}, "allowed_hosts entry"),
    ({"weights_sha256": ""}, "needs weights_sha256"),
    ({"weights_sha256": "abc"}, "needs weights_sha256"),
    ({"model": ""}, "needs model"),
    ({"image_format": "webp"}, "image_format"),
    ({"max_concurrent": 0}, "max_concurrent must be positive"),
    ({"backend": "vllm"}, "must be 'transformers' or 'openai'"),
])
def test_config_refuses(keys: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match="(?s).*" + __import__("re").escape(says)):
        _engine_config(**keys)


def test_config_from_environment() -> None:
    env = {"SCP_NODE__ENGINE__BACKEND": "openai", "SCP_NODE__ENGINE__BASE_URL": "http://127.0.0.1:9000/v1",
           "SCP_NODE__ENGINE__MODEL": "m", "SCP_NODE__ENGINE__WEIGHTS_SHA256": HASH,
           "SCP_NODE__ENGINE__ALLOWED_HOSTS": '["gpu.lan"]'}
    engine = from_mapping({}, Path("/tmp"), env).engine
    assert (engine.base_url, engine.allowed_hosts) == ("http://127.0.0.1:9000/v1", ("gpu.lan",))
    with pytest.raises(ConfigError, match="not loopback"):
        from_mapping({}, Path("/tmp"), {**env, "SCP_NODE__ENGINE__BASE_URL": "http://8.8.8.8/v1"})


def _resolver(table: dict[str, list[str]]):
    def resolve(host: str, port: int, type: int = 0) -> list[tuple]:  # noqa: A002 - getaddrinfo's name
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in table[host]]
    return resolve


def test_resolved_addresses_must_be_loopback_private_for_a_named_host_or_listed() -> None:
    lan = check_base_url("http://gpu.lan:8000/v1", ["gpu.lan"])
    assert checked_addresses(lan, ["gpu.lan"], _resolver({"gpu.lan": ["10.0.0.7"]})) == ["10.0.0.7"]
    assert checked_addresses(lan, ["gpu.lan"], _resolver({"gpu.lan": ["fd00::7", "192.168.1.9"]}))
    # A listed name that resolves (also) to a public address is refused, not followed.
    with pytest.raises(EgressError, match="8.8.4.4"):
        checked_addresses(lan, ["gpu.lan"], _resolver({"gpu.lan": ["10.0.0.7", "8.8.4.4"]}))
    # ... unless that address (or its network) is listed itself.
    assert checked_addresses(lan, ["gpu.lan", "8.8.4.0/24"], _resolver({"gpu.lan": ["8.8.4.4"]}))
    # localhost must be loopback.
    local = check_base_url("http://localhost:8000/v1")
    assert checked_addresses(local, [], _resolver({"localhost": ["127.0.0.1", "::1"]})) == ["127.0.0.1", "::1"]
    with pytest.raises(EgressError):
        checked_addresses(local, [], _resolver({"localhost": ["198.51.100.1"]}))
    with pytest.raises(OSError, match="cannot resolve"):
        checked_addresses(lan, ["gpu.lan"], _resolver({}))
    assert address_allowed("x", "127.0.0.2", []) and not address_allowed("x", "10.0.0.1", [])
    check_allowed_hosts(["gpu.lan", "10.0.0.0/8", "fd00::/8", "192.168.1.9"])


# -- pieces of a request -----------------------------------------------------------------------------


def test_png_data_uri_is_lossless_and_jpeg_is_google_s_smaller_lossy_choice() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    uri, size = image_data_uri(image, "png")
    assert uri.startswith("data:image/png;base64,")
    data = base64.b64decode(uri.split(",", 1)[1])
    assert len(data) == size
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), pixels)
    juri, _ = image_data_uri(image, "jpeg")
    assert juri.startswith("data:image/jpeg;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(juri.split(",", 1)[1]))))
    assert not np.array_equal(decoded, pixels)


def test_messages_in_openai_format_encode_each_image_once() -> None:
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    messages = [{"role": "system", "content": [{"type": "text", "text": "sys"}]},
                {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "SLICE 1"},
                                             {"type": "text", "text": "q"}]},
                {"role": "assistant", "content": "report"},
                {"role": "user", "content": [{"type": "image", "image": image}]}]
    images = _Images("png")
    out = openai_messages(messages, images)
    assert out[1]["content"][0]["type"] == "image_url"
    assert out[1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert out[1]["content"][1:] == [{"type": "text", "text": "SLICE 1"}, {"type": "text", "text": "q"}]
    assert out[2] == {"role": "assistant", "content": "report"}
    assert len(images.uris) == 1 and images.nbytes > 0
    assert response_format({"type": "object"})["json_schema"]["schema"] == {"type": "object"}
    assert response_format({})["type"] == "json_schema"
    assert is_strict_json('{"a": 1}') and not is_strict_json('```json\n{"a": 1}\n```') and not is_strict_json("[]")


# -- a small real HTTP server for the faults ------------------------------------------------------------

ANSWER = {"findings": [{"finding_type": "nodule", "location": "right upper lobe", "description": "small nodule",
                        "size_mm": 6, "box_2d": [100, 100, 200, 200], "image_index": None}],
          "impression": "Nodule.", "recommendation": "CT follow-up.", "image_quality": "adequate",
          "triage": "abnormal"}


class _Stub:
    """Answers POST /v1/chat/completions from a script of (status, content or error) entries."""

    def __init__(self, script: list[tuple[int, str]], delay: float = 0.0, drop_idle: bool = False) -> None:
        self.script = list(script)
        self.delay = delay
        self.drop_idle = drop_idle  # close each connection after its answer, without saying so
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._send(200, {"object": "list", "data": [{"id": "medgemma", "object": "model"}]})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.bodies.append(body)
                    stub.headers.append(dict(self.headers))
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    status, content = stub.script.pop(0) if len(stub.script) > 1 else stub.script[0]
                time.sleep(stub.delay)
                with stub.lock:
                    stub.in_flight -= 1
                if status != 200:
                    self._send(status, {"error": {"message": content, "type": "BadRequestError"}})
                    return
                self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 300, "completion_tokens": 42, "total_tokens": 342}})

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                if stub.drop_idle:  # as uvicorn does with an idle kept-alive connection
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_factory() -> Iterator[Any]:
    made: list[_Stub] = []

    def make(script: list[tuple[int, str]], delay: float = 0.0, drop_idle: bool = False) -> _Stub:
        made.append(_Stub(script, delay, drop_idle))
        return made[-1]

    yield make
    for stub in made:
        stub.close()


def _backend(base_url: str, audit=None, **kwargs: Any) -> OpenAIBackend:
    model = kwargs.pop("model", "medgemma")
    options = dict(weights_sha256=HASH, retry_backoff=0.01, schema_bounds=SchemaBounds(**SMALL_BOUNDS), audit=audit)
    options.update(kwargs)
    return OpenAIBackend(base_url, model, **options)


def test_request_shape_retry_on_503_and_the_lenient_fallback_is_audited(stub_factory, audit_trail,
                                                                          tmp_path: Path) -> None:
    fenced = "Here you go:\n```json\n" + json.dumps(ANSWER) + "\n```"
    stub = stub_factory([(503, "loading"), (200, fenced)])
    backend = _backend(stub.base_url, audit_trail, api_key="s3cret", answer_mode="structured")
    result = backend.analyse_series([_cxr()])
    assert result.structured is not None and result.structured.findings[0].finding_type == "nodule"
    assert result.structured.findings[0].region is not None  # the box mapped back to the film
    assert result.generated_tokens == 42 and result.model.weights_sha256 == HASH
    assert len(stub.bodies) == 2  # the 503, then the answer
    body = stub.bodies[-1]
    assert body["model"] == "medgemma" and body["temperature"] == 0 and body["stream"] is False
    assert body["response_format"]["type"] == "json_schema"
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["findings"]["maxItems"] == SMALL_BOUNDS["max_findings"]
    parts = body["messages"][-1]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(urls) == 1 and urls[0].startswith("data:image/png;base64,")
    assert parts[-1]["type"] == "text" and "JSON" in parts[-1]["text"]  # the question (and format) last
    assert stub.headers[-1]["Authorization"] == "Bearer s3cret"
    rows = _events(audit_trail, EVENT_REQUEST)
    assert [r[1] for r in rows] == ["failure", "warning"]
    assert "HTTP 503" in rows[0][2] and "retrying in" in rows[0][2]
    assert "lenient parser fallback used" in rows[1][2] and "HTTP 200" in rows[1][2]
    assert "1 image(s), png" in rows[1][2] and "300 prompt + 42 completion tokens" in rows[1][2]
    everything = " ".join(r[2] for r in _events(audit_trail, EVENT_REQUEST) + _events(audit_trail, EVENT_SERVER))
    assert "s3cret" not in everything and "base64" not in everything and "nodule" not in everything
    assert backend.fallbacks == 1


def test_an_answer_under_response_format_is_audited_as_constrained(stub_factory, audit_trail) -> None:
    stub = stub_factory([(200, json.dumps(ANSWER))])
    backend = _backend(stub.base_url, audit_trail, answer_mode="structured")
    assert backend.analyse_series([_cxr()]).structured is not None
    [row] = _events(audit_trail, EVENT_REQUEST)
    assert row[1] == "success" and "JSON as constrained by response_format" in row[2]
    assert backend.fallbacks == 0


def test_free_mode_sends_no_schema(stub_factory) -> None:
    stub = stub_factory([(200, "No acute findings.")])
    result = _backend(stub.base_url, answer_mode="free", max_new_tokens=77).analyse_series([_cxr()])
    assert result.structured is None and result.findings_text == "No acute findings."
    assert "response_format" not in stub.bodies[0] and stub.bodies[0]["max_tokens"] == 77


def test_report_mode_is_two_requests_of_one_conversation(stub_factory, audit_trail) -> None:
    """Report mode: the report with Google's budget and no schema, then the extraction turn - the same
    conversation, the report as the assistant turn - with the schema as response_format."""
    from scp_node.engine.prompts import EXTRACTION_QUESTION, IMAGE_REPORT_TOKENS

    report = "FINDINGS: A 6 mm nodule in the right upper lobe.\nIMPRESSION: Pulmonary nodule."
    stub = stub_factory([(200, "<unused94>thinking...<unused95>" + report), (200, json.dumps(ANSWER))])
    backend = _backend(stub.base_url, audit_trail)
    assert backend.answer_mode == "report"
    result = backend.analyse_series([_cxr()])
    assert result.findings_text == report  # the model's own report, thinking trace cut
    assert result.structured is not None and result.structured.findings[0].finding_type == "nodule"
    assert result.generated_tokens == 84
    first, second = stub.bodies
    assert "response_format" not in first and first["max_tokens"] == IMAGE_REPORT_TOKENS
    assert second["response_format"]["type"] == "json_schema"
    assert second["messages"][:len(first["messages"])] == first["messages"]  # same conversation, same image
    assert second["messages"][-2] == {"role": "assistant", "content": [{"type": "text", "text": report}]}
    assert second["messages"][-1]["role"] == "user"
    assert second["messages"][-1]["content"][0]["text"].startswith(EXTRACTION_QUESTION)
    rows = _events(audit_trail, EVENT_REQUEST)
    assert [r[1] for r in rows] == ["success", "success"]
    assert rows[0][2].startswith("report: ") and "response_format none" in rows[0][2]
    assert rows[1][2].startswith("extraction: ") and "constrained by response_format" in rows[1][2]
    turns = getattr(result, "turns", None)
    if turns is not None:  # the result type carries per-turn figures
        assert [t.name for t in turns] == ["report", "extraction"]


def test_a_prompt_too_long_for_the_server_skips_the_series(stub_factory, audit_trail) -> None:
    message = ("This model's maximum context length is 8192 tokens. However, you requested 23500 tokens "
               "(23019 in the messages, 481 in the completion).")
    stub = stub_factory([(400, message)])
    with pytest.raises(SeriesSkipped, match="max-model-len"):
        _backend(stub.base_url, audit_trail).analyse_series([_cxr()])
    assert len(stub.bodies) == 1  # not retried
    [row] = _events(audit_trail, EVENT_REQUEST)
    assert row[1] == "failure" and "giving up" in row[2]


def test_a_4xx_is_not_retried_and_fails_with_the_server_s_reason(stub_factory) -> None:
    stub = stub_factory([(404, "The model `medgemma` does not exist.")])
    [result] = _backend(stub.base_url).analyse_batch([[_cxr()]])
    assert isinstance(result, ServerError) and "HTTP 404" in str(result) and "does not exist" in str(result)
    assert len(stub.bodies) == 1


def test_no_server_fails_after_the_retries_with_a_clear_error(audit_trail) -> None:
    port = free_port()  # nothing listens there
    backend = _backend(f"http://127.0.0.1:{port}/v1", audit_trail, max_retries=2)
    backend.load()  # an unreachable server does not stop the node from starting
    [server_row] = _events(audit_trail, EVENT_SERVER)
    assert server_row[1] == "warning" and "not reachable now" in server_row[2]
    started = time.monotonic()
    [result] = backend.analyse_batch([[_cxr()]])
    assert isinstance(result, ServerError)
    assert f"127.0.0.1:{port}" in str(result) and "after 3 attempt(s)" in str(result)
    assert "ConnectionRefusedError" in str(result)
    assert time.monotonic() - started < 30
    rows = _events(audit_trail, EVENT_REQUEST)
    assert [r[1] for r in rows] == ["failure"] * 3
    assert "retrying in" in rows[0][2] and "giving up" in rows[-1][2]


def test_a_kept_alive_connection_the_server_closed_is_not_an_attempt(stub_factory, audit_trail) -> None:
    """uvicorn (vLLM, transformers serve) closes idle kept-alive connections; the request then goes
    again on a new connection at once, and the audit shows one attempt, not a retry."""
    stub = stub_factory([(200, "report"), (200, json.dumps(ANSWER))], drop_idle=True)
    backend = _backend(stub.base_url, audit_trail, max_retries=0)
    result = backend.analyse_series([_cxr()])  # report mode: two requests on the same thread
    assert result.structured is not None and len(stub.bodies) == 2
    rows = _events(audit_trail, EVENT_REQUEST)
    assert [r[1] for r in rows] == ["success", "success"] and all("attempt 1 of 1" in r[2] for r in rows)


def test_at_most_max_concurrent_requests_in_flight(stub_factory) -> None:
    stub = stub_factory([(200, json.dumps(ANSWER))], delay=0.3)
    backend = _backend(stub.base_url, max_concurrent=2, answer_mode="structured")
    assert backend.max_batch == 2
    results = backend.analyse_batch([[_cxr()]] * 5)
    assert all(r.structured is not None for r in results), results
    assert len(stub.bodies) == 5 and stub.max_in_flight == 2


def test_egress_refused_at_start_and_before_any_connection(stub_factory, audit_trail) -> None:
    stub = stub_factory([(200, json.dumps(ANSWER))])
    # "gpu.lan" is allowed by name, but (the stand-in DNS says) resolves to a public address.
    resolver = _resolver({"gpu.lan": ["9.9.9.9"]})
    backend = _backend(f"http://gpu.lan:{stub.port}/v1", audit_trail, allowed_hosts=["gpu.lan"], resolver=resolver)
    with pytest.raises(BackendStartError, match="9.9.9.9"):
        backend.load()
    with pytest.raises(EgressError):
        backend.complete([{"role": "user", "content": "hello"}], 4)
    assert stub.bodies == []
    assert [r[1] for r in _events(audit_trail, EVENT_SERVER)] == ["failure"]
    # The same name resolving to loopback is fine, and the connection goes to that checked address.
    ok = _backend(f"http://gpu.lan:{stub.port}/v1", allowed_hosts=["gpu.lan"],
                  resolver=_resolver({"gpu.lan": ["127.0.0.1"]}))
    assert ok.complete([{"role": "user", "content": "hello"}], 4).text
    assert stub.headers[-1]["Host"] == f"gpu.lan:{stub.port}"
    with pytest.raises(EgressError):
        _backend("http://example.com/v1")


def test_node_refuses_to_start_on_an_egress_or_hash_problem(tmp_path: Path, model_dir: Path) -> None:
    from scp_node.node import Node, StartupError

    base = {"store": {"database_url": f"sqlite:///{tmp_path}/index.db", "storage_dir": str(tmp_path / "storage")},
            "audit": {"secret_file": str(tmp_path / "audit.key")}}
    engine = {"backend": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "model": str(model_dir),
              "weights_sha256": HASH}
    node = Node(from_mapping({**base, "engine": engine}, tmp_path, {}))
    try:
        with pytest.raises(StartupError, match="is not the hash of the weights"):
            node._load_engine()
    finally:
        node.db.dispose()
    engine["api_key_file"] = "missing.key"
    node = Node(from_mapping({**base, "engine": {**engine, "weights_sha256": weights_sha256(model_dir)}},
                             tmp_path, {}))
    try:
        with pytest.raises(StartupError, match="missing.key"):
            node._load_engine()
    finally:
        node.db.dispose()


# -- against transformers serve (real server, CPU, the tiny model) -----------------------------------


@pytest.fixture(scope="module")
def llm_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLMServer]:
    server = start_llm_server(model_dir, tmp_path_factory.mktemp("llm") / "serve.log")
    yield server
    server.stop()


@pytest.mark.integration
def test_served_model_identity_and_analysis(llm_server: LLMServer, model_dir: Path, audit_trail) -> None:
    backend = _backend(llm_server.base_url, audit_trail, model=llm_server.model,
                       weights_sha256=weights_sha256(model_dir), answer_mode="structured")
    identity = backend.identity
    assert identity.is_test_model and "TEST MODEL" in identity.name
    assert identity.weights_sha256 == weights_sha256(model_dir)
    assert f"127.0.0.1:{llm_server.port}" in identity.device and "weights not readable" in identity.device
    assert len(identity.name) <= 64 and len(identity.version) <= 64
    [row] = _events(audit_trail, EVENT_SERVER)
    assert row[1] == "success" and str(model_dir) in row[2]
    result = backend.analyse_series([_cxr()])
    assert result.modality in ("CR", "DX") and result.model == identity and result.generated_tokens > 0
    [request] = _events(audit_trail, EVENT_REQUEST)
    # transformers serve ignores response_format: the random model's text is not JSON.
    assert request[1] == "warning" and "lenient parser fallback" in request[2]
    assert result.structured is None and result.parse_error


@pytest.mark.integration
def test_served_report_mode(llm_server: LLMServer, model_dir: Path, audit_trail) -> None:
    backend = _backend(llm_server.base_url, audit_trail, model=llm_server.model, max_new_tokens=16,
                       weights_sha256=weights_sha256(model_dir))
    result = backend.analyse_series([_cxr()])
    assert result.findings_text and result.structured is None  # random weights: nothing to extract
    report, extraction = _events(audit_trail, EVENT_REQUEST)
    assert report[1] == "success" and report[2].startswith("report: ") and "16 completion tokens" in report[2]
    assert extraction[2].startswith("extraction: ") and "lenient parser fallback" in extraction[2]


@pytest.mark.integration
def test_server_and_embedded_engine_see_the_same_pixels(llm_server: LLMServer, engine, model_dir: Path) -> None:
    """PNG is lossless: greedy decoding on the server gives the embedded engine's answer, token for token."""
    from scp_node.engine.prompts import build_messages

    prepared = engine.prepare([_cxr()])
    messages = build_messages(prepared, engine.profile_for(prepared.modality), structured=False)
    local = engine.generate(messages, max_new_tokens=8)
    backend = _backend(llm_server.base_url, model=llm_server.model, weights_sha256=weights_sha256(model_dir))
    served = backend.complete(messages, 8)
    assert served.prompt_tokens == local.input_tokens
    assert served.text == local.text, (served.text, local.text)


@pytest.mark.integration
def test_wrong_model_name_fails_clearly(llm_server: LLMServer, audit_trail) -> None:
    backend = _backend(llm_server.base_url, audit_trail, model="google/medgemma-1.5-4b-it")
    backend.load()
    [row] = _events(audit_trail, EVENT_SERVER)
    assert row[1] == "warning" and "is not among them" in row[2]
    assert backend.identity.name == "MedGemma 1.5 4B" and not backend.identity.is_test_model
    [result] = backend.analyse_batch([[_cxr()]])
    assert isinstance(result, ServerError) and "HTTP 400" in str(result), result


# -- comparison with a prior ------------------------------------------------------------------------


def _cxr_with_prior():
    import pydicom

    from scp_node.engine.result import PriorStudy

    prior_path = need(XRAY_DIR / "CR-MONO1-10-chest_barre.dcm")
    ds = pydicom.dcmread(prior_path, stop_before_pixels=True)
    return [_cxr()], PriorStudy(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "20030301", (str(prior_path),))


def test_a_prior_goes_first_in_the_request_and_its_change_comes_back(stub_factory) -> None:
    """The request carries the embedded engine's conversation (prior image first, dated, question last)
    and the compared schema; the answer's change and comparison reach the result."""
    from scp_node.engine.longitudinal import conversation, prepare_with_prior
    from scp_node.engine.prompts import profile_for_modality

    paths, prior = _cxr_with_prior()
    finding = {**ANSWER["findings"][0], "change": "new"}
    stub = stub_factory([(200, json.dumps({**ANSWER, "findings": [finding], "comparison": "A new nodule."}))])
    backend = _backend(stub.base_url, answer_mode="structured")
    result = backend.analyse_series(paths, prior=prior)
    [body] = stub.bodies
    content = body["messages"][1]["content"]
    assert [c["type"] for c in content] == ["text", "image_url", "text", "image_url", "text"]
    assert content[0]["text"] == "PRIOR STUDY (2003-03-01):" and content[2]["text"] == "CURRENT STUDY (2004-08-26):"
    schema = body["response_format"]["json_schema"]["schema"]
    assert "change" in schema["properties"]["findings"]["items"]["required"] and "comparison" in schema["required"]
    current, pair, _ = prepare_with_prior(paths, prior, image_size=896, ct_max_slices=85, mr_max_slices=85)
    talk = conversation(current, profile_for_modality("CR"), pair, answer_mode="structured", language="en",
                        thinking=False, bounds=SchemaBounds(**SMALL_BOUNDS))
    assert body["messages"] == openai_messages(talk.messages, _Images("png"))  # the embedded engine's, exactly
    assert [f.change for f in result.structured.findings] == ["new"] and result.structured.comparison == "A new nodule."
    assert result.comparison.status == "compared" and len(result.comparison.prior_sources) == 1
    assert len(result.sources) == 1 and result.sources[0].sop_instance_uid != result.comparison.prior_sources[0].sop_instance_uid
    # without a prior the request is as before: one image, no change in the schema
    backend.analyse_batch([paths, paths], priors=[None, prior])
    plain = next(b for b in stub.bodies[1:] if len(b["messages"][1]["content"]) == 2)
    assert "change" not in json.dumps(plain["response_format"])


@pytest.mark.integration
def test_served_model_with_a_prior_sees_what_the_embedded_engine_sees(llm_server: LLMServer, engine, model_dir: Path,
                                                                     audit_trail) -> None:
    from scp_node.engine.longitudinal import conversation, prepare_with_prior

    paths, prior = _cxr_with_prior()
    backend = _backend(llm_server.base_url, audit_trail, model=llm_server.model, max_new_tokens=8,
                       weights_sha256=weights_sha256(model_dir), answer_mode="free")
    result = backend.analyse_series(paths, prior=prior)
    assert result.comparison.status == "compared" and result.comparison.interval_days == 544
    [request] = _events(audit_trail, EVENT_REQUEST)
    assert "2 image(s)" in request[2]
    current, pair, _ = prepare_with_prior(paths, prior, image_size=896, ct_max_slices=85, mr_max_slices=85)
    talk = conversation(current, engine.profile_for("CR"), pair, answer_mode="report", language="en",
                        thinking=False, bounds=SchemaBounds(**SMALL_BOUNDS))
    local = engine.generate(talk.messages, max_new_tokens=6)
    served = backend.complete(talk.messages, 6)
    assert served.prompt_tokens == local.input_tokens and served.text == local.text, (served.text, local.text)
