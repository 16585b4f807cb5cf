"""A real OpenAI-compatible model server for the tests: ``transformers serve`` on CPU, offline.

``transformers serve DIR`` (transformers' own server, ``pip install 'transformers[serving]'``) loads
the model folder given on its command line and serves it alone, under the folder's path as its
model name (``GET /v1/models`` lists it; a request naming another model gets 400). It takes images
as ``image_url`` items with ``data:`` URIs and ignores ``response_format`` (5.x lists it among the
unsupported fields), so the node's lenient-parser fallback is exercised against it. Production
runs vLLM, which honours ``response_format`` (see README, "Serving with vLLM").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from .net import free_port
from .paths import IN_CI, REPO


@dataclass
class LLMServer:
    """A running ``transformers serve`` process (its own process group: the model runs in a child)."""

    proc: subprocess.Popen[bytes]
    port: int
    model: str
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # the model's child process, if it outlived the server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def need_serving() -> None:
    """Skip (fail in CI) when transformers' serving extra is not installed."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        msg = "transformers serve needs pip install 'transformers[serving]' (in the test extra)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    # No proxy handler: the tests must not reach anything but loopback either.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return response.status, response.read()


def start_llm_server(model_dir: Path, log: Path, timeout: float = 180) -> LLMServer:
    """``transformers serve MODEL_DIR --device cpu`` on a free loopback port, ready to answer."""
    need_serving()
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               NO_PROXY="*", no_proxy="*")
    fh = open(log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--device", "cpu",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env, start_new_session=True)
    server = LLMServer(proc, port, str(model_dir), log)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {proc.returncode}:\n{server.output()[-3000:]}")
            try:
                status, data = _get(f"{server.base_url}/models")
            except OSError:
                time.sleep(0.5)
                continue
            models = [m.get("id") for m in json.loads(data).get("data", [])]
            if status == 200 and str(model_dir) in models:
                return server
            time.sleep(0.5)
        raise TimeoutError(f"transformers serve did not answer within {timeout} s:\n{server.output()[-3000:]}")
    except BaseException:
        server.stop()
        raise
