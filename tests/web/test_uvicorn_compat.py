"""uvicorn's internals used by scp_node.web.uvicorn_internals are those it was written against.

Fails loudly on another uvicorn: the pin, every internal attribute, and the SHA-256 of the source of
every upstream method overridden or called.  What to do then: read the new upstream methods, port
what changed, update UPSTREAM_SOURCES and the pin; meanwhile ``[web] connection_guard = false``
runs uvicorn's own protocol.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from scp_node.web import uvicorn_internals as internals
from tests.test_compat import _pins

_HOW = ("scp_node.web.uvicorn_internals was written against uvicorn {pinned}; {found} differs. Port the "
        "change or set [web] connection_guard = false.")


def test_uvicorn_is_the_pinned_version() -> None:
    assert _pins().get("uvicorn") == internals.UVICORN_VERSION
    assert uvicorn.__version__ == internals.UVICORN_VERSION, _HOW.format(
        pinned=internals.UVICORN_VERSION, found=f"uvicorn {uvicorn.__version__}")


def test_overridden_methods_are_unchanged_upstream() -> None:
    changed = []
    for name, digest in internals.UPSTREAM_SOURCES.items():
        source = inspect.getsource(getattr(H11Protocol, name))
        if hashlib.sha256(source.encode()).hexdigest() != digest:
            changed.append(name)
    assert not changed, _HOW.format(pinned=internals.UVICORN_VERSION, found=f"H11Protocol.{changed}")


def test_internal_attributes_exist_after_connection_made() -> None:
    class _Transport(asyncio.Transport):
        def get_extra_info(self, name, default=None):  # type: ignore[no-untyped-def]
            return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    config = uvicorn.Config(app=lambda *a: None, log_config=None)
    config.load()
    from uvicorn.server import ServerState

    loop = asyncio.new_event_loop()
    try:
        proto = H11Protocol(config, ServerState(), app_state={}, _loop=loop)
        proto.connection_made(_Transport())
        missing = [a for a in internals.INTERNAL_ATTRIBUTES if not hasattr(proto, a)]
        assert not missing, _HOW.format(pinned=internals.UVICORN_VERSION, found=f"attributes {missing} missing")
    finally:
        loop.close()
