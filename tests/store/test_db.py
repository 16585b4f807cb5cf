"""The index database: transactions of several processes queue on the lock file, not on SQLite's
sleeping busy handler, and nest safely within one thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import func, select

from scp_node.store.db import Database
from scp_node.store.models import Patient


def test_a_second_process_waits_for_the_first_and_goes_on_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    first, second = Database(url), Database(url)  # two lock-file descriptors: as two processes
    holding, released_at, got_at = threading.Event(), [0.0], [0.0]

    def hold() -> None:
        with first.session() as s:
            s.add(Patient(patient_id="A"))
            holding.set()
            time.sleep(0.3)
            released_at[0] = time.monotonic()

    t = threading.Thread(target=hold)
    t.start()
    holding.wait(5)
    with second.session() as s:
        got_at[0] = time.monotonic()
        assert s.scalar(select(func.count()).select_from(Patient)) == 1  # it saw the committed row
    t.join()
    assert got_at[0] >= released_at[0]
    assert got_at[0] - released_at[0] < 0.05  # woken by the flock, not after a busy-handler sleep
    assert (tmp_path / "index.db.lock").exists()
    first.dispose()
    second.dispose()


def test_sessions_nest_in_one_thread_and_release_the_lock_at_the_outermost(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'index.db'}")
    other = Database(f"sqlite:///{tmp_path / 'index.db'}")
    with db.session():
        with db.session() as inner:
            inner.add(Patient(patient_id="B"))
        assert db._depth == 1
    done = threading.Event()

    def use_other() -> None:
        with other.session():
            done.set()

    threading.Thread(target=use_other, daemon=True).start()
    assert done.wait(5)  # the lock was released when the outer session ended
    db.dispose()
    other.dispose()
