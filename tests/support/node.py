"""scp_node as a subprocess, the way an admin runs it: ``python -m scp_node serve --config F``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .net import free_port, wait_port
from .paths import REPO


def write_config(folder: Path, *, model_dir: Path, port: int | None = None, peers: list[tuple[str, str]] = (),
                 destinations: list[dict[str, Any]] = (), stable_seconds: float = 1.0,
                 extra: str = "") -> Path:
    """A node config in ``folder`` (TOML written by hand: the contract names from the issue)."""
    port = port or free_port()
    lines = [
        "[node]", 'ae_title = "SCPNODE"', 'host = "127.0.0.1"', f"port = {port}", "",
        "[store]", f'database_url = "sqlite:///{folder}/index.db"', f'storage_dir = "{folder}/storage"', "",
        "[scheduler]", f"series_stable_seconds = {stable_seconds}", "poll_seconds = 0.5", "",
        "[engine]", f'model_dir = "{model_dir}"', 'device = "cpu"', "max_new_tokens = 24", "",
        "[export]", "backoff_initial_seconds = 1.0", "backoff_max_seconds = 2.0", "",
        "[audit]", f'secret_file = "{folder}/audit.key"', "",
    ]
    for ae, host in peers:
        lines += ["[[peers]]", f'ae_title = "{ae}"', f'host = "{host}"', ""]
    for d in destinations:
        lines += ["[[destinations]]"] + [f"{k} = {json.dumps(v)}" for k, v in d.items()] + [""]
    path = folder / "node.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@dataclass
class NodeProcess:
    proc: subprocess.Popen[bytes]
    config: Path
    port: int
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m scp_node ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "scp_node", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=_env(env), stdin=subprocess.DEVNULL)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def _check_receive_path(node: NodeProcess) -> None:
    """With ``SCP_NODE__NODE__FAST_PATH=false`` (the ``receive_path`` fixture) the node must say it
    runs pynetdicom's own path, so a test meant for that mode cannot pass on the fast path."""
    wanted = os.environ.get("SCP_NODE__NODE__FAST_PATH", "").strip().lower()
    library = "pynetdicom's own path" in node.output()
    if wanted in ("false", "true") and library != (wanted == "false"):
        raise RuntimeError(f"SCP_NODE__NODE__FAST_PATH={wanted} but the node's log says otherwise:\n"
                           + node.output()[-2000:])


def start_node(config: Path, port: int, log_name: str = "node.log", timeout: float = 120,
               role: str | None = None) -> NodeProcess:
    """``serve`` (with ``--role`` when given: a receiver here; workers open no port) until it listens."""
    log = config.parent / log_name
    fh = open(log, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "scp_node", "serve", "--config", str(config),
                             *(["--role", role] if role else [])],
                            stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=_env(), stdin=subprocess.DEVNULL)
    node = NodeProcess(proc, config, port, log)
    try:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"scp-node exited with {proc.returncode}:\n{node.output()[-3000:]}")
            try:
                wait_port(port, timeout=0.5)
            except TimeoutError:
                continue
            # The port opens before the receiver processes serve (callers wait in the backlog):
            # tests start sending when serve says the node is up.
            if "scp-node listening as" in node.output():
                _check_receive_path(node)
                return node
            time.sleep(0.1)
        raise TimeoutError(f"scp-node did not listen within {timeout} s:\n{node.output()[-3000:]}")
    except Exception:
        node.stop(signal.SIGKILL)
        raise
