"""What ``serve`` checks and loads before the node runs: its role, the model folder, the engine.

Kept apart from :mod:`scp_node.node` (the running node's wiring and life cycle); every failure
here is a :class:`StartupError` whose message tells the admin what to fix.
"""

from __future__ import annotations

import logging
from typing import Any

from .audit import AuditTrail
from .config import Config
from .scheduler.fleet import ROLES

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The node cannot start; the message tells the admin what to fix."""


def prepare_model_dir(config: Config) -> None:
    """Check the model folder; create the tiny test model only where the config asks for it."""
    from .engine.modeldir import ModelDirError, check_model_dir

    model_dir = config.engine.model_dir
    if config.engine.create_test_model and not model_dir.exists():
        from .engine.testmodel import make_test_model

        log.warning("creating a tiny random TEST model in %s (engine.create_test_model = true); "
                    "its reports have no clinical meaning", model_dir)
        make_test_model(model_dir)
    try:
        check_model_dir(model_dir)
    except ModelDirError as exc:
        raise StartupError(f"{exc}\nSet [engine] model_dir to a folder holding MedGemma 1.5 weights "
                           "(config.json, *.safetensors, tokenizer and processor files), copied in offline; "
                           "see README 'Real MedGemma weights'.") from None


def check_role(role: str, database_url: str) -> None:
    """Refuse a role the index cannot serve: receivers and workers share one index across
    processes and machines, which SQLite (a local file, one writer) cannot be."""
    if role not in ROLES:
        raise StartupError(f"unknown role {role!r} (use one of: {', '.join(ROLES)})")
    if role != "all" and database_url.startswith("sqlite"):
        raise StartupError(f"--role {role} needs a shared PostgreSQL index: SQLite serves one node on one "
                           "machine (role 'all'). Set [store] database_url = \"postgresql+psycopg://...\" in "
                           "every node's config, with one shared storage_dir, or serve with --role all.")


def load_engine(config: Config, audit: AuditTrail) -> Any:
    """The model of ``[engine]``: MedGemma in this process (bf16 on CUDA, warmed up when compiled),
    or the OpenAI-compatible server that serves it (its address checked, asked what it serves)."""
    e = config.engine
    if e.backend == "openai":
        return _load_served_engine(config, audit)
    from .engine.medgemma import MedGemmaEngine
    from .engine.schema import engine_bounds

    engine = MedGemmaEngine(e.model_dir, device=e.device, max_new_tokens=e.max_new_tokens,
                            ct_max_slices=e.ct_max_slices, prompt_profiles=e.prompts or None,
                            structured=e.structured, language=e.language, max_batch=e.max_batch,
                            compile=e.compile, schema_bounds=engine_bounds(e), answer_mode=e.answer_mode,
                            thinking=e.thinking)
    engine.load()
    if e.compile:
        from .engine.warmup import warm_up

        warm_up(engine)  # compile now, not on the first patient's series
    ident = engine.identity
    log.info("model loaded: %s %s on %s (%s)%s", ident.name, ident.version, ident.device, ident.dtype,
             " — TEST MODEL" if ident.is_test_model else "")
    return engine


def _load_served_engine(config: Config, audit: AuditTrail) -> Any:
    """``[engine] backend = "openai"``: the model runs in an OpenAI-compatible server (vLLM); the
    node checks the server's address (loopback or allowed_hosts) and asks it what it serves."""
    from .engine.egress import EgressError
    from .engine.openai_backend import BackendStartError, OpenAIBackend

    try:
        engine = OpenAIBackend.from_config(config.engine, audit=audit)
        engine.load()
    except (BackendStartError, EgressError, ValueError) as exc:
        raise StartupError(f"[engine] backend = 'openai': {exc}") from None
    ident = engine.identity
    log.info("model served: %s %s by %s%s", ident.name, ident.version, engine.url,
             " — TEST MODEL" if ident.is_test_model else "")
    return engine
