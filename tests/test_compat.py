"""The libraries whose internals scp_node uses, checked against what the code was written for.

- **pynetdicom**: :mod:`scp_node.dimse.pynetdicom_internals` (the only module that touches its
  private names) lists every private name and internal attribute it uses, and the SHA-256 of the
  source of every upstream function it copied, overrides or relies on.  Each must exist and hash
  the same, or this test says which and what to do.
- **SQLAlchemy**: ``scp_node/store/driver.py`` compiles statements once and reads the compiled
  statement's bind and prefetch attributes.
- **highdicom**: the SR code completes highdicom's finished content tree.

All three are pinned exactly in ``setup.cfg``; an upgrade starts by running this file against the
new version (``PYTHONPATH=<dir with the new version> python -m pytest tests/test_compat.py``).
"""

from __future__ import annotations

import configparser
import hashlib
import importlib
import inspect
import re
from typing import Any

import pytest

from scp_node.dimse import pynetdicom_internals as internals
from tests.support.paths import REPO

#: Distribution name -> module whose ``__version__`` says what is imported.
PINNED_MODULES = {"pynetdicom": "pynetdicom", "highdicom": "highdicom", "SQLAlchemy": "sqlalchemy"}

_HOW = ("scp_node.dimse.pynetdicom_internals was written against pynetdicom {pinned}; {found} differs. "
        "Read the new upstream source of each item, port what changed into pynetdicom_internals "
        "(or check that nothing needs to), update its PRIVATE_NAMES / UPSTREAM_SOURCES and the pin in "
        "setup.cfg; meanwhile [node] fast_path = false runs pynetdicom's own path.")


def _pins() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    pins = {}
    for line in cfg["options"]["install_requires"].splitlines():
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s;]+)\s*", line)
        if m:
            pins[m.group(1)] = m.group(2)
    return pins


def _resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def _instances() -> dict[str, Any]:
    """A real object of each class whose instance attributes the fast path uses."""
    from pynetdicom import AE
    from pynetdicom._globals import MODE_ACCEPTOR
    from pynetdicom.association import Association
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
    from pynetdicom.presentation import PresentationContext

    ae = AE()
    ae.add_supported_context("1.2.840.10008.1.1")
    server = ae.make_server(("127.0.0.1", 0))
    server.server_close()
    assoc = Association(ae, MODE_ACCEPTOR)
    return {
        "pynetdicom.ae.ApplicationEntity": ae,
        "pynetdicom.transport.AssociationServer": server,
        "pynetdicom.association.Association": assoc,
        "pynetdicom.dul.DULServiceProvider": assoc.dul,
        "pynetdicom.dimse.DIMSEServiceProvider": assoc.dimse,
        "pynetdicom.dimse_messages.DIMSEMessage": DIMSEMessage(),
        "pynetdicom.dimse_primitives.C_STORE": C_STORE(),
        "pynetdicom.pdu_primitives.P_DATA": P_DATA(),
        "pynetdicom.pdu_primitives.A_ASSOCIATE": A_ASSOCIATE(),
        "pynetdicom.presentation.PresentationContext": PresentationContext(),
    }


def _pynetdicom_version() -> str:
    return str(importlib.import_module("pynetdicom").__version__)


@pytest.mark.parametrize("dist", sorted(PINNED_MODULES))
def test_the_libraries_whose_internals_are_used_are_pinned_and_installed_at_the_pin(dist: str) -> None:
    pins = _pins()
    assert dist in pins, f"setup.cfg must pin {dist} exactly (==): scp_node uses its internals"
    found = str(importlib.import_module(PINNED_MODULES[dist]).__version__)
    assert found == pins[dist], (
        f"{dist} {found} is imported, setup.cfg pins {pins[dist]}: run tests/test_compat.py and the "
        f"tests of the code that uses {dist}'s internals against {found} before moving the pin")


def test_every_private_pynetdicom_name_the_fast_path_uses_exists() -> None:
    objects = _instances()
    missing = []
    for where, name in (*internals.PRIVATE_NAMES, *internals.INTERNAL_ATTRIBUTES):
        if where.startswith("instance:"):
            target = objects[where.removeprefix("instance:")]
        else:
            target = _resolve(where)
        if not hasattr(target, name):
            missing.append(f"{where}.{name}")
    assert not missing, (f"pynetdicom {_pynetdicom_version()} lacks names the fast path uses: {', '.join(missing)}. "
                         + _HOW.format(pinned=_pins().get("pynetdicom"), found=_pynetdicom_version()))


def test_every_upstream_function_copied_or_overridden_is_unchanged() -> None:
    changed = []
    for dotted, digest in internals.UPSTREAM_SOURCES.items():
        try:
            source = inspect.getsource(_resolve(dotted))
        except (AttributeError, ImportError, TypeError, OSError) as exc:
            changed.append(f"{dotted} (gone: {type(exc).__name__})")
            continue
        if hashlib.sha256(source.encode()).hexdigest() != digest:
            changed.append(dotted)
    assert not changed, (f"pynetdicom {_pynetdicom_version()}: the source of {len(changed)} upstream functions "
                         f"the fast path copied, overrides or relies on changed: {', '.join(changed)}. "
                         + _HOW.format(pinned=_pins().get("pynetdicom"), found=_pynetdicom_version()))


def test_the_compiled_statement_attributes_the_store_driver_reads_exist() -> None:
    from sqlalchemy import insert
    from sqlalchemy.dialects import sqlite

    from scp_node.store.models import Instance

    dialect = sqlite.dialect()
    compiled = insert(Instance).compile(dialect=dialect, column_keys=["sop_instance_uid", "path"])
    missing = [name for name in ("positiontup", "insert_prefetch", "update_prefetch", "binds", "string")
               if not hasattr(compiled, name)]
    bind = next(iter(compiled.binds.values()))
    missing += [f"bind.{name}" for name in ("required", "callable", "effective_value", "type")
                if not hasattr(bind, name)]
    assert not missing, (f"SQLAlchemy's compiled statements lack what scp_node/store/driver.py reads: {missing}; "
                         "set the store back to SQLAlchemy's own execution (CoreTransaction) or port the driver")
